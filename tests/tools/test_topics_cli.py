"""`sketchstream topics create` and `topics roundtrip` against the real broker.

Each test names its own topics through the SKETCHSTREAM_TOPIC_* variables, so it neither sees
nor changes the system's `events` topics on a shared broker.
"""

from __future__ import annotations

import asyncio
import uuid

import pytest
from sketchstream.tools.cli import app
from typer.testing import CliRunner

pytestmark = pytest.mark.kafka


@pytest.fixture
def topic_env(kafka_bootstrap, delete_after):
    tag = uuid.uuid4().hex[:8]
    env = {
        "SKETCHSTREAM_KAFKA": kafka_bootstrap,
        "SKETCHSTREAM_TOPIC_EVENTS": f"events-{tag}",
        "SKETCHSTREAM_TOPIC_PREDICTIONS": f"predictions-{tag}",
        "SKETCHSTREAM_TOPIC_DLQ": f"events-{tag}.dlq",
        "SKETCHSTREAM_TOPIC_MODELS": f"sketchstream-{tag}.models",
        "SKETCHSTREAM_TOPIC_RECOMMEND": f"recommend-{tag}",
        "SKETCHSTREAM_TOPIC_RECOMMENDATIONS": f"recommendations-{tag}",
    }
    delete_after(*(v for k, v in env.items() if k.startswith("SKETCHSTREAM_TOPIC_")))
    return env


def invoke(env, *args):
    result = CliRunner().invoke(app, ["topics", *args], env=env)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def rows(output: str) -> dict[str, list[str]]:
    """The printed table: topic -> [partitions, cleanup.policy, state]."""
    lines = output.strip().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("topic"))
    return {line.split()[0]: line.split()[1:] for line in lines[header + 1 :]}


def test_create_makes_the_six_topics_and_is_idempotent(topic_env):
    first = invoke(topic_env, "create")
    assert first.exit_code == 0, first.output
    again = invoke(topic_env, "create")
    assert again.exit_code == 0, again.output
    names = [v for k, v in topic_env.items() if k.startswith("SKETCHSTREAM_TOPIC_")]
    assert set(rows(first.output)) == set(names)
    assert {r[2] for r in rows(first.output).values()} == {"created"}
    assert {r[2] for r in rows(again.output).values()} == {"exists"}


def test_model_topic_is_compacted_with_one_partition(topic_env):
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    assert invoke(topic_env, "create").exit_code == 0
    name = topic_env["SKETCHSTREAM_TOPIC_MODELS"]

    async def describe():
        admin = AIOKafkaAdminClient(bootstrap_servers=topic_env["SKETCHSTREAM_KAFKA"])
        await admin.start()
        try:
            [topic] = await admin.describe_topics([name])
            [response] = await admin.describe_configs(
                [ConfigResource(ConfigResourceType.TOPIC, name)]
            )
        finally:
            await admin.close()
        configs = {e[0]: e[1] for e in response.resources[0][4]}
        return len(topic["partitions"]), configs["cleanup.policy"]

    assert asyncio.run(describe()) == (1, "compact")


def test_partitions_flag_overrides_the_environment(topic_env):
    result = invoke({**topic_env, "SKETCHSTREAM_PARTITIONS": "3"}, "create", "--partitions", "2")
    assert result.exit_code == 0, result.output
    table = rows(result.output)
    assert table[topic_env["SKETCHSTREAM_TOPIC_EVENTS"]][0] == "2"
    assert table[topic_env["SKETCHSTREAM_TOPIC_MODELS"]][0] == "1"


def test_partitions_come_from_the_environment_without_a_flag(topic_env):
    result = invoke({**topic_env, "SKETCHSTREAM_PARTITIONS": "3"}, "create")
    assert rows(result.output)[topic_env["SKETCHSTREAM_TOPIC_DLQ"]][0] == "3"
    assert rows(result.output)[topic_env["SKETCHSTREAM_TOPIC_RECOMMEND"]][0] == "3"


def test_replication_factor_flag_reaches_the_broker(topic_env):
    result = invoke(topic_env, "create", "--replication-factor", "2")
    assert result.exit_code == 1
    assert "replication factor" in result.output.lower()


def test_roundtrip_gets_the_event_back(topic_env):
    result = invoke(topic_env, "roundtrip")
    assert result.exit_code == 0, result.output
    assert "round trip OK" in result.output
    assert f"consumed from {topic_env['SKETCHSTREAM_TOPIC_EVENTS']}[" in result.output
