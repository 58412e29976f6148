"""ModelHistory: which version is live and what a rollback restores, from the promotion decisions."""

from __future__ import annotations

from typing import Any

import pytest

from streamml.control import ModelHistory, find_version
from streamml.errors import ValidationError


def decision(version: int, action: str = "PROMOTE", model_name: str = "online") -> dict[str, Any]:
    return {
        "pipeline": "p",
        "model_name": model_name,
        "action": action,
        "version": version,
        "previous_version": None,
        "actor": "test",
        "reason": "",
        "metrics": {},
        "decided_at": 0,
    }


def live_version(history: ModelHistory) -> int | None:
    live = history.live()
    return None if live is None else int(live["version"])


def previous_version(history: ModelHistory) -> int | None:
    previous = history.previous_live()
    return None if previous is None else int(previous["version"])


def stack(history: ModelHistory) -> list[int]:
    return [d["version"] for d in history.live_stack()]


def test_empty_history_has_nothing_live() -> None:
    history = ModelHistory()
    assert history.live() is None and history.previous_live() is None and history.live_stack() == []


def test_promote_then_rollback_twice_then_promote_again() -> None:
    history = ModelHistory()
    for v in (1, 2, 3):
        history.decisions.append(decision(v))
    assert (live_version(history), previous_version(history)) == (3, 2)
    assert stack(history) == [1, 2, 3]

    # `model rollback` restores previous_live() as a ROLLBACK decision
    history.decisions.append(decision(previous_version(history) or 0, "ROLLBACK"))
    assert (live_version(history), previous_version(history)) == (2, 1)
    assert history.live() == decision(2, "ROLLBACK")

    history.decisions.append(decision(previous_version(history) or 0, "ROLLBACK"))
    assert (live_version(history), previous_version(history)) == (1, None)
    assert stack(history) == [1]

    history.decisions.append(decision(4))
    assert (live_version(history), previous_version(history)) == (4, 1)
    assert stack(history) == [1, 4]


def test_discard_and_shadow_do_not_change_what_is_live() -> None:
    history = ModelHistory(
        decisions=[decision(1), decision(2), decision(3, "SHADOW"), decision(4, "DISCARD")]
    )
    assert (live_version(history), previous_version(history)) == (2, 1)
    assert stack(history) == [1, 2]


def test_promoting_the_live_version_again_is_not_a_new_entry() -> None:
    history = ModelHistory(decisions=[decision(1), decision(2), decision(2)])
    assert stack(history) == [1, 2] and previous_version(history) == 1


def test_same_version_number_of_different_models_are_different_entries() -> None:
    history = ModelHistory(decisions=[decision(1, model_name="online"), decision(1, model_name="batch")])
    assert [(d["model_name"], d["version"]) for d in history.live_stack()] == [("online", 1), ("batch", 1)]
    assert history.live() is not None and history.live()["model_name"] == "batch"


def version(v: int, model_name: str = "online") -> dict[str, Any]:
    return {"pipeline": "p", "model_name": model_name, "version": v}


def test_find_version() -> None:
    history = ModelHistory(versions=[version(1), version(2), version(1, "batch")])
    assert find_version(history, 2, None) == version(2)
    assert find_version(history, 1, "batch") == version(1, "batch")
    with pytest.raises(ValidationError, match=r"no version 7"):
        find_version(history, 7, None)
    with pytest.raises(ValidationError, match=r"no version 2"):
        find_version(history, 2, "batch")
    with pytest.raises(ValidationError, match=r"version 1 exists for several models: pass --model"):
        find_version(history, 1, None)
