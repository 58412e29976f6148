"""Hostile inputs for every topic a StreamML service reads, and for POST /predict (shared by `make fuzz`
and tests/e2e/test_hostile.py).

Each record says what must become of it (`expect`), so a run can check every record's fate:
- "dead-letter": a raw event or feature vector no pipeline may accept (the reader dead-letters it);
- "skip": a control record every service reading it must skip (log, metric and, except on the
  drift-alerts topic, a CONTROL alert);
- "answer": a training request the trainer must answer (REJECTED) instead of training;
- "store": a valid-Avro control record that is allowed to be applied but must do no harm (a version for a
  pipeline nobody declared, a decision for a version that does not exist yet).
Generators are seeded: a failing run can be replayed record for record.
"""

from __future__ import annotations

import copy
import json
import random
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from streamml.codec import codec_for, decode_raw
from streamml.sources import open_source
from streamml.topics import Catalogue
from streams.features import FeatureEngine

BAD_NAME = "BAD NAME!/.."
GHOST = "ghost"  # a well-formed pipeline name nobody declares: no topic may ever be created for it
BIG = 900 * 1024  # fits the broker's default 1 MiB message limit, far over the services' raw limit
PRODUCER_MAX_BYTES = 1_048_576  # the producer setting that lets the BIG records out
FORGED_VERSION = 10**6  # a forged, unsigned version of the agrawal online model (and a PROMOTE of it)


@dataclass(frozen=True)
class Hostile:
    value: bytes | None
    kind: str  # short name of the attack, shown in reports
    expect: str  # "dead-letter" | "skip" | "answer" | "store"
    key: bytes | None = None
    request_id: str | None = None  # training requests: the id its answer must carry


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class Sender:
    """A producer that records where every record landed, so each one's fate can be looked up by offset.

    Idempotent: a retried send never writes a record twice (a second copy would have no known fate).
    """

    bootstrap: str
    landed: list[tuple[Any, str, int, int]] = field(default_factory=list)  # (tag, topic, partition, offset)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.producer = Producer(
            {
                "bootstrap.servers": self.bootstrap,
                "linger.ms": 5,
                "enable.idempotence": True,
                "message.max.bytes": PRODUCER_MAX_BYTES,
                "queue.buffering.max.kbytes": 256 * 1024,
            }
        )

    def send(self, topic: str, value: bytes | None, key: bytes | None = None, tag: Any = None) -> None:
        def done(err: KafkaError | None, msg: Message) -> None:
            if err is not None:
                self.errors.append(f"{topic}: {err}")
            else:
                self.landed.append((tag, msg.topic() or "", msg.partition() or 0, msg.offset() or 0))

        while True:
            try:
                self.producer.produce(topic, value, key, on_delivery=done)
                break
            except BufferError:  # the local queue is full: let deliveries drain
                self.producer.poll(0.05)
        self.producer.poll(0)

    def close(self) -> None:
        self.producer.flush(10)
        self.producer.close()

    def flush(self, timeout_s: float = 60.0) -> None:
        left = self.producer.flush(timeout_s)
        if left or self.errors:
            raise RuntimeError(f"{left} records not delivered; errors: {self.errors[:3]}")


def agrawal_events(n: int, seed: int = 5, prefix: str = "ok") -> list[dict[str, Any]]:
    """n valid Agrawal loan applications (one concept, no drift) with unique event ids."""
    spec = f"river:synth.Agrawal?classification_function=0&seed={seed}"
    events = [dict(e.value) for e in open_source(spec, limit=n)]
    for i, event in enumerate(events):
        event["event_id"] = f"{prefix}-{i}"
    return events


# -- raw events -------------------------------------------------------------------------------------------
def _json(obj: Any) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()


def raw_cases(template: Mapping[str, Any], rng: random.Random, tag: str) -> list[Hostile]:
    """One of each kind of malformed raw event (small ones; see `big_raw_cases` for the huge ones).

    `template` is a valid event; `tag` keeps the event ids of one call unique.
    """
    good = dict(template)
    raw = codec_for("RawEvent")
    avro = raw.encode({"fields": {**good, "event_id": f"{tag}-avro"}, "event_time": None})

    def ev(**changes: Any) -> bytes:
        event = {**good, "event_id": f"{tag}-{rng.randrange(10**9)}"}
        for k, v in changes.items():
            if v is _DROP:
                event.pop(k, None)
            else:
                event[k] = v
        return _json(event)

    cases: list[tuple[str, bytes | None]] = [
        ("random-bytes", bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))),
        ("empty", b""),
        ("null-value", None),
        ("invalid-json", ev()[: rng.randrange(1, 40)]),
        ("invalid-utf8", b'{"event_id": "\xff\xfe", "salary": 1}'),
        ("json-array", b"[1, 2, 3]"),
        ("json-string", b'"just a string"'),
        ("json-number", b"12345"),
        ("json-null", b"null"),
        ("deep-array-10000", b"[" * 10_000 + b"]" * 10_000),
        ("deep-object-10000", b'{"a":' * 10_000 + b"1" + b"}" * 10_000),
        ("int-5000-digits", b'{"event_id": "%s-big", "salary": %s}' % (tag.encode(), b"9" * 5000)),
        ("int-over-64-bit", ev(salary=10**30)),
        ("number-1e400", ev(salary=1e400)),  # json.dumps writes Infinity; the literal is checked too
        ("literal-1e400", b'{"event_id": "%s-e400", "salary": 1e400}' % tag.encode()),
        ("nan", ev(loan=float("nan"))),
        ("minus-infinity", ev(hvalue=float("-inf"))),
        ("label-garbage", ev(label="garbage")),
        ("label-3", ev(label=3)),
        ("label-0.5", ev(label=0.5)),
        ("label-list", ev(label=[1])),
        ("wrong-type-string", ev(salary="lots")),
        ("wrong-type-fraction-int", ev(age=41.5)),
        ("wrong-type-object", ev(zipcode={"a": 1})),
        ("wrong-type-list", ev(car=[1, 2])),
        ("missing-field", ev(salary=_DROP)),
        ("missing-event-id", ev(event_id=_DROP)),
        ("empty-event-id", ev(event_id="")),
        ("null-event-id", ev(event_id=None)),
        ("bool-event-id", ev(event_id=True)),
        ("float-event-id", ev(event_id=1.5)),
        ("long-event-id", ev(event_id="i" * 300)),
        ("lone-surrogate-event-id", b'{"event_id": "\\ud800%s", "salary": 1.0}' % tag.encode()),
        ("long-string-field", ev(note="s" * 20_000)),
        ("long-field-name", ev(**{"n" * 300: 1})),
        ("1001-fields", ev(**{f"f{i}": i for i in range(1001)})),
        ("avro-truncated", avro[: rng.randrange(2, len(avro))]),
        ("avro-header-only", avro[:10]),
        (
            "avro-other-schema",
            codec_for("Label").encode({"event_id": "x", "pipeline": "p", "label": True, "label_time": 0}),
        ),
        (
            "avro-nan",
            raw.encode(
                {"fields": {**good, "event_id": f"{tag}-an", "salary": float("nan")}, "event_time": None}
            ),
        ),
    ]
    return [Hostile(value, kind, "dead-letter") for kind, value in cases]


_DROP = object()


def big_raw_cases(template: Mapping[str, Any], tag: str) -> list[Hostile]:
    """Raw events of ~900 KB: a huge string field, a huge event id, a huge JSON array."""
    good = dict(template)
    return [
        Hostile(
            _json({**good, "event_id": f"{tag}-bigfield", "note": "x" * BIG}),
            "900KB-string-field",
            "dead-letter",
        ),
        Hostile(_json({**good, "event_id": "e" * BIG}), "900KB-event-id", "dead-letter"),
        Hostile(b"[" + b"1," * (BIG // 2) + b"1]", "900KB-array", "dead-letter"),
    ]


def refused(definition: Mapping[str, Any], value: bytes | None) -> bool:
    """Whether the features logic refuses `value` (an oracle for randomly generated cases)."""
    engine = FeatureEngine(definition)
    try:
        fv = engine.transform(decode_raw(value), timestamp_ms=0, now_ms=0)
        codec_for("FeatureVector").encode(fv)
    except Exception:
        return True
    return False


# -- feature vectors and predictions (data topics read by the learner, predictor and monitor) -----------
def feature_cases(definition: Mapping[str, Any], template: Mapping[str, Any], tag: str) -> list[Hostile]:
    """Feature vectors the predictor must dead-letter (none may ever be predicted)."""
    engine = FeatureEngine(definition)
    fv = engine.transform(
        {"fields": {**template, "event_id": f"{tag}-fv"}, "event_time": None},
        timestamp_ms=now_ms(),
        now_ms=now_ms(),
    )
    codec = codec_for("FeatureVector")

    def vec(name: str, **changes: Any) -> bytes:
        record = copy.deepcopy(fv)
        record["event_id"] = f"{tag}-{name}"
        features = changes.pop("features", None)
        if features is not None:
            record["features"].update(features)
        record.update(changes)
        return codec.encode(record)

    good = vec("good")
    bad_utf8 = good.replace(f"{tag}-good".encode(), b"\xff" * len(f"{tag}-good"))
    cases: list[tuple[str, bytes | None]] = [
        ("random-bytes", b"\x00\x01garbage" + tag.encode()),
        ("null-value", None),
        ("truncated", good[: len(good) // 2]),
        ("invalid-utf8-event-id", bad_utf8),
        ("nan-feature", vec("nan", features={"salary": float("nan")})),
        ("inf-feature", vec("inf", features={"loan": float("inf")})),
        ("unknown-feature", vec("unknown", features={"evil": 1.0})),
        ("5000-unknown-features", vec("many", features={f"x{i}": 1.0 for i in range(5000)})),
        ("string-for-float", vec("str", features={"salary": "lots"})),
        ("label-garbage", vec("lg", label="garbage")),
        ("label-3", vec("l3", label=3)),
        ("label-0.5", vec("l05", label=0.5)),
        ("empty-event-id", vec("e", event_id="")),
        ("long-event-id", vec("long", event_id="i" * 5000)),
        ("other-pipeline", vec("ghost", pipeline=GHOST)),
        ("bad-pipeline-name", vec("badname", pipeline=BAD_NAME)),
        (
            "other-schema",
            codec_for("Label").encode(
                {"event_id": "x", "pipeline": "agrawal", "label": True, "label_time": 0}
            ),
        ),
    ]
    return [Hostile(value, kind, "dead-letter", key=f"{tag}-{kind}".encode()) for kind, value in cases]


def prediction_cases(tag: str) -> list[Hostile]:
    """Records on a predictions topic that are no prediction of it (the monitor reads them)."""
    record = {
        "event_id": f"{tag}-p",
        "key": None,
        "pipeline": "agrawal",
        "model_name": "online",
        "model_version": 1,
        "prediction": True,
        "score": 0.9,
        "probabilities": {"True": 0.9, "False": 0.1},
        "shadow": False,
        "event_time": 0,
        "feature_time": 0,
        "prediction_time": 0,
        "source": None,
    }
    codec = codec_for("Prediction")
    good = codec.encode(record)
    cases = [
        ("random-bytes", b"\x00garbage" + tag.encode()),
        ("truncated", good[:-3]),
        ("nan-score", codec.encode({**record, "score": float("nan"), "event_id": f"{tag}-nan"})),
        ("huge-version", codec.encode({**record, "model_version": 2**62, "event_id": f"{tag}-v"})),
        ("ghost-pipeline", codec.encode({**record, "pipeline": GHOST, "event_id": f"{tag}-g"})),
        (
            "other-schema",
            codec_for("Label").encode({"event_id": "x", "pipeline": "agrawal", "label": 1, "label_time": 0}),
        ),
    ]
    return [Hostile(value, kind, "dead-letter") for kind, value in cases]


def label_cases(tag: str) -> list[Hostile]:
    codec = codec_for("Label")
    return [
        Hostile(b"\x00garbage" + tag.encode(), "random-bytes", "dead-letter"),
        Hostile(
            codec.encode(
                {"event_id": f"{tag}-l", "pipeline": "agrawal", "label": "garbage", "label_time": 0}
            ),
            "label-garbage",
            "dead-letter",
        ),
        Hostile(
            codec.encode(
                {"event_id": f"{tag}-l2", "pipeline": "agrawal", "label": float("nan"), "label_time": 0}
            ),
            "label-nan",
            "dead-letter",
        ),
    ]


# -- control topics -----------------------------------------------------------------------------------------
def _definition(base: Mapping[str, Any], **changes: Any) -> dict[str, Any]:
    record = copy.deepcopy(dict(base))
    record.update(changes)
    return record


def pipeline_cases(definition: Mapping[str, Any], rng: random.Random) -> list[Hostile]:
    """PipelineDefinition records every service must skip (`definition` is the valid agrawal one)."""
    codec = codec_for("PipelineDefinition")
    d = definition
    online = next(m for m in d["models"] if m["kind"] == "ONLINE")
    steps = list(d["feature_steps"])
    rolling = next(i for i, s in enumerate(steps) if "window" in s["params"])

    def with_step(i: int, **changes: Any) -> list[dict[str, Any]]:
        out = copy.deepcopy(steps)
        out[i].update(changes)
        return out

    def with_online(**changes: Any) -> list[dict[str, Any]]:
        return [{**m, **changes} if m["name"] == online["name"] else m for m in copy.deepcopy(d["models"])]

    bad_window = {**steps[rolling]["params"], "window": "1e999"}
    func = {
        "estimator_spec": "compose.FuncTransformer",
        "params": {"compose.FuncTransformer": json.dumps({"func": "os.system"})},
    }
    records = {
        "bad-name": _definition(d, name=BAD_NAME),
        "step-param-not-json": _definition(d, feature_steps=with_step(0, params={"on_zero": "{not json"})),
        "window-1e999": _definition(d, feature_steps=with_step(rolling, params=bad_window)),
        "no-online-model": _definition(d, models=[m for m in d["models"] if m["kind"] != "ONLINE"]),
        "func-transformer-os-system": _definition(d, models=with_online(**func)),
        "memory-param": _definition(
            d,
            models=[
                *d["models"],
                {
                    "name": "cached",
                    "kind": "BATCH",
                    "estimator_spec": "sklearn.pipeline.Pipeline",
                    "params": {"sklearn.pipeline.Pipeline": json.dumps({"memory": "/tmp/x", "steps": []})},
                },
            ],
        ),
        "unknown-op": _definition(d, feature_steps=[{**steps[0], "op": "eval"}]),
        "no-fields": _definition(d, fields=[]),
        "raw-topic-of-other-role": _definition(d, raw_topic=d["raw_topic"].replace(".raw", ".features")),
        "snapshot-0": _definition(d, snapshot_every_events=0),
        "nan-snapshot-seconds": _definition(d, snapshot_every_seconds=float("nan")),
        "unknown-task": _definition(d, task="UNKNOWN"),
        "n-jobs-minus-1": _definition(
            d,
            models=[
                *d["models"],
                {
                    "name": "par",
                    "kind": "BATCH",
                    "estimator_spec": "sklearn.ensemble.RandomForestClassifier",
                    "params": {"sklearn.ensemble.RandomForestClassifier": json.dumps({"n_jobs": -1})},
                },
            ],
        ),
        "not-an-estimator": _definition(d, models=with_online(estimator_spec="os.system", params={})),
    }
    encoded = {kind: codec.encode(r) for kind, r in records.items()}
    good = codec.encode(dict(d))
    out = [Hostile(v, kind, "skip", key=d["name"].encode()) for kind, v in encoded.items()]
    out += [
        Hostile(bytes(rng.randrange(256) for _ in range(64)), "random-bytes", "skip", key=b"agrawal"),
        Hostile(good[: rng.randrange(10, len(good) - 1)], "truncated", "skip", key=b"agrawal"),
        Hostile(
            codec_for("Label").encode({"event_id": "x", "pipeline": "agrawal", "label": 1, "label_time": 0}),
            "other-schema",
            "skip",
        ),
    ]
    return out


def model_version_record(pipeline: str, model: str, version: int) -> dict[str, Any]:
    return {
        "pipeline": pipeline,
        "model_name": model,
        "version": version,
        "kind": "ONLINE",
        "estimator_spec": "linear_model.LogisticRegression",
        "params": {},
        "artifact_format": "pickle",
        "artifact": b"cos\nsystem\n(S'touch /tmp/pwned'\ntR.",
        "artifact_uri": None,
        "sha256": "0" * 64,
        "signature": "forged",
        "library_versions": {},
        "metrics": {},
        "training_data": [],
        "events_seen": 0,
        "parent_version": None,
        "created_at": now_ms(),
    }


def model_version_cases(rng: random.Random) -> list[Hostile]:
    codec = codec_for("ModelVersion")
    good = codec.encode(model_version_record("agrawal", "online", FORGED_VERSION))
    return [
        Hostile(bytes(rng.randrange(256) for _ in range(80)), "random-bytes", "skip"),
        Hostile(good[: len(good) // 2], "truncated", "skip"),
        Hostile(codec.encode(model_version_record(BAD_NAME, "online", 1)), "bad-pipeline-name", "skip"),
        Hostile(
            codec.encode(model_version_record(GHOST, "online", 1)),
            "ghost-pipeline",
            "store",
            key=f"{GHOST}/online/1".encode(),
        ),
        # a pickle that would run a shell command, unsigned: promoted below, it must be rejected unloaded
        Hostile(good, "forged-artifact", "store", key=f"agrawal/online/{FORGED_VERSION}".encode()),
    ]


def promotion_record(pipeline: str, model: str, version: int, action: str = "PROMOTE") -> dict[str, Any]:
    return {
        "pipeline": pipeline,
        "model_name": model,
        "action": action,
        "version": version,
        "previous_version": None,
        "actor": "fuzz",
        "reason": "hostile",
        "metrics": {},
        "decided_at": now_ms(),
    }


def promotion_cases(rng: random.Random) -> list[Hostile]:
    codec = codec_for("Promotion")
    return [
        Hostile(bytes(rng.randrange(256) for _ in range(40)), "random-bytes", "skip"),
        Hostile(
            codec.encode(promotion_record("agrawal", "no-such-model", 7)),
            "undeclared-model",
            "skip",
            key=b"agrawal/no-such-model/0",
        ),
        Hostile(codec.encode(promotion_record(BAD_NAME, "online", 1)), "bad-pipeline-name", "skip"),
        Hostile(
            codec.encode(promotion_record("agrawal", "online", 987_654)),
            "version-that-does-not-exist",
            "store",
            key=b"agrawal/online/0",
        ),
        Hostile(
            codec.encode(promotion_record("agrawal", "online", FORGED_VERSION)),
            "promote-forged",
            "store",
            key=b"agrawal/online/1",
        ),
    ]


def training_request(request_id: str, pipeline: str = "agrawal", **changes: Any) -> dict[str, Any]:
    spec = "sklearn.tree.DecisionTreeClassifier"
    record = {
        "request_id": request_id,
        "pipeline": pipeline,
        "model_name": "batch",
        "estimator_spec": spec,
        "params": {spec: json.dumps({"max_depth": 3})},
        "param_grid": {},
        "data_ranges": [],
        "time_from": 0,
        "time_to": None,
        "validation_split": 0.2,
        "seed": 1,
        "reason": "hostile",
        "requested_by": "fuzz",
        "requested_at": now_ms(),
    }
    record.update(changes)
    return record


def training_request_cases(rng: random.Random, memory_dir: str, tag: str) -> list[Hostile]:
    """The sklearn Pipeline with `memory` must be refused before anything is built (the dir never appears)."""
    codec = codec_for("TrainingRequest")
    pipe = "sklearn.pipeline.Pipeline"
    memory = training_request(
        f"{tag}-memory",
        estimator_spec=pipe,
        params={
            pipe: json.dumps(
                {
                    "memory": memory_dir,
                    "steps": [["tree", {"class": "sklearn.tree.DecisionTreeClassifier", "params": {}}]],
                }
            )
        },
    )
    scaler = "sklearn.preprocessing.StandardScaler | sklearn.tree.DecisionTreeClassifier"
    memory_in_spec = training_request(
        f"{tag}-memory-2",
        estimator_spec=scaler,
        params={"sklearn.preprocessing.StandardScaler": json.dumps({"memory": memory_dir})},
    )
    func = training_request(
        f"{tag}-func",
        estimator_spec="sklearn.preprocessing.FunctionTransformer",
        params={"sklearn.preprocessing.FunctionTransformer": json.dumps({"func": "os.system"})},
    )
    ghost = training_request(f"{tag}-ghost", pipeline=GHOST)
    grid = training_request(
        f"{tag}-grid",
        param_grid={"sklearn.tree.DecisionTreeClassifier.max_depth": [str(i) for i in range(10_000)]},
    )
    answered = [memory, memory_in_spec, func, ghost, grid]
    good = codec.encode(ghost)
    out = [
        Hostile(
            codec.encode(r),
            str(r["request_id"]).removeprefix(f"{tag}-"),
            "answer",
            key=str(r["pipeline"]).encode(),
            request_id=str(r["request_id"]),
        )
        for r in answered
    ]
    out += [
        Hostile(bytes(rng.randrange(256) for _ in range(50)), "random-bytes", "skip"),
        Hostile(good[:-4], "truncated", "skip"),
        Hostile(codec.encode(training_request(f"{tag}-bad", pipeline=BAD_NAME)), "bad-pipeline-name", "skip"),
    ]
    return out


def training_result_cases(rng: random.Random, tag: str) -> list[Hostile]:
    codec = codec_for("TrainingResult")
    record = {
        "request_id": f"{tag}-nobody-asked",
        "pipeline": BAD_NAME,
        "model_name": "batch",
        "status": "SUCCEEDED",
        "reason": "",
        "model_version": 1,
        "metrics": {},
        "train_records": 1,
        "holdout_records": 1,
        "duration_ms": 1,
        "finished_at": now_ms(),
    }
    return [
        Hostile(bytes(rng.randrange(256) for _ in range(50)), "random-bytes", "skip"),
        Hostile(codec.encode(record)[:-2], "truncated", "skip"),
        Hostile(codec.encode(record), "bad-pipeline-name", "skip"),
    ]


def evaluation_cases(rng: random.Random) -> list[Hostile]:
    codec = codec_for("Evaluation")
    record = {
        "pipeline": BAD_NAME,
        "champion_model": "online",
        "champion_version": 1,
        "challenger_model": "batch",
        "challenger_version": 2,
        "metric": "accuracy",
        "higher_is_better": True,
        "champion_value": 0.1,
        "challenger_value": 0.9,
        "labels": 10**6,
        "evaluated_at": now_ms(),
    }
    return [
        Hostile(bytes(rng.randrange(256) for _ in range(50)), "random-bytes", "skip"),
        Hostile(codec.encode(record)[:-2], "truncated", "skip"),
        Hostile(codec.encode(record), "bad-pipeline-name", "skip"),
    ]


def drift_alert_cases(rng: random.Random) -> list[Hostile]:
    """Bad alerts are skipped and counted, but never answered with another alert (no loops)."""
    alert = {
        "alert_id": "x",
        "pipeline": "agrawal",
        "model_name": "online",
        "model_version": 1,
        "kind": "CONCEPT",
        "detector": "fuzz",
        "feature": None,
        "statistic": None,
        "threshold": None,
        "window": [],
        "severity": "INFO",
        "message": "hostile",
        "detected_at": now_ms(),
    }
    return [
        Hostile(bytes(rng.randrange(256) for _ in range(50)), "random-bytes", "skip"),
        Hostile(codec_for("DriftAlert").encode(alert)[:-3], "truncated", "skip"),
    ]


# -- POST /predict ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Body:
    data: bytes
    kind: str
    valid: bool  # a valid request: 200 expected once a version is live; anything else must be a 4xx


def http_bodies(events: list[dict[str, Any]], rng: random.Random) -> Iterator[Body]:
    """An endless, seeded mix of request bodies: ~15 % valid, the rest hostile."""
    fields = [k for k in events[0] if k not in ("event_id", "label")]

    def event() -> dict[str, Any]:
        e = dict(rng.choice(events))
        e.pop("label", None)
        return e

    def features() -> dict[str, Any]:
        return {k: float(v) for k, v in event().items() if k != "event_id"}

    def without(name: str) -> dict[str, Any]:
        e = event()
        del e[name]
        return e

    def body(obj: Any) -> bytes:
        return json.dumps(obj, allow_nan=True).encode()

    makers: list[tuple[str, bool, Any]] = [
        ("valid-event", True, lambda: body({"pipeline": "agrawal", "event": event()})),
        ("valid-features", True, lambda: body({"pipeline": "agrawal", "features": features()})),
        ("invalid-json", False, lambda: body({"pipeline": "agrawal", "event": event()})[:-7]),
        ("not-utf8", False, lambda: b'{"pipeline": "\xff\xfe"}'),
        ("empty", False, lambda: b""),
        ("json-array", False, lambda: b"[1,2]"),
        (
            "nan",
            False,
            lambda: body({"pipeline": "agrawal", "features": {**features(), "salary": float("nan")}}),
        ),
        (
            "infinity",
            False,
            lambda: body({"pipeline": "agrawal", "event": {**event(), "loan": float("inf")}}),
        ),
        ("literal-1e999", False, lambda: b'{"pipeline": "agrawal", "features": {"salary": 1e999}}'),
        (
            "string-for-number",
            False,
            lambda: body({"pipeline": "agrawal", "event": {**event(), "age": "old"}}),
        ),
        (
            "huge-int",
            False,
            lambda: b'{"pipeline": "agrawal", "event": {"event_id": "x", "salary": %s}}' % (b"9" * 5000),
        ),
        (
            "int-over-64-bit",
            False,
            lambda: body({"pipeline": "agrawal", "event": {**event(), "salary": 10**30}}),
        ),
        ("deep-nesting", False, lambda: b'{"pipeline": "agrawal", "features": ' + b"[" * 20_000),
        ("deep-nesting-closed", False, lambda: b"[" * 5000 + b"]" * 5000),
        (
            "huge-body",
            False,
            lambda: body(
                {
                    "pipeline": "agrawal",
                    "features": features(),
                    "pad": "x" * rng.choice((70_000, 300_000, 1_000_000)),
                }
            ),
        ),
        ("unknown-pipeline", False, lambda: body({"pipeline": GHOST, "features": features()})),
        ("bad-pipeline-name", False, lambda: body({"pipeline": BAD_NAME * 20, "features": features()})),
        ("unknown-field", False, lambda: body({"pipeline": "agrawal", "features": features(), "evil": 1})),
        (
            "unknown-feature",
            False,
            lambda: body({"pipeline": "agrawal", "features": {**features(), "zz": 1.0}}),
        ),
        ("both", False, lambda: body({"pipeline": "agrawal", "features": features(), "event": event()})),
        ("neither", False, lambda: body({"pipeline": "agrawal"})),
        (
            "missing-required",
            False,
            lambda: body({"pipeline": "agrawal", "event": without(rng.choice(fields))}),
        ),
        ("object-value", False, lambda: body({"pipeline": "agrawal", "event": {**event(), "car": {"a": 1}}})),
        ("features-null", False, lambda: body({"pipeline": "agrawal", "features": None, "event": None})),
        ("pipeline-number", False, lambda: body({"pipeline": 7, "features": features()})),
        (
            "long-event-id",
            False,
            lambda: body({"pipeline": "agrawal", "features": features(), "event_id": "i" * 1000}),
        ),
        (
            "many-fields",
            False,
            lambda: body({"pipeline": "agrawal", "features": {f"f{i}": 1.0 for i in range(3000)}}),
        ),
        (
            "lone-surrogate",
            False,
            lambda: b'{"pipeline": "agrawal", "event": {"event_id": "\\ud800", "salary": 1}}',
        ),
        ("random-bytes", False, lambda: bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))),
    ]
    valid = [m for m in makers if m[1]]
    hostile = [m for m in makers if not m[1]]
    while True:
        kind, ok, make = rng.choice(valid) if rng.random() < 0.15 else rng.choice(hostile)
        yield Body(make(), kind, ok)


# Which services read each control topic (and so must skip each bad record on it).
CONTROL_READERS: Mapping[str, tuple[str, ...]] = {
    "pipelines": ("features", "learner", "predictor", "monitor", "trainer", "controller"),
    "model-versions": ("learner", "predictor", "trainer"),
    "promotions": ("learner", "predictor", "monitor", "trainer", "controller"),
    "training-requests": ("trainer",),
    "training-results": ("controller",),
    "evaluations": ("controller",),
    "drift-alerts": ("learner", "controller"),
}


def control_cases(
    catalogue: Catalogue, definition: Mapping[str, Any], rng: random.Random, memory_dir: str, tag: str
) -> dict[str, list[Hostile]]:
    """One round of hostile records for every control topic, by topic name.

    Every record gets a key: three of the topics are compacted, and the broker refuses keyless records there.
    """
    c = catalogue
    cases = {
        c.pipelines().name: pipeline_cases(definition, rng),
        c.model_versions().name: model_version_cases(rng),
        c.promotions().name: promotion_cases(rng),
        c.training_requests().name: training_request_cases(rng, memory_dir, tag),
        c.training_results().name: training_result_cases(rng, tag),
        c.evaluations().name: evaluation_cases(rng),
        c.drift_alerts().name: drift_alert_cases(rng),
    }
    return {
        topic: [h if h.key is not None else replace(h, key=f"{tag}/{h.kind}".encode()) for h in hs]
        for topic, hs in cases.items()
    }
