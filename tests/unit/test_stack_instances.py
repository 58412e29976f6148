"""streamml.stack with N instances per service: names, counts, addressing one instance, exit records."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from streamml import stack as st


def test_instance_counts_from_the_command_line() -> None:
    assert st.parse_instances("2") == dict.fromkeys(st.SERVICES, 2)
    counts = st.parse_instances("learner=2, features=3")
    assert (counts["learner"], counts["features"], counts["predictor"]) == (2, 3, 1)
    for bad in ("0", "learner", "ghost=2", "learner=0", "learner=x"):
        with pytest.raises(ValueError):
            st.parse_instances(bad)


def test_instance_zero_keeps_the_service_name() -> None:
    assert st.label_of("learner", 0) == "learner"
    assert st.label_of("learner", 1) == "learner-1"


def fake(stack: st.Stack, name: str, index: int, proc: subprocess.Popen[bytes] | None = None) -> None:
    svc = st.ServiceProcess(name, proc, Path(f"/nonexistent/{name}-{index}.log"), 1, 2, {}, index, str(index))
    stack.services[svc.label] = svc


def test_one_instance_or_all_of_a_service_are_addressed(tmp_path: Path) -> None:
    stack = st.Stack.create({}, tmp_path, {"learner": 2, "features": 1})
    assert (stack.count("learner"), stack.count("features"), stack.count("monitor")) == (2, 1, 1)
    for i in range(2):
        fake(stack, "learner", i)
    fake(stack, "features", 0)
    assert [s.label for s in stack.instances_of("learner")] == ["learner", "learner-1"]
    assert [s.label for s in stack._resolve("learner", None)] == ["learner", "learner-1"]
    assert [s.label for s in stack._resolve("learner", 1)] == ["learner-1"]
    assert [s.label for s in stack._resolve("learner-1", None)] == ["learner-1"]
    assert stack.instance("learner", 1).instance_id == "1"
    assert stack.dead() == ["learner", "learner-1", "features"]  # never started: not running
    with pytest.raises(ValueError):
        st.Stack.create({}, tmp_path, {"learner": 0})


def test_exits_are_recorded_once_per_run_with_the_signal(tmp_path: Path) -> None:
    stack = st.Stack.create({}, tmp_path, {"learner": 2})
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    quitter = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    fake(stack, "learner", 0, sleeper)
    fake(stack, "learner", 1, quitter)
    quitter.wait(30)
    assert stack.kill("learner", 0) == -signal.SIGKILL
    assert stack.stop("learner", index=1) == 3  # had exited by itself
    exits = stack.exit_codes()
    assert [(e.signal, e.returncode) for e in exits["learner"]] == [("SIGKILL", -9)]
    assert [(e.signal, e.returncode) for e in exits["learner-1"]] == [(None, 3)]
    stack.stop_all()  # nothing alive: records nothing more
    assert len(stack.exit_codes()["learner"]) == 1
