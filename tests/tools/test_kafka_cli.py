"""`sketchstream kafka start/status/logs/stop` on a second broker (own ports, temporary data
dir), so the session's broker that other tests use is never touched.

The tests run in file order: the last one stops the broker the module fixture started.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from sketchstream.stream.settings import Settings
from sketchstream.tools.broker import LocalBroker
from sketchstream.tools.cli import app
from sketchstream.tools.kafka_io import free_port
from typer.testing import CliRunner

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


class SecondBroker:
    started: Any = None  # the result of `kafka start` in the module fixture

    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.controller_port = free_port()
        self.data_dir = data_dir
        # SKETCHSTREAM_KAFKA empty: the commands act on the local broker even where the
        # test session itself runs against other servers.
        self.env = {
            "SKETCHSTREAM_KAFKA": "",
            "SKETCHSTREAM_KAFKA_PORT": str(self.port),
            "SKETCHSTREAM_KAFKA_CONTROLLER_PORT": str(self.controller_port),
        }

    def invoke(self, *args: str, **env: str):
        result = CliRunner().invoke(
            app, ["kafka", *args, "--data-dir", str(self.data_dir)], env={**self.env, **env}
        )
        if result.exception and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result

    def local_broker(self) -> LocalBroker:
        settings = Settings(kafka_port=self.port, kafka_controller_port=self.controller_port)
        return LocalBroker(settings, self.data_dir)

    def java_processes(self) -> list[int]:
        """Live JVMs whose command line names this broker's data dir."""
        found = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                args = Path(entry.path, "cmdline").read_bytes().decode(errors="replace")
                state = Path(entry.path, "stat").read_text().rsplit(")", 1)[-1].split()[0]
            except OSError:
                continue
            if "java" in args and str(self.data_dir) in args and state != "Z":
                found.append(int(entry.name))
        return found


@pytest.fixture(scope="module")
def second(tmp_path_factory) -> SecondBroker:
    broker = SecondBroker(tmp_path_factory.mktemp("second-broker"))
    broker.started = broker.invoke("start")
    yield broker
    broker.local_broker().stop()


def test_start_starts_a_broker_that_answers(second):
    assert second.started.exit_code == 0, second.started.output
    assert "started" in second.started.output
    status = second.invoke("status")
    assert status.exit_code == 0, status.output
    assert f"answering at 127.0.0.1:{second.port}" in status.output


def test_starting_twice_says_it_is_already_running(second):
    again = second.invoke("start")
    assert again.exit_code == 0, again.output
    assert "already running" in again.output


def test_a_second_start_on_another_port_with_the_same_data_dir_is_refused(second):
    other = second.invoke("start", "--port", str(free_port()))
    assert other.exit_code == 1
    assert f"already runs (pid {second.local_broker().pid()}) on port {second.port}" in other.output


def test_logs_show_the_broker_output(second):
    logs = second.invoke("logs", "--lines", "400")
    assert logs.exit_code == 0
    assert "Kafka Server started" in logs.output


def test_status_fails_after_stop_and_no_java_process_is_left(second):
    assert second.java_processes(), "the broker should run before it is stopped"
    stopped = second.invoke("stop")
    assert stopped.exit_code == 0, stopped.output
    assert "stopped" in stopped.output
    status = second.invoke("status")
    assert status.exit_code != 0
    assert "not running" in status.output
    assert second.java_processes() == []
    assert "not running" in second.invoke("stop").output  # stopping again is harmless


def test_status_port_flag_overrides_the_environment(second):
    port = free_port()
    result = second.invoke("status", "--port", str(port))
    assert result.exit_code == 1
    assert f"127.0.0.1:{port}" in result.output


def test_bad_port_in_the_environment_is_refused_with_its_name(second):
    result = second.invoke("status", SKETCHSTREAM_KAFKA_PORT="ninety")
    assert result.exit_code == 2
    assert "SKETCHSTREAM_KAFKA_PORT='ninety'" in result.output


def test_missing_java_is_reported_with_what_to_install(second, tmp_path):
    result = second.invoke("start", PATH=str(tmp_path), JAVA_HOME="")
    assert result.exit_code == 1
    assert "install a Java 17+ runtime" in result.output
