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
