"""Channel configuration (models/channels.py): validation, the default channels, and the JSON
round trip a model artifact stores."""

from __future__ import annotations

import json
import math

import pytest
from sketchstream.models.channels import (
    AggregatorConfig,
    Channel,
    aggregator_config_from_dict,
    aggregator_config_to_dict,
    default_config,
)
from sketchstream.models.errors import ModelError
from test_aggregator import ACTIONS, _config


def test_default_config_has_liked_and_disliked_channels_per_modality() -> None:
    cfg = default_config()
    assert {c.modality for c in cfg.channels} == {"interactions", "metadata"}
    assert cfg.actions == ("rate",)
    assert {c.min_value for c in cfg.channels} == {4.0, None}


def test_config_rejects_unknown_channel_actions() -> None:
    with pytest.raises(ModelError, match="unknown actions"):
        AggregatorConfig((Channel("x", "interactions", frozenset({"lik"})),), actions=ACTIONS)


def test_the_json_form_round_trips_action_sets_and_infinite_half_lives() -> None:
    config = _config()
    doc = json.loads(json.dumps(aggregator_config_to_dict(config)))
    assert doc["channels"][0]["actions"] == ["rate"]
    assert doc["channels"][0]["half_life_s"] == "inf"
    back = aggregator_config_from_dict(doc)
    assert back == config
    assert back.fingerprint() == config.fingerprint()
    assert math.isinf(back.channels[0].half_life_s)
