"""Every command and subcommand answers ``--help``, including those added later: the test walks
the click tree of ``sketchstream.tools.cli.app``. Options that stand for a setting say which."""

from __future__ import annotations

import re

import pytest
import typer.main
from sketchstream.stream.settings import ENV_PREFIX, Settings
from sketchstream.tools.cli import app
from typer.testing import CliRunner


def _walk(command, path: tuple[str, ...] = ()):
    # Duck-typed: typer builds its tree on its own copy of click's classes.
    yield path, command
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from _walk(sub, (*path, name))


COMMANDS = list(_walk(typer.main.get_command(app)))


@pytest.mark.parametrize(
    "path", [path for path, _ in COMMANDS], ids=lambda p: " ".join(p) or "sketchstream"
)
def test_help_works(path):
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_the_tree_has_the_broker_and_topic_commands():
    paths = {path for path, _ in COMMANDS}
    assert {("kafka", c) for c in ("start", "status", "stop", "logs")} <= paths
    assert {("topics", "create"), ("topics", "roundtrip")} <= paths


@pytest.mark.parametrize(
    ("path", "option"),
    [
        (path, param)
        for path, command in COMMANDS
        for param in command.params
        if param.param_type_name == "option" and ENV_PREFIX in (getattr(param, "help", "") or "")
    ],
    ids=lambda x: " ".join(x) if isinstance(x, tuple) else x.name,
)
def test_a_setting_option_names_a_settings_field_and_defers_to_it(path, option):
    """An option whose help names SKETCHSTREAM_X stands for Settings field x: it defaults to
    None, so the command's load_settings() falls back to the environment."""
    [var] = re.findall(ENV_PREFIX + r"[A-Z0-9_]+", option.help)
    field = var.removeprefix(ENV_PREFIX).lower()
    assert field in Settings.model_fields, f"{' '.join(path)} {option.opts}: no field {field}"
    assert option.default is None, f"{' '.join(path)} {option.opts} must default to None"


@pytest.mark.parametrize(
    ("variable", "value"),
    [("SKETCHSTREAM_BATCH_SIZE", "0"), ("SKETCHSTREAM_WEB_PORT", "ninety")],
)
def test_the_worker_refuses_a_bad_setting_with_a_message_not_a_traceback(variable, value):
    result = CliRunner().invoke(app, ["worker"], env={variable: value})
    assert result.exit_code == 2, result.output
    assert f"invalid setting {variable}={value!r}" in result.output
    assert "Traceback" not in result.output
