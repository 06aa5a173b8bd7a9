"""docker-compose.yml, checked without a Docker engine: the services exist, Kafka is the
version the local broker runs, and the sketchstream services set only real settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from sketchstream.stream.settings import ENV_PREFIX, Settings
from sketchstream.tools.broker import KAFKA_VERSION

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # the "- NAME=value" form
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): str(v) for k, v in env.items()}


def test_it_has_kafka_worker_and_refresh(compose):
    assert {"kafka", "worker", "refresh"} <= set(compose["services"])


def test_kafka_is_the_version_the_local_broker_runs(compose):
    assert compose["services"]["kafka"]["image"] == f"apache/kafka:{KAFKA_VERSION}"


def test_kafka_runs_kraft_without_zookeeper(compose):
    env = _environment(compose["services"]["kafka"])
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert not any("ZOOKEEPER" in name for name in env)


def test_worker_and_refresh_are_built_here_and_run_their_commands(compose):
    worker, refresh = compose["services"]["worker"], compose["services"]["refresh"]
    assert worker["build"] == refresh["build"] == "."
    assert worker["command"] == ["worker"]
    assert refresh["command"] == ["refresh", "--every", "1h"]
    assert (ROOT / "Dockerfile").is_file()


def test_every_sketchstream_variable_is_a_settings_field(compose):
    variables = {
        (name, service)
        for service, spec in compose["services"].items()
        for name in _environment(spec)
        if name.startswith(ENV_PREFIX)
    }
    assert variables, "the sketchstream services should be configured by SKETCHSTREAM_*"
    unknown = sorted(
        f"{name} ({service})"
        for name, service in variables
        if name.removeprefix(ENV_PREFIX).lower() not in Settings.model_fields
    )
    assert unknown == []


def test_the_services_point_at_the_compose_kafka(compose):
    for service in ("worker", "refresh"):
        assert _environment(compose["services"][service])["SKETCHSTREAM_KAFKA"] == "kafka:19092"


def test_the_dockerfile_sets_only_settings_fields():
    import re

    names = set(re.findall(r"\b(SKETCHSTREAM_[A-Z0-9_]+)=", (ROOT / "Dockerfile").read_text()))
    assert names
    unknown = [n for n in names if n.removeprefix(ENV_PREFIX).lower() not in Settings.model_fields]
    assert unknown == []
