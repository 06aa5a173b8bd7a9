"""Which model a worker serves when an announced artifact is bad, against the real broker: a
`sketchstream worker` subprocess, models announced on its compacted models topic.

A refusal belongs to what is on disk, not to the version id: the same version announced again
after its files were repaired is loaded; announced again unchanged it is refused again, and
counted again. At start a tampered announcement does not hide a good artifact of the same
version in the artifact directory."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import orjson
import pytest
from kafka_harness import StreamEnv, WorkerProcess, build_tiny_artifact, consume, produce, run
from sketchstream.models.artifacts import MANIFEST, WEIGHTS
from sketchstream.stream.models_feed import model_announcement

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

REFUSED = "sketchstream_models_refused_total"


def flip_a_byte(artifact: Path) -> None:
    """Corrupt the artifact's weights in place (the same byte flipped back repairs them)."""
    weights = artifact / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))


def announce(env: StreamEnv, artifact: Path) -> str:
    """Announce the artifact at ``artifact`` under the version and hash its manifest records."""
    manifest = json.loads((artifact / MANIFEST).read_text())
    pair = model_announcement(manifest["version"], artifact, manifest["content_hash"])
    run(produce(env.bootstrap, env.topics["models"], [pair]))
    return manifest["version"]


class Traffic:
    """A few events at a time for one user, so that each batch shows the model it was scored
    with; ``versions()`` maps each sent event's offset to the ``model_version`` it got."""

    def __init__(self, env: StreamEnv) -> None:
        self.env, self.k, self.sent = env, 0, []

    def send(self, n: int = 5) -> None:
        pairs = []
        for _ in range(n):
            event = {"user": "u1", "item": f"i{self.k % 60}", "action": "view", "ts": 1e9 + self.k}
            event["event_id"] = f"e{self.k}"
            pairs.append((b"u1", orjson.dumps(event)))
            self.k += 1
        self.sent += run(produce(self.env.bootstrap, self.env.topics["events"], pairs))

    def versions(self) -> dict[tuple[int, int], str]:
        records = run(consume(self.env.bootstrap, self.env.topics["predictions"], timeout=20))
        out = {}
        for r in records:
            p = orjson.loads(r.value)
            out[(p["event"]["partition"], p["event"]["offset"])] = p["model_version"]
        return out

    def latest_version(self, timeout: float = 60.0) -> str:
        """The model version of the last event sent, once it has its prediction."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.versions().get(self.sent[-1])
            if got is not None:
                return got
            time.sleep(0.5)
        raise AssertionError(f"no prediction for event {self.sent[-1]} in {timeout}s")


def wait_for(predicate, timeout: float, what: str, worker: WorkerProcess) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}\n{worker.tail()}")


def test_a_tampered_version_is_refused_and_the_same_version_repaired_is_swapped_in(
    stream_env, start_worker, tmp_path
):
    env = stream_env
    [old] = [p.name for p in env.artifact_dir.iterdir()]
    worker = start_worker("w1")
    worker.wait_healthy()
    traffic = Traffic(env)
    traffic.send()
    assert traffic.latest_version() == old

    new = build_tiny_artifact(tmp_path / "published", seed=1)
    artifact = tmp_path / "published" / new
    flip_a_byte(artifact)
    announce(env, artifact)
    wait_for(lambda: worker.metric(REFUSED) == 1, 60, "the tampered version's refusal", worker)
    traffic.send()
    assert traffic.latest_version() == old, "a refused version must not be served"

    announce(env, artifact)  # announced again, still bad: refused again, and counted
    wait_for(lambda: worker.metric(REFUSED) == 2, 60, "the second refusal", worker)
    traffic.send()
    assert traffic.latest_version() == old

    flip_a_byte(artifact)  # repaired: the same bytes as when it was saved
    announce(env, artifact)

    def swapped() -> bool:
        traffic.send(1)
        return traffic.latest_version() == new

    wait_for(swapped, 90, f"the repaired version {new} to be served", worker)
    assert worker.metric(REFUSED) == 2
    assert worker.metric("sketchstream_model_swaps_total") == 1
    assert "refusing model" in worker.tail(400)


def test_a_worker_starts_on_the_good_artifact_when_only_a_tampered_copy_is_announced(
    kafka_bootstrap, tmp_path
):
    """The artifact directory holds a good copy of the very version whose announced copy is
    tampered with (the announcement's path is elsewhere): the worker refuses the announced
    copy, says so, and serves the good one."""
    artifact_dir = tmp_path / "artifacts"
    version = build_tiny_artifact(artifact_dir)
    elsewhere = tmp_path / "shared-drive" / version
    shutil.copytree(artifact_dir / version, elsewhere)
    flip_a_byte(elsewhere)
    env = StreamEnv(bootstrap=kafka_bootstrap, root=tmp_path, artifact_dir=artifact_dir)
    env.create_topics()
    worker = WorkerProcess(env, "w1")
    try:
        announce(env, elsewhere)
        worker.start().wait_healthy()
        traffic = Traffic(env)
        traffic.send()
        assert traffic.latest_version() == version
        assert worker.metric(REFUSED) == 1
        assert "fails its checksum" in worker.tail(400)
    finally:
        worker.kill()
        env.delete_topics()
