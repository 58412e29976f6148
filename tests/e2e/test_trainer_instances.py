"""Two trainer processes share the requests: every request answered exactly once, versions unique per
(pipeline, model), also when one instance is killed in the middle of a burst."""

from __future__ import annotations

import collections
import random
import signal
import time
import uuid
from typing import Any

from confluent_kafka import Message

from streamml.codec import codec_for
from streamml.stack import Stack
from streams.trainer import owner_partition
from tests.e2e.conftest import System, SystemFactory

PIPELINES = ("agrawal", "phishing")  # partitions 0 and 1 of a 2-partition requests topic
N_VECTORS = 400
TREE = "sklearn.tree.DecisionTreeClassifier"


def _vectors(system: System, pipeline: str) -> dict[str, Any]:
    """Labelled feature vectors written straight to the features topic; the range that holds them."""
    codec = codec_for("FeatureVector")
    rng = random.Random(pipeline)
    producer = system.producer()
    topic = system.catalogue.features(pipeline).name
    for i in range(N_VECTORS):
        x, y = rng.random(), rng.random()
        record = {
            "event_id": f"{pipeline}-{i}", "key": None, "pipeline": pipeline, "pipeline_revision": 1,
            "features": {"x": x, "y": y}, "label": x > y, "event_time": 0, "feature_time": 0, "source": None,
        }  # fmt: skip
        producer.produce(topic, codec.encode(record), partition=0)
    assert producer.flush(30) == 0
    return {"topic": topic, "partition": 0, "start_offset": 0, "end_offset": N_VECTORS}


def _request(request_id: str, pipeline: str, data_range: dict[str, Any]) -> dict[str, Any]:
    return {
        "request_id": request_id, "pipeline": pipeline, "model_name": "batch", "estimator_spec": TREE,
        "params": {}, "param_grid": {}, "data_ranges": [data_range], "time_from": None, "time_to": None,
        "validation_split": 0.2, "seed": 7, "reason": "e2e", "requested_by": "test",
        "requested_at": int(time.time() * 1000),
    }  # fmt: skip


def _send(system: System, requests: list[dict[str, Any]], partition: dict[str, int] | None = None) -> None:
    producer = system.producer()
    codec = codec_for("TrainingRequest")
    topic = system.catalogue.training_requests().name
    for r in requests:
        pinned = (partition or {}).get(r["request_id"])
        if pinned is None:
            producer.produce(topic, codec.encode(r), r["pipeline"].encode())
        else:  # keyed otherwise: lands away from its pipeline's partition
            producer.produce(topic, codec.encode(r), b"elsewhere", partition=pinned)
    assert producer.flush(10) == 0


def _committed(
    system: System, topic: str, schema: str, until: Any, timeout_s: float = 120
) -> list[dict[str, Any]]:
    msgs = system.read(topic, lambda m: until(system.records(m, schema)), timeout_s, read_committed=True)
    return system.records(msgs, schema)


def _answers(system: System, ids: set[str]) -> list[dict[str, Any]]:
    return _committed(
        system, system.catalogue.training_results().name, "TrainingResult",
        lambda rs: ids <= {r["request_id"] for r in rs},
    )  # fmt: skip


def _check_once(results: list[dict[str, Any]], versions: list[Message] | list[dict[str, Any]]) -> None:
    counts = collections.Counter(r["request_id"] for r in results)
    assert all(c == 1 for c in counts.values()), {k: c for k, c in counts.items() if c > 1}
    assert all(r["status"] == "SUCCEEDED" for r in results), [
        r for r in results if r["status"] != "SUCCEEDED"
    ]
    numbers = collections.Counter((v["pipeline"], v["model_name"], v["version"]) for v in versions)  # type: ignore[index]
    assert all(c == 1 for c in numbers.values()), numbers
    answered = {(r["pipeline"], r["model_name"], r["model_version"]) for r in results}
    assert answered == set(numbers), "a result without its version, or a version without its result"
    for pipeline in PIPELINES:  # numbered 1..n without a gap
        mine = sorted(v for p, _m, v in numbers if p == pipeline)
        assert mine == list(range(1, len(mine) + 1)), (pipeline, mine)


def _answered_by(stack: Stack, request_ids: set[str]) -> set[str]:
    text = stack.services["trainer"].log_path.read_text(errors="replace")
    return {rid for rid in request_ids if f"request {rid} (" in text}


def test_two_trainers_answer_a_burst_once_with_unique_versions_through_a_failover(
    make_system: SystemFactory,
) -> None:
    system = make_system(partitions=2)
    assert {owner_partition(p, 2) for p in PIPELINES} == {0, 1}
    ranges = {}
    for pipeline in PIPELINES:
        system.apply(pipeline, promotion="manual")
        ranges[pipeline] = _vectors(system, pipeline)
    second = Stack.create(system.stack.env, system.stack.log_dir / "second")
    stacks = {"a": system.stack, "b": second}
    try:
        for name, stack in stacks.items():
            stack.start("trainer", {"STREAMML_INSTANCE_ID": name})
        for stack in stacks.values():
            stack.wait_ready("trainer")
        tag = uuid.uuid4().hex[:6]

        # A burst for both pipelines, with replays of the same requests and one request keyed otherwise.
        burst = [_request(f"{p}-{i}-{tag}", p, ranges[p]) for i in range(6) for p in PIPELINES]
        stray = _request(f"stray-{tag}", "phishing", ranges["phishing"])
        _send(
            system,
            burst + burst[:3] + [stray],
            partition={stray["request_id"]: owner_partition("agrawal", 2)},
        )
        ids = {r["request_id"] for r in burst} | {stray["request_id"]}
        results = _answers(system, ids)
        versions = _committed(
            system, system.catalogue.model_versions().name, "ModelVersion", lambda vs: len(vs) >= len(ids), 30
        )
        _check_once(results, versions)
        by = {name: _answered_by(stack, ids) for name, stack in stacks.items()}
        assert by["a"] | by["b"] == ids and not by["a"] & by["b"], by
        assert by["a"] and by["b"], f"one instance did all the work: {by}"  # one partition each

        # Kill one instance in the middle of the next burst: the other takes its partition, fences it,
        # catches up, and answers what is left, once.
        burst2 = [_request(f"{p}-late-{i}-{tag}", p, ranges[p]) for i in range(8) for p in PIPELINES]
        _send(system, burst2)
        time.sleep(0.5)
        assert stacks["a"].stop("trainer", signal.SIGKILL) == -signal.SIGKILL
        ids2 = ids | {r["request_id"] for r in burst2}
        results = _answers(system, ids2)
        versions = _committed(
            system,
            system.catalogue.model_versions().name,
            "ModelVersion",
            lambda vs: len(vs) >= len(ids2),
            30,
        )
        _check_once(results, versions)
        assert {r["request_id"] for r in results} == ids2
        print(
            f"answered {len(ids2)} requests once: {len(_answered_by(stacks['b'], ids2))} by the survivor, "
            f"versions per pipeline {collections.Counter(v['pipeline'] for v in versions)}"
        )
    finally:
        second.stop_all()


def test_sigterm_during_a_long_fit_stops_at_once_and_the_request_is_answered_once_after_restart(
    make_system: SystemFactory,
) -> None:
    system = make_system(partitions=2)
    system.apply("phishing", promotion="manual")
    data_range = _vectors(system, "phishing")
    system.stack.start("trainer")
    system.stack.wait_ready("trainer")
    hgb = "sklearn.ensemble.HistGradientBoostingClassifier"
    slow = {
        **_request(f"slow-{uuid.uuid4().hex[:6]}", "phishing", data_range),
        "estimator_spec": hgb,
        "params": {
            hgb: '{"max_iter": 400, "early_stopping": false, "max_leaf_nodes": 63, "min_samples_leaf": 2}'
        },
        "param_grid": {f"{hgb}.learning_rate": ["0.01", "0.02", "0.05", "0.1", "0.2", "0.3", "0.4", "0.5"]},
    }
    _send(system, [slow])
    svc = system.stack.services["trainer"]
    deadline = time.monotonic() + 60
    while f"request {slow['request_id']}: " not in svc.log_path.read_text(errors="replace"):
        assert time.monotonic() < deadline, system.stack.tail("trainer")
        time.sleep(0.1)
    time.sleep(0.5)  # training now, in the worker thread
    started = time.monotonic()
    assert svc.proc is not None
    svc.proc.send_signal(signal.SIGTERM)
    code = svc.proc.wait(30)
    took = time.monotonic() - started
    assert (code, took < 10) == (0, True), (code, took, system.stack.tail("trainer"))
    log_text = svc.log_path.read_text(errors="replace")
    assert f"request {slow['request_id']} (" not in log_text, "the fit ended before the stop: make it slower"

    system.stack.start("trainer")  # the request was not committed: answered now, once
    results = _answers(system, {slow["request_id"]})
    time.sleep(1.0)
    results = _answers(system, {slow["request_id"]})
    assert [r["status"] for r in results if r["request_id"] == slow["request_id"]] == ["SUCCEEDED"]
    print(
        f"stopped in {took:.2f} s during a fit; answered after the restart in {results[-1]['duration_ms']} ms"
    )
