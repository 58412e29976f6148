"""Who answers a training request, once, and which version number it gets (no broker: fakes)."""

from __future__ import annotations

import asyncio
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any

import pytest

from services.trainer import app as trainer_app
from services.trainer import requests as requests_module
from services.trainer.requests import Owned, OwnershipLostError, RequestLoop
from streamml.codec import codec_for
from streamml.runtime import Output
from streamml.settings import Settings
from streamml.topics import Catalogue
from streams.trainer import owner_partition, route_request
from tests.unit.fakes import FakeMessage


def settings() -> Settings:
    return Settings(  # type: ignore[call-arg]
        bootstrap_servers="127.0.0.1:1", topic_prefix="p", default_partitions=3, _env_file=None
    )


# -- routing -----------------------------------------------------------------------------------------------
def test_owner_partition_is_where_librdkafka_puts_a_request_keyed_by_its_pipeline() -> None:
    for name in ("agrawal", "phishing", "a", "x" * 63):
        assert owner_partition(name, 3) == zlib.crc32(name.encode()) % 3
    assert owner_partition("agrawal", 1) == 0


def test_a_request_is_answered_by_its_pipelines_partition_once() -> None:
    home = owner_partition("agrawal", 3)
    assert route_request("r1", "agrawal", home, 3, set()).action == "answer"
    skip = route_request("r1", "agrawal", home, 3, {"r1"})
    assert skip.action == "skip" and "answered before" in skip.reason
    other = (home + 1) % 3
    forward = route_request("r2", "agrawal", other, 3, set())
    assert (forward.action, forward.partition) == ("forward", home)  # keyed otherwise: to its owner
    assert route_request("r1", "agrawal", other, 3, {"r1"}).action == "skip"  # answered: not forwarded


# -- the request loop with a fake trainer ------------------------------------------------------------------
def request_message(partition: int, offset: int, value: bytes) -> FakeMessage:
    """A record of the training-requests topic."""
    return FakeMessage("p.training-requests", value, offset, partition=partition)


def request(request_id: str, pipeline: str = "agrawal") -> dict[str, Any]:
    return {
        "request_id": request_id, "pipeline": pipeline, "model_name": "batch",
        "estimator_spec": "sklearn.tree.DecisionTreeClassifier", "params": {}, "param_grid": {},
        "data_ranges": [], "time_from": 0, "time_to": None, "validation_split": 0.2, "seed": 1,
        "reason": "t", "requested_by": "t", "requested_at": 0,
    }  # fmt: skip


def encoded(record: dict[str, Any]) -> bytes:
    return codec_for("TrainingRequest").encode(record)


Committed = list[tuple[int, int, list[Output]]]


def loop_with_fakes(monkeypatch: pytest.MonkeyPatch, fail_commits: int = 0) -> tuple[RequestLoop, Committed]:
    """A RequestLoop owning every partition, whose transactions are recorded (the first `fail_commits`
    lose the partition instead), and a trainer whose fit returns at once."""
    trainer = trainer_app.Trainer(settings(), Catalogue(settings()), b"k")
    monkeypatch.setattr(trainer_app, "plan_request", lambda req, _s, _c: req)
    monkeypatch.setattr(trainer, "read_and_train", lambda plan: ([], object()))

    def version_output(plan: Any, _outcome: Any, version: int, _ranges: Any) -> Output:
        return Output("p.model-versions", f"{plan['pipeline']}/batch/{version}".encode(), b"v")

    monkeypatch.setattr(trainer, "version_output", version_output)
    monkeypatch.setattr(
        trainer_app, "result_record", lambda req, status, **kw: {**req, "status": status, **kw}
    )
    stub = type("C", (), {"encode": staticmethod(lambda r: b"result")})()
    monkeypatch.setattr(trainer_app, "encoder_for", lambda _topic, _name: stub)
    loop = RequestLoop(trainer)
    for p in range(3):
        loop._owned[p] = Owned(p, producer=object(), ready=True)
    loop._consumer = object()  # type: ignore[assignment]
    committed: Committed = []
    failures = [fail_commits]

    async def commit(owned: Owned, offset: int, outputs: list[Output]) -> None:
        if failures[0] > 0:
            failures[0] -= 1
            raise OwnershipLostError("fenced")
        committed.append((owned.partition, offset, outputs))
        owned.next_offset = offset + 1

    async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)

    monkeypatch.setattr(loop, "commit", commit)
    monkeypatch.setattr(loop, "in_thread", in_thread)
    return loop, committed


def versions_of(committed: Committed) -> list[bytes | None]:
    return [o.key for _p, _off, outs in committed for o in outs if o.topic == "p.model-versions"]


def test_versions_are_numbered_per_pipeline_and_model_and_each_request_answered_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def scenario() -> tuple[RequestLoop, Committed]:
        loop, committed = loop_with_fakes(monkeypatch)
        loop.trainer.state.on_version({"pipeline": "agrawal", "model_name": "batch", "version": 4})
        loop.trainer.state.on_version({"pipeline": "agrawal", "model_name": "online", "version": 40})
        home, other = owner_partition("agrawal", 3), owner_partition("phishing", 3)
        msgs = [
            request_message(home, 0, encoded(request("a"))),
            request_message(home, 1, encoded(request("b"))),
            request_message(home, 2, encoded(request("a"))),  # the same request again: skipped
            request_message(other, 0, encoded(request("c", "phishing"))),
            request_message(home, 1, encoded(request("b"))),  # delivered again after a pause: ignored
        ]
        for msg in msgs:
            await loop.handle(loop._owned[msg.partition()], msg)  # type: ignore[arg-type]
        return loop, committed

    loop, committed = asyncio.run(scenario())
    assert versions_of(committed) == [b"agrawal/batch/5", b"agrawal/batch/6", b"phishing/batch/1"]
    assert [(len(outs), off) for _p, off, outs in committed] == [(2, 0), (2, 1), (0, 2), (2, 0)]
    assert all(outs[-1].topic == "p.training-results" for _p, _o, outs in committed if outs)
    assert loop.trainer.answered == {"a", "b", "c"}
    assert loop.trainer.state.next_version("agrawal", "batch") == 7


def test_an_answer_that_did_not_commit_takes_no_number_and_is_not_marked_answered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def scenario() -> tuple[RequestLoop, Committed]:
        loop, committed = loop_with_fakes(monkeypatch, fail_commits=1)
        home = owner_partition("agrawal", 3)
        with pytest.raises(OwnershipLostError):
            await loop.handle(loop._owned[home], request_message(home, 0, encoded(request("a"))))  # type: ignore[arg-type]
        assert loop.trainer.answered == set()
        await loop.handle(loop._owned[home], request_message(home, 0, encoded(request("a"))))  # type: ignore[arg-type]
        return loop, committed

    _loop, committed = asyncio.run(scenario())
    assert versions_of(committed) == [b"agrawal/batch/1"]  # the failed answer's number is free again


def test_a_request_keyed_otherwise_is_forwarded_to_its_pipelines_partition(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def scenario() -> Committed:
        loop, committed = loop_with_fakes(monkeypatch)
        home = owner_partition("agrawal", 3)
        wrong = (home + 1) % 3
        value = encoded(request("a"))
        await loop.handle(loop._owned[wrong], request_message(wrong, 7, value))  # type: ignore[arg-type]
        return committed

    committed = asyncio.run(scenario())
    [(partition, offset, [out])] = committed
    assert (partition, offset) == ((owner_partition("agrawal", 3) + 1) % 3, 7)
    home = owner_partition("agrawal", 3)
    assert (out.topic, out.key, out.partition) == ("p.training-requests", b"agrawal", home)
    assert out.value == encoded(request("a"))  # unchanged: its owner answers it


def test_a_request_whose_partition_moved_while_training_is_left_to_the_new_owner(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def scenario() -> tuple[RequestLoop, Committed]:
        loop, committed = loop_with_fakes(monkeypatch)
        home = owner_partition("agrawal", 3)
        owned = loop._owned[home]

        def revoked_during_fit(plan: Any) -> Any:
            loop._owned.pop(home)  # the rebalance callback ran while the fit was in its thread
            return [], object()

        monkeypatch.setattr(loop.trainer, "read_and_train", revoked_during_fit)
        await loop.handle(owned, request_message(home, 0, encoded(request("a"))))  # type: ignore[arg-type]
        return loop, committed

    loop, committed = asyncio.run(scenario())
    assert committed == [] and loop.trainer.answered == set()


def test_an_invalid_request_is_skipped_with_an_alert_and_its_offset_committed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def scenario() -> tuple[RequestLoop, Committed]:
        loop, committed = loop_with_fakes(monkeypatch)
        skipped: list[int] = []
        monkeypatch.setattr(loop.trainer.control, "skip", lambda _t, _p, off, _e, _r: skipped.append(off))
        await loop.handle(loop._owned[0], request_message(0, 3, b"junk"))  # type: ignore[arg-type]
        bad_name = encoded(request("x", "Not A Pipeline"))
        await loop.handle(loop._owned[0], request_message(0, 4, bad_name))  # type: ignore[arg-type]
        assert skipped == [3, 4]
        return loop, committed

    _loop, committed = asyncio.run(scenario())
    assert committed == [(0, 3, []), (0, 4, [])]


class _WedgedProducer:
    """A transactional producer whose send_offsets_to_transaction never returns (librdkafka 5456/5511)."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def begin_transaction(self) -> None:
        pass

    def send_offsets_to_transaction(self, *_a: Any) -> None:
        self.release.wait(30)

    def commit_transaction(self, _timeout: float) -> None:
        pass


class _PausingConsumer:
    def consumer_group_metadata(self) -> object:
        return object()

    def pause(self, _parts: Any) -> None:
        pass

    def resume(self, _parts: Any) -> None:
        pass

    def consume(self, *_a: Any) -> list[Any]:
        return []


def test_a_wedged_answer_transaction_is_given_up_as_a_lost_answer_without_holding_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The call that never returns is left on its daemon thread; the answer is lost (answered again by
    the partition's next preparation, with a new producer), and the event loop was free meanwhile."""
    monkeypatch.setattr(requests_module, "TRANSACT_WEDGED_S", 0.5)
    trainer = trainer_app.Trainer(settings(), Catalogue(settings()), b"k")
    loop = RequestLoop(trainer)
    producer = _WedgedProducer()
    owned = loop._owned[0] = Owned(0, producer=producer, ready=True)
    loop._consumer = _PausingConsumer()  # type: ignore[assignment]
    ticks = 0

    async def scenario() -> None:
        nonlocal ticks

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.05)
                ticks += 1

        beat = asyncio.ensure_future(ticker())
        try:
            with pytest.raises(OwnershipLostError, match="wedged"):
                await loop.commit(owned, 7, [])
        finally:
            beat.cancel()

    started = time.monotonic()
    asyncio.run(scenario())
    assert time.monotonic() - started < 5 and ticks >= 5  # the loop went on while the call hung
    assert owned.next_offset == -1  # not answered
    producer.release.set()
