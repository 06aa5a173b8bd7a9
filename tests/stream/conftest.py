"""Fixtures of the streaming tests (the harness itself lives in ``kafka_harness``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kafka_harness import StreamEnv, WorkerProcess, build_tiny_artifact


@pytest.fixture
def artifact_dir(tmp_path: Path) -> Path:
    """An artifact directory holding one tiny model."""
    root = tmp_path / "artifacts"
    build_tiny_artifact(root)
    return root


@pytest.fixture
def stream_env(kafka_bootstrap: str, tmp_path: Path, artifact_dir: Path) -> Iterator[StreamEnv]:
    env = StreamEnv(bootstrap=kafka_bootstrap, root=tmp_path, artifact_dir=artifact_dir)
    env.create_topics()
    yield env
    env.delete_topics()


@pytest.fixture
def start_worker(stream_env: StreamEnv) -> Iterator[Any]:
    """Factory: ``start_worker(name, *cli_args)`` → a running :class:`WorkerProcess`; all are
    stopped at the end of the test."""
    workers: list[WorkerProcess] = []

    def start(name: str = "w1", *args: str) -> WorkerProcess:
        w = WorkerProcess(stream_env, name, *args).start()
        workers.append(w)
        return w

    yield start
    for w in workers:
        w.kill()
