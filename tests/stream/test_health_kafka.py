"""`/health` and the lag metric of a `sketchstream worker` tell the truth: 503 with the reason
while the broker is unreachable or the worker has no partitions, 200 only while it serves, and
the lag of a caught-up worker is 0 after a restart."""

from __future__ import annotations

import time
from collections.abc import Callable

import orjson
import pytest
from kafka_harness import StreamEnv, WorkerProcess, produce, run, synthetic_events

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def health(worker: WorkerProcess) -> tuple[int, dict]:
    try:
        status, body = worker.get("/health")
    except OSError as exc:  # not serving its web page at all (starting, or gone)
        return 0, {"reason": repr(exc)}
    return status, orjson.loads(body)


def wait_for_health(
    worker: WorkerProcess, accept: Callable[[int, dict], bool], timeout: float, what: str
) -> tuple[int, dict]:
    deadline = time.monotonic() + timeout
    while True:
        status, body = health(worker)
        if accept(status, body):
            return status, body
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} in {timeout} s: last {status} {body}\n{worker.tail()}")
        time.sleep(0.5)


def keyed(events: list[dict]) -> list[tuple[bytes, bytes]]:
    return [(e["user"].encode(), orjson.dumps(e)) for e in events]


def test_health_is_503_while_the_broker_is_down_and_200_again_after(
    private_broker, tmp_path, artifact_dir
):
    env = StreamEnv(
        bootstrap=private_broker.bootstrap_servers, root=tmp_path, artifact_dir=artifact_dir
    )
    env.create_topics()
    worker = WorkerProcess(env, "w1").start()
    try:
        worker.wait_healthy()
        private_broker.stop()
        _, body = wait_for_health(
            worker, lambda s, b: s == 503 and "broker" in b["reason"], 30, "503 (broker down)"
        )
        assert body["status"] == "unavailable"
        private_broker.start()
        wait_for_health(worker, lambda s, b: s == 200, 60, "200 after the broker returned")
    finally:
        worker.kill()


def test_health_is_503_for_a_worker_the_group_gives_no_partition(
    kafka_bootstrap, tmp_path, artifact_dir
):
    env = StreamEnv(bootstrap=kafka_bootstrap, root=tmp_path, artifact_dir=artifact_dir)
    env.partitions = 1  # two workers, one partition: one of them has nothing to do
    env.create_topics()
    workers = [WorkerProcess(env, name).start() for name in ("w1", "w2")]
    try:
        deadline = time.monotonic() + 90
        while True:
            seen = [health(w) for w in workers]
            serving = [b for s, b in seen if s == 200]
            idle = [b for s, b in seen if s == 503 and "no partitions" in (b["reason"] or "")]
            if len(serving) == 1 and len(idle) == 1:
                break
            assert time.monotonic() < deadline, f"health of the two workers: {seen}"
            time.sleep(0.5)
        assert serving[0]["partitions"] == [0] and idle[0]["partitions"] == []
    finally:
        for w in workers:
            w.kill()
        env.delete_topics()


def test_the_lag_of_a_caught_up_worker_is_0_after_its_restart(stream_env, start_worker):
    env = stream_env
    worker = start_worker("w1")
    worker.wait_healthy()
    run(produce(env.bootstrap, env.topics["events"], keyed(synthetic_events(300))))
    wait_for_health(
        worker,
        lambda s, b: s == 200 and worker.metric("sketchstream_predictions_out_total") >= 300,
        60,
        "the 300 events processed",
    )
    assert worker.stop() == 0
    worker.start()
    worker.wait_healthy()

    def lags() -> dict[str, float]:
        _, body = worker.get("/metrics")
        prefix = 'sketchstream_consumer_lag{partition="'
        return {
            line[len(prefix) :].split('"')[0]: float(line.rsplit(" ", 1)[1])
            for line in body.decode().splitlines()
            if line.startswith(prefix)
        }

    deadline = time.monotonic() + 30
    while len(lags()) < env.partitions:  # each partition's high watermark known
        assert time.monotonic() < deadline, f"lag of {sorted(lags())} only\n{worker.tail()}"
        time.sleep(0.5)
    assert lags() == {str(p): 0.0 for p in range(env.partitions)}
