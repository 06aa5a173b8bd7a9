"""Settings: read from SKETCHSTREAM_* variables, overridden by flags, frozen, validated."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from sketchstream.stream.settings import Settings, load_settings


def test_fields_read_their_prefixed_environment_variable(monkeypatch):
    monkeypatch.setenv("SKETCHSTREAM_PARTITIONS", "7")
    monkeypatch.setenv("SKETCHSTREAM_TOPIC_EVENTS", "clicks")
    settings = load_settings()
    assert (settings.partitions, settings.topic_events) == (7, "clicks")


def test_unprefixed_variables_are_ignored(monkeypatch):
    monkeypatch.setenv("PARTITIONS", "7")
    assert load_settings().partitions == Settings.model_fields["partitions"].default


def test_flags_override_the_environment(monkeypatch):
    monkeypatch.setenv("SKETCHSTREAM_KAFKA_PORT", "9192")
    assert load_settings(kafka_port=9292).kafka_port == 9292


def test_a_flag_left_out_falls_back_to_the_environment(monkeypatch):
    monkeypatch.setenv("SKETCHSTREAM_KAFKA_PORT", "9192")
    assert load_settings(kafka_port=None).kafka_port == 9192


def test_unset_kafka_means_the_local_broker(monkeypatch):
    monkeypatch.setenv("SKETCHSTREAM_KAFKA", "  ")
    monkeypatch.setenv("SKETCHSTREAM_KAFKA_PORT", "9192")
    settings = load_settings()
    assert settings.uses_local_broker
    assert settings.bootstrap_servers == "127.0.0.1:9192"


def test_an_unknown_choice_is_rejected_naming_the_field_and_the_choices(monkeypatch):
    monkeypatch.setenv("SKETCHSTREAM_SECURITY_PROTOCOL", "PLAINTXT")
    with pytest.raises(ValidationError, match=r"security_protocol[\s\S]*'PLAINTEXT'"):
        load_settings()


def test_an_out_of_range_number_is_rejected(monkeypatch):
    monkeypatch.setenv("SKETCHSTREAM_PARTITIONS", "0")
    with pytest.raises(ValidationError, match="partitions"):
        load_settings()


def test_an_unknown_setting_is_rejected():
    with pytest.raises(ValidationError, match="partitionz"):
        load_settings(partitionz=3)


def test_settings_are_frozen():
    with pytest.raises(ValidationError):
        Settings().partitions = 3  # type: ignore[misc]


def test_the_group_member_id_is_stable_for_a_worker_and_differs_between_state_dirs(tmp_path):
    one = Settings(app_id="g", state_dir=tmp_path / "a")
    assert one.member_id == Settings(app_id="g", state_dir=tmp_path / "a").member_id
    assert one.member_id != Settings(app_id="g", state_dir=tmp_path / "b").member_id
    assert one.member_id.startswith("g-")


def test_a_group_instance_id_given_is_the_member_id(monkeypatch):
    monkeypatch.setenv("SKETCHSTREAM_GROUP_INSTANCE_ID", "worker-3")
    assert load_settings().member_id == "worker-3"


def test_a_heartbeat_slower_than_a_third_of_the_session_is_rejected_naming_both():
    with pytest.raises(ValidationError, match=r"heartbeat_interval=3\.0.*session_timeout=6\.0"):
        Settings(session_timeout=6.0, heartbeat_interval=3.0)


def test_on_error_offers_the_batch_processors_choices():
    from typing import get_args

    from sketchstream.stream.settings import OnError
    from sketchstream.stream.worker import OnError as ProcessorOnError

    assert get_args(OnError) == get_args(ProcessorOnError)
    with pytest.raises(ValidationError, match="on_error"):
        Settings(on_error="skip")


def test_the_worker_writes_snappy_batches_unless_told_otherwise(monkeypatch):
    """SKETCHSTREAM_COMPRESSION reaches the worker's producer (faust's app config); a codec
    this Python cannot write is refused naming the variable, before the worker starts."""
    from aiokafka import codec
    from sketchstream.stream import app
    from sketchstream.stream.errors import ConfigError

    assert load_settings().compression == "snappy"
    assert app.faust_app(load_settings(), web=False).conf.producer_compression_type == "snappy"
    monkeypatch.setenv("SKETCHSTREAM_COMPRESSION", "none")
    assert app.faust_app(load_settings(), web=False).conf.producer_compression_type is None
    monkeypatch.setenv("SKETCHSTREAM_COMPRESSION", "zstd")
    assert app.producer_compression(load_settings()) == "zstd"
    monkeypatch.setattr(codec, "has_zstd", lambda: False)
    with pytest.raises(ConfigError, match="SKETCHSTREAM_COMPRESSION=zstd"):
        app.producer_compression(load_settings())
    monkeypatch.setenv("SKETCHSTREAM_COMPRESSION", "brotli")
    with pytest.raises(ValidationError, match="compression"):
        load_settings()
