"""The model-version subscriber: which model the worker serves, and when it changes.

Model versions are announced on the compacted topic ``sketchstream.models`` (one JSON object
per version: ``{"version", "path" | "uri", "sha256" | "content_hash"}``, see
:func:`model_announcement`). Every worker reads the whole topic — with its own group-less
consumer, since each worker needs every announcement, not a share of them.

At start, :class:`ModelFeed` serves the newest announced version that loads, else the newest
artifact in ``settings.artifact_dir``; with neither it refuses to start. While running it
follows the topic; a new version is loaded and verified in a thread (the event loop keeps
consuming), then handed to the batch handler, which swaps it in between two batches
(:meth:`ModelFeed.take_pending`). An artifact that fails verification, or whose content hash
is not the announced one, is refused with a log line naming the reason and counted
(``sketchstream_models_refused``); the current version keeps serving.

A refusal belongs to what is on disk, not to the version id: it is remembered with a
fingerprint of the artifact's files (name, size, mtime, ctime, inode of each), so the same
version announced again after its files were repaired (or pointing at another copy) is loaded
afresh, while announced again unchanged it is refused again, logged and counted, without being
read a second time.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import orjson
from mode import Service
from sketchstream.models.errors import SketchstreamError
from sketchstream.stream.errors import ConfigError, StreamError
from sketchstream.stream.metrics import WorkerMetrics
from sketchstream.stream.settings import Settings
from sketchstream.stream.worker import ServingModel, serving_model

__all__ = [
    "ModelAnnouncement",
    "ModelFeed",
    "artifact_location",
    "fingerprint",
    "load_serving_model",
    "model_announcement",
    "parse_announcement",
]

log = logging.getLogger(__name__)


Fingerprint = tuple[tuple[str, int, int, int, int], ...]


class ModelAnnouncement(NamedTuple):
    """One message of the models topic."""

    version: str
    path: str
    content_hash: str | None


def model_announcement(version: str, path: str | Path, content_hash: str) -> tuple[bytes, bytes]:
    """``(key, value)`` announcing a model artifact on the models topic (keyed by version)."""
    value = {"version": version, "path": str(path), "sha256": content_hash}
    return version.encode(), orjson.dumps(value)


def parse_announcement(raw: bytes | None) -> ModelAnnouncement:
    """Decode a models-topic message; :class:`StreamError` names what is wrong."""
    if not raw:
        raise StreamError("empty model announcement (a tombstone)")
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise StreamError(f"model announcement is not JSON: {exc}") from None
    if not isinstance(record, dict):
        raise StreamError(f"model announcement must be a JSON object, got {type(record).__name__}")
    version = record.get("version")
    path = record.get("path") or record.get("uri")
    digest = record.get("sha256") or record.get("content_hash")
    if not isinstance(version, str) or not version:
        raise StreamError(f"model announcement without a 'version': {record!r:.200}")
    if not isinstance(path, str) or not path:
        raise StreamError(f"model announcement {version} without a 'path' or 'uri'")
    if digest is not None and not isinstance(digest, str):
        raise StreamError(f"model announcement {version}: 'sha256' must be a hex string")
    if path.startswith("file://"):
        path = path[len("file://") :]
    return ModelAnnouncement(version, path, digest)


class _Refusal(NamedTuple):
    """Why an artifact was refused, and what its files looked like then."""

    on_disk: Fingerprint | None
    reason: str
    files_at_fault: bool  # False: the files verify but are not the version or hash announced


def artifact_location(path: str | Path, version: str | None, artifact_dir: Path | None) -> Path:
    """Where an announced artifact is read from: ``path``, or ``artifact_dir/version`` when
    ``path`` does not exist on this machine (announced from another one)."""
    where = Path(path)
    if not where.exists() and artifact_dir is not None and version:
        return artifact_dir / version
    return where


def fingerprint(where: Path) -> Fingerprint | None:
    """What is in the artifact directory ``where`` now, without reading it: ``(name, size,
    mtime_ns, ctime_ns, inode)`` of each entry, sorted; None when it cannot be listed. Any
    write, copy or rename over a file changes its entry (ctime at least)."""
    try:
        entries = []
        for entry in sorted(where.iterdir()):
            st = entry.stat()
            entries.append((entry.name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino))
    except OSError:
        return None
    return tuple(entries)


def load_serving_model(
    path: str | Path,
    *,
    version: str | None = None,
    content_hash: str | None = None,
    artifact_dir: Path | None = None,
) -> ServingModel:
    """Verify and load the artifact at ``path`` (falling back to ``artifact_dir/version`` when
    ``path`` does not exist here), checking it is the announced version and content hash."""
    from sketchstream.models.artifacts import load_model_artifact

    where = artifact_location(path, version, artifact_dir)
    bundle = load_model_artifact(where)  # verifies every checksum
    actual = str(bundle.manifest.get("content_hash", ""))
    if version is not None and bundle.version != version:
        raise StreamError(f"artifact at {where} is version {bundle.version}, announced {version}")
    if content_hash is not None and not actual.startswith(content_hash.lower()):
        raise StreamError(
            f"artifact at {where} has content hash {actual[:16]}…, announced {content_hash[:16]}…"
        )
    return serving_model(bundle)


class ModelFeed(Service):
    """Loads the model to serve at start; follows the models topic for new versions."""

    def __init__(
        self,
        settings: Settings,
        *,
        metrics: WorkerMetrics | None = None,
        loader: Callable[..., ServingModel] = load_serving_model,
        poll_seconds: float = 1.0,
        **kwargs: Any,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.loader = loader
        self.poll_seconds = poll_seconds
        self.current: ServingModel | None = None
        self._pending: ServingModel | None = None
        # (version, announced hash, where) -> the refusal and the files it saw
        self._refused: dict[tuple[str, str | None, str], _Refusal] = {}
        self._ready = asyncio.Event()
        self._consumer: Any = None
        super().__init__(**kwargs)

    # --- the batch handler's side ------------------------------------------------------------

    async def wait_ready(self) -> ServingModel:
        """The model to start serving with (waits for :meth:`on_start` to load it)."""
        await self._ready.wait()
        assert self.current is not None
        return self.current

    def take_pending(self) -> ServingModel | None:
        """A newly loaded version, once; None when nothing changed since the last call."""
        model, self._pending = self._pending, None
        return model

    # --- the service -----------------------------------------------------------------------

    async def on_start(self) -> None:
        from aiokafka import AIOKafkaConsumer

        self._consumer = AIOKafkaConsumer(
            **self.settings.client_kwargs(),
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
        )
        await self._consumer.start()
        announced = await self._read_to_end()
        tried: set[Path] = set()  # artifact directories whose files were refused just now
        model = None
        for ann in reversed(announced):  # newest first
            model = await self._load(ann, tried)
            if model is not None:
                break
        if model is None:
            model = await self._load_from_store(tried)
        if model is None:
            raise ConfigError(
                f"no model to serve: nothing loadable announced on {self.settings.topic_models!r} "
                f"and no artifact in {self.settings.artifact_dir}: train one first "
                "(sketchstream train) or set SKETCHSTREAM_ARTIFACT_DIR"
            )
        self._serve(model)
        self._ready.set()

    async def on_stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None

    def _serve(self, model: ServingModel) -> None:
        self.current = model
        log.info("serving model %s (codebooks %s)", model.version, model.codebook_version)
        if self.metrics is not None:
            self.metrics.set_model(model.version, model.codebook_version)

    async def _assign(self) -> bool:
        from aiokafka import TopicPartition
        from sketchstream.stream.faust_compat import fetch_all_metadata

        consumer = self._consumer
        topic = self.settings.topic_models
        # aiokafka has no public "partitions of a topic I am not subscribed to, fresh": ask the
        # client for current cluster metadata (the topic may have appeared since start)
        cluster = await fetch_all_metadata(consumer)
        parts = cluster.partitions_for_topic(topic)
        if not parts:
            return False
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        if set(tps) != consumer.assignment():
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
        return True

    async def _read_to_end(self) -> list[ModelAnnouncement]:
        """Every announcement on the topic now, oldest first (by record time across partitions)."""
        if not await self._assign():
            log.info("no model topic %r yet", self.settings.topic_models)
            return []
        consumer = self._consumer
        tps = list(consumer.assignment())
        end = await consumer.end_offsets(tps)
        found: list[tuple[int, ModelAnnouncement]] = []

        async def behind() -> bool:
            return any([await consumer.position(tp) < end[tp] for tp in tps])

        while await behind():
            batches = await consumer.getmany(timeout_ms=1000)
            for records in batches.values():
                for record in records:
                    ann = self._parse(record)
                    if ann is not None:
                        found.append((record.timestamp, ann))
        found.sort(key=lambda x: x[0])
        return [ann for _, ann in found]

    def _parse(self, record: Any) -> ModelAnnouncement | None:
        try:
            return parse_announcement(record.value)
        except StreamError as exc:
            log.warning("ignoring model announcement at offset %d: %s", record.offset, exc)
            return None

    async def _load(
        self, ann: ModelAnnouncement, tried: set[Path] | None = None
    ) -> ServingModel | None:
        """The announced model, verified; None (logged and counted) when it is refused.

        ``tried``: artifact directories whose files were refused in this pass, skipped (at
        start the store holds the announced versions too: one refusal each, not two). A
        directory refused only because the announcement named another version or content
        hash is not in it: its files may still serve as the store's fallback."""
        where = artifact_location(ann.path, ann.version, self.settings.artifact_dir).resolve()
        if tried is not None and where in tried:
            return None
        key = (ann.version, ann.content_hash, str(where))
        on_disk = fingerprint(where)
        known = self._refused.get(key)
        if known is not None and known.on_disk is not None and known.on_disk == on_disk:
            self._refuse(ann.version, f"{known.reason} (announced again, files unchanged)")
            if tried is not None and known.files_at_fault:
                tried.add(where)
            return None
        loop = asyncio.get_running_loop()
        try:
            model = await loop.run_in_executor(
                None,
                lambda: self.loader(
                    ann.path,
                    version=ann.version,
                    content_hash=ann.content_hash,
                    artifact_dir=self.settings.artifact_dir,
                ),
            )
        except (SketchstreamError, OSError, ValueError) as exc:
            files_at_fault = not isinstance(exc, StreamError)  # StreamError: not what was announced
            self._refused[key] = _Refusal(on_disk, str(exc), files_at_fault)
            self._refuse(ann.version, str(exc))
            if tried is not None and files_at_fault:
                tried.add(where)
            return None
        self._refused.pop(key, None)
        return model

    def _refuse(self, version: str, reason: str) -> None:
        log.error("refusing model %s: %s", version, reason)
        if self.metrics is not None:
            self.metrics.models_refused.inc()

    async def _load_from_store(self, tried: set[Path]) -> ServingModel | None:
        from sketchstream.models.artifacts import ArtifactStore

        store = ArtifactStore(self.settings.artifact_dir)
        for version in store.versions():
            ann = ModelAnnouncement(version, str(store.root / version), None)
            model = await self._load(ann, tried)
            if model is not None:
                return model
        return None

    @Service.task
    async def _follow(self) -> None:
        """Load each newly announced version; hand the newest good one to the batch handler."""
        await self._ready.wait()
        while not self.should_stop:
            if not self._consumer.assignment() and not await self._assign():
                await self.sleep(self.poll_seconds * 5)
                continue
            batches = await self._consumer.getmany(timeout_ms=int(self.poll_seconds * 1000))
            announced = [
                ann
                for records in batches.values()
                for record in records
                if (ann := self._parse(record)) is not None
            ]
            # the newest of a burst that verifies is served: older ones are not worth loading
            # unless the newer ones are refused
            for ann in reversed(announced):
                current = self._pending or self.current
                if current is not None and ann.version == current.version:
                    break  # already serving it (or about to): nothing older is wanted
                model = await self._load(ann)
                if model is not None:
                    log.info("model %s loaded; swapping it in after the current batch", ann.version)
                    self._pending = model
                    break
