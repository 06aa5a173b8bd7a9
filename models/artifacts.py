"""Model artifacts: immutable, content-addressed, checksummed directories that load safely.

A model artifact is a directory named by its version (the first 16 hex digits of its content
hash) holding everything a worker needs to rebuild the exact scorer::

    <version>/
      manifest.json            format version, created, config, codebook versions, metrics,
                               per-file sha256, content hash
      weights.safetensors      MLP weights and the dense-feature standardization (no pickle)
      codebook-<modality>.bin  one EMDE codebook per modality (``Codebook.to_bytes``)
      item-snapshot.safetensors  the item snapshot the worker scores with (optional;
                               ``ItemSnapshot.to_bytes``, no pickle)
      boost.json               the boosted heads' trees (plain arrays) and blend weights
                               (optional: ``EngagementMLP.boost``, models/boost.py)
      recommend.safetensors    the top-k recommender's weights (optional, with the next file)
      recommend-catalogue.json the items it ranks, in catalogue-row order, and their categories
      recommend-codebook-<modality>.bin  the recommender's own target codebooks (optional:
                               without them it predicts the state's codebooks' buckets)

``manifest["config"]`` holds the MLP config, the aggregator config, the heads and what the
item snapshot covers (``item_snapshot``: heads, prior, items, events, as_of), the boosted
heads' weights and trees (``boost``, an account; the file is what loads) and, for an
artifact that carries a recommender (:class:`RecommenderParts`), ``recommend``: its
``RecommendConfig``, ``InputSpec``, target modalities and catalogue size. The content
hash covers the manifest (less ``created`` and the hash itself)
including every file's sha256, so changing one byte anywhere is caught at load time:
:func:`load_model_artifact` verifies every checksum before it reads anything and raises
:class:`~sketchstream.models.errors.ArtifactError` naming the offending file.

:class:`ArtifactStore` keeps published versions under one root: ``publish``, ``versions``
(newest first), ``latest``, ``prune`` (never the version being served).

Just over 600 lines, on purpose: the format (manifest, checksums, version hash), its optional
parts (item snapshot, recommender) and the store are one contract that train, refresh and the
worker read; split, the checks would drift apart.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sketchstream.models.errors import ArtifactError, SketchstreamError
from sketchstream.models.mlp import EngagementMLP, MLPConfig

__all__ = [
    "FORMAT_VERSION",
    "ITEM_SNAPSHOT",
    "MANIFEST",
    "RECOMMEND_CATALOGUE",
    "RECOMMEND_WEIGHTS",
    "WEIGHTS",
    "ArtifactStore",
    "ModelBundle",
    "RecommenderParts",
    "content_hash",
    "load_model_artifact",
    "load_recommender",
    "save_model_artifact",
    "save_recommender",
    "save_trained_artifact",
    "verify_model_artifact",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
ITEM_SNAPSHOT = "item-snapshot.safetensors"
BOOST = "boost.json"
RECOMMEND_WEIGHTS = "recommend.safetensors"
RECOMMEND_CATALOGUE = "recommend-catalogue.json"
#: prefix of the recommender's own target codebooks: ``recommend-codebook-<modality>.bin``
RECOMMEND_CODEBOOK = "recommend-codebook"
_KIND = "sketchstream.model"
_VERSION_CHARS = 16
_CHUNK = 1 << 20
_UNHASHED = ("created", "content_hash", "version")  # version is derived from the hash


@dataclass
class ModelBundle:
    """A loaded, verified model artifact: the parts a worker needs to score events."""

    version: str
    path: Path
    manifest: dict[str, Any]
    mlp_config: MLPConfig
    model: EngagementMLP
    codebooks: dict[str, Any]  # modality -> Codebook
    aggregator_config: dict[str, Any]  # JSON form; see trainer.aggregator_config_from_dict
    heads: tuple[str, ...]
    item_snapshot: Any = None  # ItemSnapshot the worker scores with; None: no item features
    metrics: dict[str, Any] = field(default_factory=dict)
    recommender: RecommenderParts | None = None  # None: the artifact has no recommender

    @property
    def codebook_versions(self) -> dict[str, str]:
        """``{modality: codebook version}`` as recorded in the manifest."""
        return dict(self.manifest.get("codebooks", {}))


@dataclass(frozen=True, eq=False)
class RecommenderParts:
    """The top-k recommender an artifact may carry (:mod:`~sketchstream.models.recommend`).

    ``model``: the fitted ``SketchRecommender``; ``config``: its ``RecommendConfig``; ``spec``:
    the ``InputSpec`` of its inputs (checked on load against the artifact's aggregator);
    ``catalogue``: the ``Catalogue`` it ranks (saved as item ids in row order, their buckets
    recomputed from its codebooks on load); ``targets``: the modalities whose buckets it
    predicts, in level order; ``codebooks``: its own target codebooks ``{modality: Codebook}``
    (``RecommendConfig.target_width``), saved beside it, or None when it predicts the buckets
    of the artifact's (state's) codebooks.
    """

    model: Any
    config: Any
    spec: Any
    catalogue: Any
    targets: tuple[str, ...]
    codebooks: dict[str, Any] | None = None

    @classmethod
    def from_result(cls, result: Any, config: Any, aggregator_config: Any) -> RecommenderParts:
        """From :func:`~sketchstream.models.ranking.recommend_report`'s ``RecommendResult``
        and the ``RecommendConfig`` and ``AggregatorConfig`` it was run with."""
        if result.model is None:
            raise ArtifactError("recommender: the recommend report ran without 'sketchstream'")
        targets = tuple(config.targets or aggregator_config.modalities)
        return cls(
            result.model, config, result.spec, result.catalogue, targets, result.target_codebooks
        )


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _json_safe(obj: Any) -> Any:
    """Copy with nan/inf floats as None and tuples as lists (the manifest is strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, str | bytes):
        obj = obj.item()  # numpy scalar
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def content_hash(manifest: Mapping[str, Any]) -> str:
    """sha256 over the manifest less ``created``, ``content_hash``, ``version`` (64 hex chars).

    File contents enter through ``manifest["files"]`` (their sha256), so the hash names the
    whole artifact; ``created`` is left out so that identical content gets the same version.
    """
    body = {k: v for k, v in manifest.items() if k not in _UNHASHED}
    return hashlib.sha256(_canonical(body)).hexdigest()


def _codebook_file(modality: str, prefix: str = "codebook") -> str:
    safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in modality)
    return f"{prefix}-{safe}.bin"


def _write_codebooks(
    directory: Path, codebooks: Mapping[str, Any], prefix: str = "codebook"
) -> tuple[dict[str, str], dict[str, str]]:
    """Write each codebook as ``<prefix>-<modality>.bin``: ``({modality: version},
    {modality: file name})`` for the manifest."""
    versions: dict[str, str] = {}
    names: dict[str, str] = {}
    for modality, codebook in sorted(codebooks.items()):
        name = _codebook_file(modality, prefix)
        (directory / name).write_bytes(codebook.to_bytes())
        versions[modality] = str(codebook.version)
        names[modality] = name
    return versions, names


def _read_codebooks(
    path: Path, names: Mapping[str, str], versions: Mapping[str, str]
) -> dict[str, Any]:
    """The codebooks ``{modality: file name}`` of a verified artifact, each checked against
    the version the manifest records for it."""
    from sketchstream.models.emde import Codebook

    codebooks: dict[str, Any] = {}
    for modality, name in sorted(names.items()):
        try:
            codebooks[modality] = Codebook.from_bytes((path / name).read_bytes())
        except (OSError, SketchstreamError) as exc:
            raise ArtifactError(f"model artifact {path}: codebook file {name!r}: {exc}") from exc
        want = versions.get(modality)
        if str(codebooks[modality].version) != want:
            raise ArtifactError(
                f"model artifact {path}: codebook {name!r} has version "
                f"{codebooks[modality].version}, manifest says {want}"
            )
    return codebooks


def save_trained_artifact(
    root: str | Path,
    result: Any,
    *,
    item_snapshot: Any = None,
    extra: Mapping[str, Any] | None = None,
    recommender: RecommenderParts | None = None,
) -> str:
    """Save a trainer result (``ProtocolResult``: model, codebooks, aggregator config,
    per-head metrics) as a model artifact under ``root``; returns the version.

    ``item_snapshot``: the snapshot to serve with (default: the result's own, the one taken at
    the end of the protocol; the refresh job passes the whole window's). ``recommender``: the
    top-k recommender to ship in the same artifact and version (None: none).
    """
    metrics = {
        name: {split: dict(m) for split, m in fig.items()} for name, fig in result.metrics.items()
    }
    return save_model_artifact(
        root,
        model=result.model,
        codebooks=result.codebooks,
        aggregator_config=result.aggregator_config,
        item_snapshot=result.item_snapshot if item_snapshot is None else item_snapshot,
        metrics=metrics,
        extra=extra,
        recommender=recommender,
    )


def save_model_artifact(
    root: str | Path,
    *,
    model: EngagementMLP,
    codebooks: Mapping[str, Any],
    aggregator_config: Mapping[str, Any],
    item_snapshot: Any = None,
    metrics: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    recommender: RecommenderParts | None = None,
) -> str:
    """Write a model artifact under ``root/<version>`` and return the version.

    ``codebooks``: ``{modality: Codebook}`` (anything with ``to_bytes()`` and ``version``).
    ``item_snapshot``: an :class:`~sketchstream.models.snapshot.ItemSnapshot` (or None), stored
    as :data:`ITEM_SNAPSHOT`.
    ``recommender``: a :class:`RecommenderParts` (or None), stored as :data:`RECOMMEND_WEIGHTS`
    and :data:`RECOMMEND_CATALOGUE`.
    ``aggregator_config``, ``metrics``, ``extra``: JSON-ready mappings.
    The directory is written under a temporary name and renamed into place, so readers never
    see half an artifact; saving identical content twice returns the same version.
    """
    from safetensors.torch import save_file

    if item_snapshot is not None and not hasattr(item_snapshot, "to_bytes"):
        raise ArtifactError(
            "model artifact: online item statistics are gone; pass item_snapshot=ItemSnapshot "
            f"(got {type(item_snapshot).__name__})"
        )
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        # one metadata key: safetensors writes its metadata map in hash order, not sorted
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        cb_versions, cb_files = _write_codebooks(tmp, codebooks)
        if item_snapshot is not None:
            (tmp / ITEM_SNAPSHOT).write_bytes(item_snapshot.to_bytes())
        if model.boost is not None:
            (tmp / BOOST).write_text(json.dumps(model.boost.to_dict()))
        recommend = None
        if recommender is not None:
            recommend = save_recommender(tmp, recommender)
        # every file written is checksummed into the manifest (and so into the version)
        files = {p.name: _sha256_file(p) for p in sorted(tmp.iterdir())}
        manifest: dict[str, Any] = _json_safe(
            {
                "kind": _KIND,
                "format_version": FORMAT_VERSION,
                "created": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "config": {
                    "mlp": model.config.to_dict(),
                    "aggregator": dict(aggregator_config),
                    "heads": list(model.config.heads),
                    "item_snapshot": item_snapshot.config() if item_snapshot is not None else None,
                    **({"boost": model.boost.summary()} if model.boost is not None else {}),
                    **({"recommend": recommend} if recommend is not None else {}),
                    **(dict(extra) if extra else {}),
                },
                "codebooks": cb_versions,
                "codebook_files": cb_files,
                "metrics": dict(metrics or {}),
                "files": files,
            }
        )
        try:
            manifest["content_hash"] = content_hash(manifest)
        except (TypeError, ValueError) as exc:
            raise ArtifactError(f"model artifact: config or metrics not JSON-ready: {exc}") from exc
        version = manifest["content_hash"][:_VERSION_CHARS]
        manifest["version"] = version
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        dest = root / version
        if dest.exists():
            log.info("model artifact %s already present at %s", version, dest)
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, dest)
            log.info("wrote model artifact %s to %s", version, dest)
        return version
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise ArtifactError(f"model artifact {path}: not a directory")
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"model artifact {path}: {MANIFEST} is missing")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"model artifact {path}: {MANIFEST} is unreadable: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("kind") != _KIND:
        raise ArtifactError(
            f"model artifact {path}: {MANIFEST} is not a sketchstream model manifest"
        )
    fv = manifest.get("format_version")
    if fv != FORMAT_VERSION:
        raise ArtifactError(
            f"model artifact {path}: format version {fv!r}, this code reads {FORMAT_VERSION}; "
            "retrain or upgrade sketchstream"
        )
    return manifest


def verify_model_artifact(path: str | Path) -> dict[str, Any]:
    """Check every checksum of the artifact at ``path``; return its manifest.

    Raises :class:`ArtifactError` naming the file on a missing, extra or altered file, or on a
    manifest whose content hash does not match its content.
    """
    path = Path(path)
    manifest = _read_manifest(path)
    files = manifest.get("files")
    if not isinstance(files, dict) or WEIGHTS not in files:
        raise ArtifactError(f"model artifact {path}: {MANIFEST} lists no {WEIGHTS}")
    expected = manifest.get("content_hash")
    try:
        actual = content_hash(manifest)
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"model artifact {path}: {MANIFEST} is malformed: {exc}") from exc
    if actual != expected:
        raise ArtifactError(
            f"model artifact {path}: {MANIFEST} was modified (content hash {actual[:16]} does not "
            f"match the recorded {str(expected)[:16]}); refusing to load it"
        )
    if manifest.get("version") != str(expected)[:_VERSION_CHARS]:
        raise ArtifactError(f"model artifact {path}: version does not match its content hash")
    for name, digest in sorted(files.items()):
        fpath = path / name
        if Path(name).name != name or not fpath.is_file():
            raise ArtifactError(f"model artifact {path}: file {name!r} is missing")
        got = _sha256_file(fpath)
        if got != digest:
            raise ArtifactError(
                f"model artifact {path}: file {name!r} fails its checksum (sha256 {got[:16]}…, "
                f"manifest says {str(digest)[:16]}…): tampered with or corrupt; refusing to load it"
            )
    extra = sorted(p.name for p in path.iterdir() if p.name not in files and p.name != MANIFEST)
    if extra:
        raise ArtifactError(f"model artifact {path}: unexpected files {extra}; refusing to load it")
    return manifest


def load_model_artifact(path: str | Path) -> ModelBundle:
    """Verify and load the model artifact at ``path`` (weights via safetensors, never pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    manifest = verify_model_artifact(path)
    config = manifest.get("config", {})
    try:
        mlp_config = MLPConfig.from_dict(config["mlp"])
    except (KeyError, TypeError, SketchstreamError) as exc:
        raise ArtifactError(f"model artifact {path}: bad MLP config: {exc}") from exc
    if config.get("aggregator"):
        from sketchstream.models.channels import aggregator_config_from_dict

        try:
            aggregator_config_from_dict(config["aggregator"])
        except (TypeError, SketchstreamError) as exc:
            raise ArtifactError(f"model artifact {path}: bad aggregator config: {exc}") from exc
    model = EngagementMLP(mlp_config)
    try:
        state = load_file(str(path / WEIGHTS))
        model.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise ArtifactError(
            f"model artifact {path}: {WEIGHTS} does not fit the config: {exc}"
        ) from exc
    if not model.fixed_ready:
        raise ArtifactError(
            f"model artifact {path}: its products are {model.config.products} but {WEIGHTS} "
            "holds no calibrated input scales"
        )
    model.eval()
    if config.get("boost") is not None:
        model.boost = _read_boost(path, manifest, mlp_config)
    codebooks = _read_codebooks(
        path, manifest.get("codebook_files", {}), manifest.get("codebooks", {})
    )
    snapshot = None
    if config.get("item_snapshot") is not None:
        from sketchstream.models.snapshot import ItemSnapshot

        if ITEM_SNAPSHOT not in manifest.get("files", {}):
            raise ArtifactError(f"model artifact {path}: config names an item snapshot, no file")
        snapshot = ItemSnapshot.from_bytes((path / ITEM_SNAPSHOT).read_bytes())
    elif config.get("item_stats"):
        raise ArtifactError(
            f"model artifact {path}: made with online item statistics, which workers no longer "
            "keep (train/serve skew); retrain it to get an item snapshot"
        )
    return ModelBundle(
        version=manifest["version"],
        path=path,
        manifest=manifest,
        mlp_config=mlp_config,
        model=model,
        codebooks=codebooks,
        aggregator_config=dict(config.get("aggregator") or {}),
        heads=tuple(config.get("heads") or mlp_config.heads),
        item_snapshot=snapshot,
        metrics=dict(manifest.get("metrics") or {}),
        recommender=load_recommender(path, manifest, codebooks),
    )


def _read_boost(path: Path, manifest: Mapping[str, Any], mlp_config: MLPConfig) -> Any:
    """The model's :class:`~sketchstream.models.boost.HeadBoost` from :data:`BOOST`."""
    from sketchstream.models.boost import HeadBoost

    if BOOST not in manifest.get("files", {}):
        raise ArtifactError(f"model artifact {path}: config names boosted heads, no {BOOST}")
    try:
        boost = HeadBoost.from_dict(json.loads((path / BOOST).read_text()), mlp_config.heads)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, SketchstreamError) as exc:
        raise ArtifactError(f"model artifact {path}: {BOOST} is unusable: {exc}") from exc
    if boost.n_dense != mlp_config.n_dense:
        raise ArtifactError(
            f"model artifact {path}: {BOOST} reads {boost.n_dense} dense columns, the MLP "
            f"{mlp_config.n_dense}"
        )
    return boost


_RECOMMEND_FILES = (RECOMMEND_WEIGHTS, RECOMMEND_CATALOGUE)


def save_recommender(directory: Path, parts: RecommenderParts) -> dict[str, Any]:
    """Write ``parts`` as :data:`RECOMMEND_WEIGHTS` (safetensors, no pickle) and
    :data:`RECOMMEND_CATALOGUE` into ``directory``; returns the manifest's ``config.recommend``
    entry. :func:`save_model_artifact` calls it (``recommender=``): the files are checksummed
    and hashed into the version like every other."""
    from dataclasses import asdict

    from safetensors.torch import save_file

    catalogue = parts.catalogue
    levels = np.asarray(catalogue.levels)
    state = {k: v.detach().cpu().contiguous() for k, v in parts.model.state_dict().items()}
    save_file(state, str(directory / RECOMMEND_WEIGHTS), metadata={"format": "pt"})
    categories = None
    if catalogue.categories is not None:
        categories = [sorted(c) for c in catalogue.categories]
    (directory / RECOMMEND_CATALOGUE).write_text(
        json.dumps({"ids": list(catalogue.ids), "categories": categories}, separators=(",", ":"))
    )
    entry = {
        "config": parts.config.to_dict(),
        "spec": asdict(parts.spec),
        "targets": list(parts.targets),
        "items": len(catalogue),
        "levels": int(levels.shape[1]),
        "width": int(catalogue.width),
        "categories": categories is not None,
    }
    if parts.codebooks is not None:  # its own target codebooks
        entry["codebooks"], entry["codebook_files"] = _write_codebooks(
            directory, parts.codebooks, RECOMMEND_CODEBOOK
        )
    return entry


def _tuples(value: Any) -> Any:
    """JSON lists back to (nested) tuples, as the frozen configs hold them."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def load_recommender(
    path: Path, manifest: Mapping[str, Any], codebooks: Mapping[str, Any]
) -> RecommenderParts | None:
    """The :class:`RecommenderParts` of a verified artifact, or None when it has none.

    The catalogue's buckets are read off the artifact's own codebooks, and the saved
    ``InputSpec`` must be the one its aggregator config and ``RecommendConfig`` give: anything
    else is an :class:`ArtifactError` (a recommender that would read other inputs than it
    was trained on)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from sketchstream.models.channels import aggregator_config_from_dict
    from sketchstream.models.recommend import (
        Catalogue,
        InputSpec,
        RecommendConfig,
        SketchRecommender,
    )

    config = manifest.get("config", {})
    entry = config.get("recommend")
    if entry is None:
        return None
    files = manifest.get("files", {})
    missing = [name for name in _RECOMMEND_FILES if name not in files]
    if missing:
        raise ArtifactError(f"model artifact {path}: config names a recommender, no {missing}")
    try:
        saved = {
            "products": "float32",  # before int8 products: float32
            "target_depth": None,  # before its own codebooks: the state's
            "target_width": None,
            **entry["config"],
        }
        rec = RecommendConfig(**{k: _tuples(v) for k, v in saved.items()})
        spec = InputSpec(**{k: _tuples(v) for k, v in entry["spec"].items()})
        targets = tuple(entry["targets"])
        agg_config = aggregator_config_from_dict(config.get("aggregator") or {})
        want = InputSpec.build(agg_config, rec, spec.depth, spec.width)
        body = json.loads((path / RECOMMEND_CATALOGUE).read_text())
        ids = [str(i) for i in body["ids"]]
        cats = body.get("categories")
    except (KeyError, TypeError, ValueError, SketchstreamError) as exc:
        raise ArtifactError(f"model artifact {path}: bad recommender config: {exc}") from exc
    if want != spec:
        raise ArtifactError(
            f"model artifact {path}: the recommender's input spec {spec} is not the one its "
            f"aggregator and RecommendConfig give ({want}); retrain it"
        )
    if (rec.target_width is not None) != ("codebook_files" in entry):
        raise ArtifactError(
            f"model artifact {path}: the recommender's config and its codebooks disagree "
            f"(target width {rec.target_width}, own codebooks saved: "
            f"{'codebook_files' in entry})"
        )
    if "codebook_files" in entry:  # its own target codebooks, not the state's
        names, versions = entry["codebook_files"], entry.get("codebooks")
        if not isinstance(names, dict) or not isinstance(versions, dict):
            raise ArtifactError(f"model artifact {path}: bad recommender codebook entries")
        codebooks = _read_codebooks(path, names, versions)
    unknown = [m for m in targets if m not in codebooks]
    if unknown or not targets:
        raise ArtifactError(
            f"model artifact {path}: recommender targets {list(targets)} need codebooks the "
            f"artifact lacks ({unknown})"
        )
    codes = np.concatenate([codebooks[m].encode(ids) for m in targets], axis=1).astype(np.int64)
    if (codes < 0).any():
        bad = ids[int(np.flatnonzero((codes < 0).any(axis=1))[0])]
        raise ArtifactError(
            f"model artifact {path}: catalogue item {bad!r} is unknown to the recommender's "
            "codebooks"
        )
    width = codebooks[targets[0]].width
    levels = codes + np.arange(codes.shape[1])[None, :] * width
    if cats is not None and len(cats) != len(ids):
        raise ArtifactError(
            f"model artifact {path}: {len(cats)} category lists for {len(ids)} catalogue items"
        )
    catalogue = Catalogue(
        ids, levels, width, None if cats is None else [frozenset(c) for c in cats]
    )
    model = SketchRecommender(
        spec.n_features,
        levels.shape[1],
        width,
        hidden=rec.hidden,
        blocks=rec.blocks,
        dropout=rec.dropout,
        products=rec.products,
    )
    try:
        model.load_state_dict(load_file(str(path / RECOMMEND_WEIGHTS)), strict=True)
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise ArtifactError(
            f"model artifact {path}: {RECOMMEND_WEIGHTS} does not fit the recommender config: {exc}"
        ) from exc
    if not model.calibrated:
        raise ArtifactError(
            f"model artifact {path}: the recommender's int8 products were never calibrated "
            "(no input scales); retrain it"
        )
    model.eval()
    own = dict(codebooks) if "codebook_files" in entry else None
    return RecommenderParts(model, rec, spec, catalogue, targets, own)


class ArtifactStore:
    """Published model versions under one root directory, one subdirectory per version."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def publish(self, src: str | Path) -> str:
        """Verify the artifact at ``src`` and copy it in (atomically); return its version."""
        manifest = verify_model_artifact(src)
        version = manifest["version"]
        dest = self.root / version
        if dest.exists():
            verify_model_artifact(dest)
            return version
        self.root.mkdir(parents=True, exist_ok=True)
        if Path(src).resolve() == dest.resolve():  # pragma: no cover - already in place
            return version
        tmp = self.root / f".tmp-{uuid.uuid4().hex}"
        try:
            shutil.copytree(src, tmp)
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("published model %s to %s", version, self.root)
        return version

    def _manifests(self) -> list[tuple[str, str]]:
        out = []
        if not self.root.is_dir():
            return out
        for d in self.root.iterdir():
            if d.name.startswith(".") or not (d / MANIFEST).is_file():
                continue
            try:
                created = str(json.loads((d / MANIFEST).read_text()).get("created", ""))
            except (OSError, ValueError):
                log.warning("skipping %s: unreadable manifest", d)
                continue
            out.append((created, d.name))
        return out

    def versions(self) -> list[str]:
        """Published versions, newest first (by ``created``, then name)."""
        return [name for _, name in sorted(self._manifests(), reverse=True)]

    def latest(self) -> str | None:
        """The newest version, or None when nothing is published."""
        versions = self.versions()
        return versions[0] if versions else None

    def path(self, version: str) -> Path:
        """Directory of ``version``; ArtifactError when it is not published here."""
        p = self.root / version
        if not (p / MANIFEST).is_file():
            raise ArtifactError(f"model version {version!r} is not in {self.root}")
        return p

    def load(self, version: str | None = None) -> ModelBundle:
        """Load ``version`` (default: the latest), verified."""
        version = version or self.latest()
        if version is None:
            raise ArtifactError(f"no model published in {self.root}")
        return load_model_artifact(self.path(version))

    def prune(self, keep: int = 3, serving: str | None = None) -> list[str]:
        """Delete all but the ``keep`` newest versions, never ``serving``; return those deleted."""
        if keep < 0:
            raise ArtifactError(f"prune: keep={keep} must be >= 0")
        removed = []
        for version in self.versions()[keep:]:
            if version == serving:
                continue
            shutil.rmtree(self.root / version, ignore_errors=True)
            removed.append(version)
        if removed:
            log.info("pruned %d model versions from %s", len(removed), self.root)
        return removed
