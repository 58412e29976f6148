"""CLI behaviour that needs no broker: help, usage errors, fail-fast without a broker."""

from __future__ import annotations

import os
import subprocess
import sys


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-c", "from streamml.cli import main; main()", *args]
    return subprocess.run(cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=60)


def test_help_lists_the_commands() -> None:
    out = _run("--help").stdout
    for command in ("topics", "produce", "tail"):
        assert command in out


def test_without_broker_the_cli_says_what_to_run() -> None:
    done = _run(
        "topics", "list", env={"STREAMML_BOOTSTRAP_SERVERS": "127.0.0.1:1", "STREAMML_BROKER_TIMEOUT_S": "1"}
    )
    assert done.returncode == 2
    assert "make kafka-up" in done.stderr
    assert "Traceback" not in done.stderr


def test_produce_needs_a_target() -> None:
    done = _run("produce", "synthetic:classification", "--limit", "1")
    assert done.returncode == 2
    assert "exactly one of --topic or --pipeline" in done.stderr


def test_unknown_source_is_explained() -> None:
    done = _run("produce", "nowhere:thing", "--topic", "t", env={"STREAMML_BOOTSTRAP_SERVERS": "127.0.0.1:1"})
    assert done.returncode == 2
    assert "nowhere:thing" in done.stderr and "Traceback" not in done.stderr
