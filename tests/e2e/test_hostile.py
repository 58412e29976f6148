"""Poison-proof, end to end: hostile records on every topic the six services read, valid events among them.

Every record must have exactly one fate (processed, dead-lettered with the reason, or skipped with a log
line, a metric and a CONTROL alert), no service may stop, and every valid event is predicted exactly once.
The hostile records come from bench/hostile.py (shared with `make fuzz`, which sends 100k of them).
"""

from __future__ import annotations

import collections
import json
import random
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Message
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from bench import hostile
from bench.hostile import Hostile
from streamml import cli
from streamml.codec import codec_for
from streamml.kafka import make_admin
from streamml.settings import get_settings
from streamml.stack import SERVICES
from tests.e2e.conftest import System

N_VALID = 2000
N_BAD = 3000  # malformed raw events (a few more: each round adds one of every kind)
SEED = 20_240_607
Where = tuple[str, int, int]  # topic, partition, offset


def _metric(text: str, name: str, **labels: str) -> float:
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def _post(port: int, body: bytes) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/predict", body, {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:  # loopback only
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {"error": exc.read().decode(errors="replace")}


def test_hostile_records_on_every_topic(system: System, monkeypatch: pytest.MonkeyPatch) -> None:
    c = system.catalogue
    rng = random.Random(SEED)
    definition = system.apply("agrawal", snapshot_every_events=500, snapshot_every_seconds=3600.0)
    system.stack.start_all(SERVICES)
    pids = {name: svc.pid for name, svc in system.stack.services.items()}
    raw_topic, features_topic = c.raw("agrawal").name, c.features("agrawal").name
    memory_dir = Path(f"/tmp/streamml-hostile-{uuid.uuid4().hex}")
    sender = hostile.Sender(system.settings.bootstrap_servers)

    # Control topics first: the services must go on applying valid records after these.
    control = hostile.control_cases(c, definition, rng, str(memory_dir), "e2e")
    for topic, cases in control.items():
        for case in cases:
            sender.send(topic, case.value, case.key, tag=case)
    # The raw topic: valid events interleaved with malformed ones (and three of ~900 KB).
    events = hostile.agrawal_events(N_VALID)
    bad: list[Hostile] = []
    while len(bad) < N_BAD:
        bad += hostile.raw_cases(rng.choice(events), rng, f"bad{len(bad)}")
    bad += hostile.big_raw_cases(events[0], "big")
    mix: list[tuple[bytes | None, Any]] = [(json.dumps(e).encode(), "valid") for e in events]
    mix += [(b.value, b) for b in bad]
    rng.shuffle(mix)
    for value, tag in mix:
        sender.send(raw_topic, value, tag=tag)
    # Feature vectors written straight to the features topic, past the features service.
    vectors = hostile.feature_cases(definition, events[1], "fv")
    for case in vectors:
        sender.send(features_topic, case.value, case.key, tag=case)
    sender.flush()
    sender.close()
    landed: dict[Where, Any] = {(t, p, o): tag for tag, t, p, o in sender.landed}

    # Every valid event predicted exactly once; nothing else predicted.
    valid_ids = {e["event_id"] for e in events}

    def all_predicted(msgs: list[Message]) -> bool:
        return valid_ids <= {m.key().decode() for m in msgs if m.key() is not None}

    predictions = system.records(system.read(c.predictions("agrawal").name, all_predicted), "Prediction")
    counts = collections.Counter(p["event_id"] for p in predictions)
    assert set(counts) == valid_ids, f"predicted events that are not valid: {set(counts) - valid_ids}"
    assert [i for i, n in counts.items() if n > 1] == [], "duplicate predictions in a run without crashes"
    assert all(p["model_version"] != hostile.FORGED_VERSION for p in predictions)

    # Raw in = features out + dead-lettered by the features service: each raw offset exactly once.
    raw_where = {w: tag for w, tag in landed.items() if w[0] == raw_topic}
    fv_where = {w for w in landed if w[0] == features_topic}
    written = [  # by the features service: the hostile vectors written past it are left out
        m
        for m in system.read(features_topic, lambda m: len(m) >= N_VALID + len(vectors))
        if (features_topic, m.partition(), m.offset()) not in fv_where
    ]
    featured = [
        (s["topic"], s["partition"], s["start_offset"])
        for fv in system.records(written, "FeatureVector")
        if (s := fv["source"]) is not None
    ]
    assert len(featured) == len(written) == N_VALID
    dlq_topic = c.dead_letter("agrawal").name

    def raw_dead_lettered(msgs: list[Message]) -> bool:
        return sum((m.key() or b"").startswith(raw_topic.encode() + b"/") for m in msgs) >= len(bad)

    letters = system.records(system.read(dlq_topic, raw_dead_lettered), "DeadLetter")
    by_features = [
        (d["source_topic"], d["source_partition"], d["source_offset"])
        for d in letters
        if d["service"] == "features"
    ]
    fates = collections.Counter(featured + by_features)
    assert all(w[0] == raw_topic for w in fates), "the features service wrote about a record it never read"
    assert {w for w, n in fates.items() if n > 1} == set(), "a raw record with two fates"
    assert set(fates) == set(raw_where), "raw records with no fate"
    assert {w for w in featured if raw_where[w] != "valid"} == set(), "a malformed event became a vector"
    assert len(by_features) == len(bad)
    letter_of = {(d["source_topic"], d["source_partition"], d["source_offset"]): d for d in letters}
    assert all(letter_of[w]["error"] and letter_of[w]["error_type"] for w in by_features)

    # Hostile feature vectors: dead-lettered by the predictor (the learner and monitor may refuse them too).
    def vectors_dead_lettered(msgs: list[Message]) -> bool:
        done = {
            (d["source_topic"], d["source_partition"], d["source_offset"])
            for d in system.records(msgs, "DeadLetter")
            if d["service"] == "predictor"
        }
        return fv_where <= done

    system.read(dlq_topic, vectors_dead_lettered)

    # Control records: each bad one skipped with a CONTROL alert naming it (drift-alerts: metric only, no
    # alert answers an alert); training requests answered REJECTED; the forged version rejected unloaded.
    alerts_topic = c.drift_alerts().name
    must_alert = {
        w
        for w, tag in landed.items()
        if isinstance(tag, Hostile) and tag.expect == "skip" and w[0] != alerts_topic
    }

    def forged_rejected(alerts: list[dict[str, Any]]) -> bool:
        return any(a["kind"] == "ARTIFACT" and a["model_version"] == hostile.FORGED_VERSION for a in alerts)

    def alerted(msgs: list[Message]) -> bool:
        # Both awaited: the predictor's ARTIFACT alert can come after every CONTROL alert is in.
        alerts = _theirs(msgs, "DriftAlert", landed)
        return must_alert <= _control_alerted(alerts) and forged_rejected(alerts)

    alerts = _theirs(system.read(alerts_topic, alerted), "DriftAlert", landed)
    assert must_alert <= _control_alerted(alerts), "bad control records skipped without a CONTROL alert"
    assert forged_rejected(alerts), "the promoted forged version was not rejected with an ARTIFACT alert"
    requests = {t.request_id for t in landed.values() if isinstance(t, Hostile) and t.request_id}

    def answered(msgs: list[Message]) -> bool:
        return requests <= {r["request_id"] for r in _theirs(msgs, "TrainingResult", landed)}

    results = _theirs(system.read(c.training_results().name, answered), "TrainingResult", landed)
    assert {r["status"] for r in results if r["request_id"] in requests} == {"REJECTED"}
    assert not memory_dir.exists(), "a training request's `memory` directory was created"

    # Every service skipped something (all read the pipelines topic); bad alerts are counted, not answered.
    bad_alerts = sum(1 for t, _p, _o in landed if t == alerts_topic)
    wanted = {name: 1 for name in SERVICES} | {
        f"{name}/{alerts_topic}": bad_alerts for name in hostile.CONTROL_READERS["drift-alerts"]
    }
    deadline = time.monotonic() + 30
    while True:
        skipped = {}
        for name, svc in system.stack.services.items():
            text = svc.metrics_text()
            skipped[name] = _metric(text, "streamml_control_records_skipped_total", service=name)
            skipped[f"{name}/{alerts_topic}"] = _metric(
                text, "streamml_control_records_skipped_total", service=name, topic=alerts_topic
            )
        short = {k: skipped[k] for k, n in wanted.items() if skipped[k] < n}
        if not short or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert short == {}, f"skip counts below {wanted}"

    # Still serving: POST /predict answers a valid request, and hostile bodies with a 4xx.
    port = system.stack.services["predictor"].http_port
    status, answer = _post(port, json.dumps({"pipeline": "agrawal", "event": events[5]}).encode())
    assert status == 200 and answer["model_version"] != hostile.FORGED_VERSION, answer
    for body in [b for b, _ in zip(hostile.http_bodies(events, rng), range(60), strict=False) if not b.valid]:
        assert 400 <= _post(port, body.data)[0] < 500, body.kind

    # The CLI reads around every bad record.
    monkeypatch.setenv("STREAMML_BOOTSTRAP_SERVERS", system.settings.bootstrap_servers)
    monkeypatch.setenv("STREAMML_TOPIC_PREFIX", system.settings.topic_prefix)
    get_settings.cache_clear()
    try:
        for args in (["pipeline", "list"], ["model", "list", "agrawal"]):
            result = CliRunner().invoke(cli.app, args)
            assert result.exit_code == 0, (args, result.output)
    finally:
        get_settings.cache_clear()

    # No topic was created from a name a record made up (auto-creation is off).
    topics = make_admin(system.settings).list_topics(timeout=10).topics
    assert [t for t in topics if hostile.GHOST in t or "BAD" in t] == []

    # Nobody crashed or restarted.
    for name, svc in system.stack.services.items():
        assert svc.alive() and svc.pid == pids[name], f"{name} died: {system.stack.tail(name)}"


def _theirs(msgs: list[Message], schema: str, ours: dict[Where, Any]) -> list[dict[str, Any]]:
    """The records of `msgs` the services wrote, decoded (the hostile ones this test wrote are left out)."""
    codec = codec_for(schema)
    return [
        codec.decode(m.value() or b"")
        for m in msgs
        if (m.topic() or "", m.partition() or 0, m.offset() or 0) not in ours
    ]


def _control_alerted(alerts: list[dict[str, Any]]) -> set[Where]:
    """(topic, partition, offset) of every control record a CONTROL alert names."""
    return {
        (w["topic"], w["partition"], w["start_offset"])
        for a in alerts
        if a["kind"] == "CONTROL"
        for w in a["window"]
        if w["end_offset"] == w["start_offset"] + 1
    }
