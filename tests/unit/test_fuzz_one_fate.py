"""Property-based fuzzing of the rule "every record has exactly one fate", without a broker.

Every record a service reads is processed, or dead-lettered with the reason (data topics), or skipped with a
logged reason, a metric and a CONTROL DriftAlert (control topics); nothing a producer sends raises out of a
handler, and valid records after hostile ones are processed as if the hostile ones had never been sent.
Strategies are in fuzz_strategies.py, fakes in fakes.py. Each bug the fuzzer found has a minimal test at the
end (strict xfail while open); while a bug is open, the inputs that trigger it are left out of the properties
(KNOWN_BUGS: True), and set back to False with the fix, so the properties cover those inputs again.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from services.features import app as features_app
from services.learner import app as learner_app
from services.monitor import app as monitor_app
from services.predictor import app as predictor_app
from streamml import artifacts, estimators, limits, pipelines
from streamml.codec import codec_for, decode_raw
from streamml.errors import ValidationError
from streamml.pipelines import PipelineFile, to_definition, validate_definition
from streamml.runtime import Output
from streamml.settings import Settings
from streamml.topics import PIPELINE_NAME, Catalogue
from streams.features import FeatureEngine
from streams.learner import LabelJoin, OnlineLearner
from streams.predictor import ModelRegistry, prediction_record
from tests.unit import fuzz_strategies as fs
from tests.unit.fakes import KAFKA_TS, FakeMessage, FakeProducer
from tests.unit.fuzz_strategies import Event

KNOWN_BUGS = {
    # Fixed (42bb924, 15a7c48); their minimal tests at the end are regression tests now.
    "surrogates": False,  # test_lone_surrogate_in_a_refused_event_leaves_no_trace_in_rolling_windows
    "extreme numbers": False,  # test_huge_finite_values_do_not_refuse_later_valid_events_of_the_key, ...
    "mixed classes": False,  # test_a_class_label_of_another_type_does_not_stop_a_multiclass_learner
    "huge features": False,  # test_huge_finite_features_do_not_stop_the_learner
    "non-ascii digest": False,  # test_a_version_with_a_non_ascii_checksum_is_rejected_not_raised, ...
    "deep params": False,  # test_deeply_nested_parameters_are_a_validation_error
    "monitor records": False,  # test_a_prediction_the_monitor_dead_letters_leaves_no_trace
    "refused after windows": False,  # test_an_event_refused_by_a_derived_feature_leaves_no_trace_...
}

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = Settings(bootstrap_servers="127.0.0.1:1", topic_prefix="unit", _env_file=None)  # nothing listens
CATALOGUE = Catalogue(SETTINGS)
LEARNER_KEY = b"fuzz-key"  # signs and verifies model versions
DEAD_LETTER_MAX_BYTES = 100 * 1024


def fuzz(max_examples: int) -> Callable[[Any], Any]:
    """Sized so the whole file runs in about 30 s on a loaded 2-core machine."""
    return settings(
        max_examples=max_examples,
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
            HealthCheck.filter_too_much,
        ],
    )


# -- pipelines ---------------------------------------------------------------------------------------------
# A pipeline with rolling windows first in its steps, a key field outside its fields, an event time field,
# text fields and multiclass labels; agrawal has keyed windows too (zipcode), trump is a regression.
SHOP = """
name: shop
raw_topic: shop-events
event_id_field: id
key_field: customer
event_time_field: ts
fields:
  amount: float
  qty: int
  member: bool
  country: string
  discount: {type: float, required: false, default: 0.5}
  note: {type: string, required: false}
label: {source: inline, field: label}
task: multiclass
features:
  - {op: rolling_mean, output: amount_mean_5, inputs: [amount], window: 5}
  - {op: rolling_count, output: amount_count_5, inputs: [amount], window: 5}
  - {op: sum, output: total, inputs: [amount, discount]}
  - {op: ratio, output: per_item, inputs: [amount, qty], on_zero: -1}
  - {op: fill_missing, inputs: [note], value: none}
models:
  - {estimator: tree.HoeffdingTreeClassifier}
"""


def _from_file(name: str) -> dict[str, Any]:
    spec = pipelines.load_file(ROOT / "pipelines" / f"{name}.yaml")
    return to_definition(spec, CATALOGUE.raw(name).name).to_avro()


def _labels_on_topic(definition: dict[str, Any], name: str) -> dict[str, Any]:
    label = {**definition["label"], "source": "TOPIC", "field": None}
    return {**definition, "name": name, "raw_topic": CATALOGUE.raw(name).name, "label": label}


AGRAWAL = _from_file("agrawal")
TRUMP = _from_file("trump")
SHOP_DEF = to_definition(PipelineFile.model_validate(yaml.safe_load(SHOP)), "shop-events").to_avro()
AGRAWAL_TOPIC = _labels_on_topic(AGRAWAL, "agrawal-labels")
TRUMP_TOPIC = _labels_on_topic(TRUMP, "trump-labels")
DEFINITIONS = {d["name"]: d for d in (AGRAWAL, TRUMP, SHOP_DEF, AGRAWAL_TOPIC, TRUMP_TOPIC)}
for _definition in DEFINITIONS.values():
    validate_definition(_definition, CATALOGUE)

# Valid events hold no subnormal numbers: dividing by one leaves every range (whether a service refuses such
# an event or not is its choice); the "extreme" events, whose fate may be either, hold them.
_TINY = False
_NEAR_CAPS = not KNOWN_BUGS["refused after windows"]
AGRAWAL_EVENTS = fs.PipelineEvents(AGRAWAL, tiny=_TINY, near_caps=_NEAR_CAPS)
SHOP_EVENTS = fs.PipelineEvents(SHOP_DEF, tiny=_TINY, near_caps=_NEAR_CAPS)
TRUMP_EVENTS = fs.PipelineEvents(TRUMP, tiny=_TINY, near_caps=_NEAR_CAPS)

SHOP_EVENT = {"id": "a", "customer": "c1", "amount": 10.0, "qty": 1, "member": True, "country": "fr"}
AGRAWAL_EVENT = dict(event_id="a", salary=50_000.0, commission=0.0, age=40, elevel=1, car=1, zipcode=1,
                     hvalue=100_000.0, hyears=10, loan=200_000.0, label=1)  # fmt: skip
TRUMP_EVENT = dict(event_id="a", ordinal_date=736_000, gallup=40.0, ipsos=41.0, morning_consult=42.0,
                   rasmussen=43.0, you_gov=44.0)  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def no_broker() -> Iterator[None]:
    """Services create topics when a pipeline appears and producers for alerts: no broker here. (None of
    them connects in its constructor; the predictor creates its alert producer there.)"""
    with pytest.MonkeyPatch.context() as mp:
        for module in (features_app, learner_app, monitor_app):
            mp.setattr(module, "ensure_topics", lambda *_a, **_k: [])

        def no_producer(*_a: Any, **_k: Any) -> Any:
            raise AssertionError("a service under test made a Kafka producer")

        mp.setattr("streamml.service.make_producer", no_producer)  # CONTROL alerts: tests set a fake
        mp.setattr(predictor_app, "make_producer", lambda *_a, **_k: FakeProducer())
        yield


# -- helpers -----------------------------------------------------------------------------------------------
def messages(items: list[tuple[str, bytes | None]]) -> list[FakeMessage]:
    """One message per (topic, value), each at an offset of its own (its index), on partitions 0-2."""
    return [
        FakeMessage(topic, value, offset=i, partition=i % 3, key=f"k{i}".encode())
        for i, (topic, value) in enumerate(items)
    ]


def check_dead_letter(out: Output, msg: FakeMessage, service: str, pipeline: str | None) -> dict[str, Any]:
    """A dead letter that says what failed, where it was read and why, and fits a Kafka message."""
    assert out.value is not None and len(out.value) <= DEAD_LETTER_MAX_BYTES, len(out.value or b"")
    letter = codec_for("DeadLetter").decode(out.value)
    assert letter["error"].strip() and letter["error_type"], letter
    where = (letter["source_topic"], letter["source_partition"], letter["source_offset"])
    assert where == (msg.topic(), msg.partition(), msg.offset())
    value = msg.value()
    assert letter["original_value"] == (None if value is None else value[: limits.DEAD_LETTER_VALUE_BYTES])
    assert (letter["service"], letter["pipeline"]) == (service, pipeline)
    assert out.topic == (CATALOGUE.dead_letter(pipeline) if pipeline else CATALOGUE.dead_letters()).name
    assert out.key == f"{msg.topic()}/{msg.partition()}/{msg.offset()}".encode()
    return letter


def dead_letters(
    outputs: list[Output], msgs: list[FakeMessage], service: str, pipeline_of: Callable[[int], str]
) -> dict[int, str]:
    """offset → error of every dead letter among `outputs`, each checked, at most one per record."""
    dead: dict[int, str] = {}
    for out in outputs:
        if out.topic.endswith("dead-letter"):
            letter = codec_for("DeadLetter").decode(out.value or b"")
            msg = msgs[letter["source_offset"]]
            check_dead_letter(out, msg, service, pipeline_of(msg.offset()))
            assert msg.offset() not in dead, "one dead letter per record"
            dead[msg.offset()] = letter["error"]
    return dead


def check_fates(msgs: list[FakeMessage], events: list[Event], dead: dict[int, str]) -> None:
    """Valid records are never dead-lettered, records invalid by construction always are."""
    for msg, event in zip(msgs, events, strict=True):
        if event.fate == "valid":
            assert msg.offset() not in dead, (event, dead.get(msg.offset()))
        elif event.fate == "invalid":
            assert msg.offset() in dead, event


def promotion(**changes: Any) -> dict[str, Any]:
    return dict(pipeline="agrawal", model_name="online", action="PROMOTE", version=1, previous_version=None,
                actor="auto", reason="", metrics={}, decided_at=0) | changes  # fmt: skip


def model_version(**changes: Any) -> dict[str, Any]:
    """A ModelVersion record signed with the learner's key (artifact: an empty model)."""
    data = artifacts.serialize({"model": None, "metrics": {}})
    return dict(pipeline="agrawal", model_name="online", version=1, kind="ONLINE",
                estimator_spec=AGRAWAL["models"][0]["estimator_spec"], params={}, artifact_format="pickle",
                artifact=data, artifact_uri=None, sha256=artifacts.sha256_hex(data),
                signature=artifacts.sign(data, LEARNER_KEY), library_versions={}, metrics={},
                training_data=[], events_seen=0, parent_version=None, created_at=0) | changes  # fmt: skip


def prediction(name: str, event_id: str, value: Any, **changes: Any) -> dict[str, Any]:
    """A Prediction record of pipeline `name` as its predictor writes it."""
    regression = DEFINITIONS[name]["task"] == "REGRESSION"
    p = 0.75 if value else 0.25
    record = dict(event_id=event_id, key=None, pipeline=name, model_name="online", model_version=1,
                  prediction=value, score=None if regression else max(p, 1 - p),
                  probabilities={} if regression else {"True": p, "False": 1 - p}, shadow=False,
                  event_time=KAFKA_TS, feature_time=KAFKA_TS, prediction_time=KAFKA_TS,
                  source=None)  # fmt: skip
    return record | changes


# -- features service --------------------------------------------------------------------------------------
FEATURE_PIPELINES = {"agrawal": (AGRAWAL, AGRAWAL["raw_topic"]), "shop": (SHOP_DEF, "shop-events")}
RAW_TOPICS = {name: topic for name, (_d, topic) in FEATURE_PIPELINES.items()} | {
    "deleted": "unit.deleted.raw"
}


def new_features_service() -> features_app.Features:
    service = features_app.Features(SETTINGS, CATALOGUE)
    for definition, _topic in FEATURE_PIPELINES.values():
        service.on_pipeline(definition, None)
    return service


def events_of(p: fs.PipelineEvents) -> st.SearchStrategy[Event]:
    return p.events(surrogates=not KNOWN_BUGS["surrogates"], extreme=not KNOWN_BUGS["extreme numbers"])


raw_event = st.one_of(
    events_of(AGRAWAL_EVENTS).map(lambda e: ("agrawal", e)),
    events_of(SHOP_EVENTS).map(lambda e: ("shop", e)),
    AGRAWAL_EVENTS.valid().map(lambda e: ("deleted", e)),  # a pipeline deleted while in flight
)
raw_batches = st.integers(1, 40).flatmap(lambda n: st.lists(raw_event, min_size=n, max_size=n))


@fuzz(120)
@given(batch=raw_batches, split=st.integers(0, 40))
def test_features_every_raw_event_is_one_feature_vector_or_one_dead_letter(
    batch: list[tuple[str, Event]], split: int
) -> None:
    service = new_features_service()
    msgs = messages([(RAW_TOPICS[name], e.value) for name, e in batch])
    outputs = service.handle_through(msgs[:split]) + service.handle_through(msgs[split:])  # never raises

    vectors: dict[int, dict[str, Any]] = {}
    for out in outputs:
        if out.topic.endswith(".features"):
            fv = codec_for("FeatureVector").decode(out.value or b"")
            offset = fv["source"]["start_offset"]
            msg, (name, _e) = msgs[offset], batch[offset]
            assert (out.topic, out.key, fv["pipeline"]) == (
                CATALOGUE.features(name).name,
                fv["event_id"].encode(),
                name,
            )
            assert fv["source"] == {"topic": msg.topic(), "partition": msg.partition(),
                                    "start_offset": offset, "end_offset": offset + 1}  # fmt: skip
            assert offset not in vectors, "one vector per event"
            vectors[offset] = fv
            service.engines[name].check_vector(fv)  # what the learner and the predictor accept
    dead = dead_letters(outputs, msgs, "features", lambda offset: batch[offset][0])
    for msg, (name, event) in zip(msgs, batch, strict=True):
        fates = (msg.offset() in vectors) + (msg.offset() in dead)
        assert fates == (0 if name == "deleted" else 1), (event, fates)
    known = [(m, e) for m, (name, e) in zip(msgs, batch, strict=True) if name != "deleted"]
    check_fates([m for m, _ in known], [e for _, e in known], dead)

    # Refused events leave no trace: fresh engines fed only the accepted events compute the same vectors.
    fresh = {name: FeatureEngine(d) for name, (d, _t) in FEATURE_PIPELINES.items()}
    for offset, fv in sorted(vectors.items()):
        raw = decode_raw(msgs[offset].value())
        again = fresh[fv["pipeline"]].transform(
            raw, timestamp_ms=KAFKA_TS, now_ms=fv["feature_time"], source=fv["source"]
        )
        assert again == fv


ONE_KEY = {
    "agrawal": fs.PipelineEvents(AGRAWAL, tiny=_TINY, key=1, near_caps=_NEAR_CAPS),
    "shop": fs.PipelineEvents(SHOP_DEF, tiny=_TINY, key="k1", near_caps=_NEAR_CAPS),
}


@st.composite
def around_a_refused_event(draw: st.DrawFn) -> tuple[str, list[Event], Event, list[Event]]:
    """(pipeline, valid events, a hostile event, valid events), all of one entity key."""
    name = draw(st.sampled_from(sorted(ONE_KEY)))
    events = ONE_KEY[name]
    valid = st.lists(events.valid(), min_size=1, max_size=6)
    # Events that get far in the engine before they are refused (random bytes rarely do): the likely ones
    # to leave a trace.
    hostile = [events.invalid(), events.extreme(), events.invalid(), events.extreme(), events.noise()]
    if not KNOWN_BUGS["surrogates"]:
        hostile.append(events.surrogates())
    return name, draw(valid), draw(st.one_of(hostile)), draw(valid)


@fuzz(150)
@given(case=around_a_refused_event())
def test_a_refused_event_changes_no_later_feature_vector(
    case: tuple[str, list[Event], Event, list[Event]],
) -> None:
    name, before, hostile, after = case
    topic = RAW_TOPICS[name]
    with_it = new_features_service().handle_through(
        messages([(topic, e.value) for e in [*before, hostile, *after]])
    )
    assume(with_it[len(before)].topic.endswith("dead-letter"))  # refused (noise may be a valid event)
    without = new_features_service().handle_through(messages([(topic, e.value) for e in [*before, *after]]))

    def vectors(outputs: list[Output]) -> list[dict[str, Any]]:
        out = [codec_for("FeatureVector").decode(o.value or b"") for o in outputs[-len(after) :]]
        return [{k: v for k, v in fv.items() if k not in ("source", "feature_time")} for fv in out]

    assert vectors(with_it) == vectors(without)


# -- learner -----------------------------------------------------------------------------------------------
LEARNER_PIPELINES = {"agrawal": AGRAWAL, "shop": SHOP_DEF, "agrawal-labels": AGRAWAL_TOPIC}
EVENTS_OF = {"agrawal": AGRAWAL_EVENTS, "agrawal-labels": AGRAWAL_EVENTS, "shop": SHOP_EVENTS}
EVENTS_OF |= {"trump": TRUMP_EVENTS, "trump-labels": TRUMP_EVENTS}


def tame(fv: dict[str, Any]) -> dict[str, Any]:
    """Leave out what hits a known learner bug: class labels of mixed types (text and numbers) in one
    pipeline, and huge finite features (random field values are often near the float limit)."""
    if KNOWN_BUGS["mixed classes"] and fv["pipeline"] == "shop" and not isinstance(fv["label"], str | None):
        fv = {**fv, "label": str(fv["label"])}
    if KNOWN_BUGS["huge features"]:
        big = {
            k: math.copysign(1e9, v)
            for k, v in fv["features"].items()
            if isinstance(v, float) and 1e9 < abs(v) < math.inf
        }
        fv = {**fv, "features": {**fv["features"], **big}}
    return fv


@functools.cache  # built once: hypothesis validates each new strategy object, which costs
def vectors_of(name: str) -> st.SearchStrategy[dict[str, Any]]:
    """Valid FeatureVector records of a pipeline, made by its own engine from valid raw events."""
    engine = FeatureEngine(DEFINITIONS[name])
    return (
        EVENTS_OF[name]
        .valid()
        .map(lambda e: tame(engine.transform(decode_raw(e.value), timestamp_ms=KAFKA_TS, now_ms=KAFKA_TS)))
    )


def vector_event(fv: dict[str, Any], fate: str = "valid", why: str = "") -> Event:
    return Event(codec_for("FeatureVector").encode(fv), fate, why)


def bad_labels(task: str) -> list[Any]:
    labels: list[Any] = ["", "l" * (limits.MAX_LABEL_CHARS + 1), math.nan, -math.inf]
    if task != "REGRESSION":
        labels += [0.5, -1.5]
    if task != "MULTICLASS":
        labels += ["garbage", "maybe"]
    if task == "BINARY":
        labels += [3, -1]
    return labels


@functools.cache
def hostile_vectors(name: str, huge: bool = not KNOWN_BUGS["huge features"]) -> st.SearchStrategy[Event]:
    """FeatureVectors that decode but do not fit the pipeline, or anything else on its features topic;
    `huge`: also vectors of valid but huge finite features."""
    return _hostile_vector(DEFINITIONS[name], huge)


@st.composite
def _hostile_vector(draw: st.DrawFn, definition: dict[str, Any], huge: bool) -> Event:
    fv = draw(vectors_of(definition["name"]))
    number = next(k for k, v in fv["features"].items() if isinstance(v, float))
    how = draw(st.sampled_from(["features", "label", "id", "pipeline", "random fields", "noise", "huge"]))
    if how == "features":
        long_text = "s" * (limits.MAX_STRING_CHARS + 1)
        bad = draw(st.sampled_from([{"no_such_feature": 1.0}, {number: "text"}, {number: math.nan},
                                    {number: -math.inf}, {number: long_text}]))  # fmt: skip
        return vector_event({**fv, "features": {**fv["features"], **bad}}, "invalid", how)
    if how == "label":
        return vector_event(
            {**fv, "label": draw(st.sampled_from(bad_labels(definition["task"])))}, "invalid", how
        )
    if how == "id":
        event_id = draw(st.sampled_from(["", "i" * (limits.MAX_EVENT_ID_CHARS + 1)]))
        return vector_event({**fv, "event_id": event_id}, "invalid", how)
    if how == "pipeline":  # a vector claiming another pipeline, on this one's topic
        other = draw(fs.hostile_text.filter(lambda name: name != definition["name"]))
        return vector_event({**fv, "pipeline": other}, "invalid", how)
    if how == "random fields":
        return vector_event(tame(draw(fs.mutated("FeatureVector", fv))), "any", how)
    if how == "noise":
        return Event(draw(fs.raw_noise), "any", how)
    assume(huge)
    return vector_event({**fv, "features": {k: 1e308 if isinstance(v, float) else v
                                            for k, v in fv["features"].items()}}, "any", how)  # fmt: skip


def _label(event_id: str, value: Any, fate: str) -> Event:
    record = {"event_id": event_id, "pipeline": "agrawal-labels", "label": value, "label_time": KAFKA_TS}
    return Event(codec_for("Label").encode(record), fate, "label")


JOIN_IDS = [f"e{i}" for i in range(6)]  # few, so labels and vectors of agrawal-labels join
label_events = st.one_of(
    st.builds(_label, st.sampled_from(JOIN_IDS), st.sampled_from([True, False, 0, 1]), st.just("valid")),
    st.builds(_label, st.sampled_from(JOIN_IDS), st.sampled_from(bad_labels("BINARY")), st.just("invalid")),
    fs.raw_noise.map(lambda b: Event(b, "any", "noise")),
)


@st.composite
def learner_batches(draw: st.DrawFn) -> list[tuple[str, str, Event]]:
    """(pipeline, role, event): feature vectors of three pipelines, and labels of the TOPIC one."""
    items: list[tuple[str, str, Event]] = []
    for _ in range(draw(st.integers(1, 25))):
        name = draw(st.sampled_from(sorted(LEARNER_PIPELINES)))
        if name == "agrawal-labels" and draw(st.booleans()):
            items.append((name, "labels", draw(label_events)))
            continue
        if draw(st.booleans()):
            event = draw(hostile_vectors(name))
        else:
            event = vector_event({**draw(vectors_of(name)), "event_id": draw(st.sampled_from(JOIN_IDS))})
        items.append((name, "features", event))
    return items


def new_learner() -> learner_app.Learner:
    service = learner_app.Learner(SETTINGS, CATALOGUE, LEARNER_KEY)
    for definition in LEARNER_PIPELINES.values():
        service.on_pipeline(definition, None)
    return service


@fuzz(60)
@given(batch=learner_batches())
def test_learner_learns_or_dead_letters_every_record_once(batch: list[tuple[str, str, Event]]) -> None:
    service = new_learner()
    seen_before = {name: learner.events_seen for name, learner in service.learners.items()}
    topic = {"features": CATALOGUE.features, "labels": CATALOGUE.labels}
    msgs = messages([(topic[role](name).name, e.value) for name, role, e in batch])
    outputs = service.handle(msgs)  # never raises

    assert {o.topic for o in outputs if not o.topic.endswith("dead-letter")} <= {
        CATALOGUE.model_versions().name,  # snapshots
        CATALOGUE.promotions().name,  # and AUTO promotions
    }
    dead = dead_letters(outputs, msgs, "learner", lambda offset: batch[offset][0])
    check_fates(msgs, [e for _n, _r, e in batch], dead)
    # Every record not dead-lettered was read, and learned once it completes a labelled pair.
    join = LabelJoin(ttl_s=3600)
    expected = dict.fromkeys(LEARNER_PIPELINES, 0)
    for msg, (name, role, _event) in zip(msgs, batch, strict=True):
        assert service.learners[name].positions[(msg.topic(), msg.partition())] > msg.offset()
        if msg.offset() in dead:
            continue
        if role == "labels":
            label = codec_for("Label").decode(msg.value() or b"")
            pair = join.add_label(label["event_id"], label["label"], 0.0)
        elif LEARNER_PIPELINES[name]["label"]["source"] == "TOPIC":
            pair = join.add_features(codec_for("FeatureVector").decode(msg.value() or b""), 0.0)
        else:
            pair = codec_for("FeatureVector").decode(msg.value() or b"")["label"]
        expected[name] += pair is not None
    learned = {name: learner.events_seen - seen_before[name] for name, learner in service.learners.items()}
    assert learned == expected


# -- monitor -----------------------------------------------------------------------------------------------
MONITOR_PIPELINES = {"agrawal": AGRAWAL, "trump": TRUMP, "trump-labels": TRUMP_TOPIC}
MONITOR_TOPICS = {
    "features": CATALOGUE.features,
    "predictions": CATALOGUE.predictions,
    "shadow-predictions": CATALOGUE.shadow_predictions,
    "labels": CATALOGUE.labels,
}


@functools.cache
def _undecodable(schema: str) -> st.SearchStrategy[Event]:
    """Anything but a `schema` record: random bytes, other records, `schema` records cut short."""
    return st.one_of(
        fs.raw_noise.map(lambda b: Event(b, "any", "noise")),
        fs.any_avro(exclude=(schema,)).map(lambda b: Event(b, "invalid", "another schema")),
        fs.truncated(fs.encoded(schema)).map(lambda b: Event(b, "invalid", "truncated")),
    )


@st.composite
def monitor_batches(draw: st.DrawFn) -> list[tuple[str, str, Event]]:
    """(pipeline, role, event): the records of valid events (vector, served and shadow prediction, label)
    in any order, with hostile records inserted anywhere, often naming the id of a valid event."""
    items: list[tuple[str, str, Event]] = []
    ids: list[str] = []
    for i in range(draw(st.integers(0, 6))):
        name = draw(st.sampled_from(sorted(MONITOR_PIPELINES)))
        definition = MONITOR_PIPELINES[name]
        answer = st.floats(-100, 100) if definition["task"] == "REGRESSION" else st.booleans()
        event_id = f"v{i}"
        ids.append(event_id)
        fv = {**draw(vectors_of(name)), "event_id": event_id}
        if definition["label"]["source"] == "INLINE" and fv["label"] is None:
            fv["label"] = draw(answer)
        records = [
            ("features", codec_for("FeatureVector").encode(fv)),
            ("predictions", codec_for("Prediction").encode(prediction(name, event_id, draw(answer)))),
        ]
        if draw(st.booleans()):
            challenger = "batch" if len(definition["models"]) > 1 else "online"
            shadow = prediction(
                name, event_id, draw(answer), shadow=True, model_version=7, model_name=challenger
            )
            records.append(("shadow-predictions", codec_for("Prediction").encode(shadow)))
        if definition["label"]["source"] == "TOPIC":
            label = {"event_id": event_id, "pipeline": name, "label": draw(answer), "label_time": KAFKA_TS}
            records.append(("labels", codec_for("Label").encode(label)))
        items += [(name, role, Event(value, "valid")) for role, value in draw(st.permutations(records))]
    for _ in range(draw(st.integers(0 if items else 1, 8))):
        name = draw(st.sampled_from(sorted(MONITOR_PIPELINES)))
        roles = ["features", "predictions", "shadow-predictions"]
        role = draw(st.sampled_from(roles + (["labels"] if name == "trump-labels" else [])))
        schema = {"features": "FeatureVector", "labels": "Label"}.get(role, "Prediction")
        hostile = [_undecodable(schema)]
        if not KNOWN_BUGS["monitor records"]:  # the right schema, hostile values, the ids of valid events
            event_id = draw(st.sampled_from([*ids, "other"]))
            record = draw(fs.records_of(schema)) | {"event_id": event_id, "pipeline": name}
            hostile.append(st.just(Event(codec_for(schema).encode(record), "any", "values")))
            task = MONITOR_PIPELINES[name]["task"]
            if role == "labels":  # a label that does not fit the task
                label = {"event_id": event_id, "pipeline": name, "label_time": KAFKA_TS}
                label["label"] = draw(st.sampled_from(bad_labels(task)))
                hostile.append(st.just(Event(codec_for("Label").encode(label), "invalid", "label")))
            elif role == "predictions":  # a prediction that does not fit the task
                value = "not a number" if task == "REGRESSION" else 0.5
                bad = codec_for("Prediction").encode(prediction(name, event_id, value))
                hostile.append(st.just(Event(bad, "invalid", "prediction")))
        items.insert(draw(st.integers(0, len(items))), (name, role, draw(st.one_of(hostile))))
    return items


def new_monitor() -> monitor_app.MonitorService:
    service = monitor_app.MonitorService(SETTINGS, CATALOGUE)
    for definition in MONITOR_PIPELINES.values():
        service.on_pipeline(definition, None)
        service.on_promotion(promotion(pipeline=definition["name"]), None)
    return service


@fuzz(80)
@given(batch=monitor_batches())
def test_monitor_reads_or_dead_letters_every_record_once(batch: list[tuple[str, str, Event]]) -> None:
    service = new_monitor()
    msgs = messages([(MONITOR_TOPICS[role](name).name, e.value) for name, role, e in batch])
    outputs = service.handle(msgs)  # never raises

    for out in outputs:  # what else it writes are alerts and evaluations that fit their schemas
        if out.topic == CATALOGUE.drift_alerts().name:
            codec_for("DriftAlert").decode(out.value or b"")
        elif out.topic == CATALOGUE.evaluations().name:
            codec_for("Evaluation").decode(out.value or b"")
        else:
            assert out.topic.endswith("dead-letter"), out.topic
    dead = dead_letters(outputs, msgs, "monitor", lambda offset: batch[offset][0])
    check_fates(msgs, [e for _n, _r, e in batch], dead)


# -- predictor ---------------------------------------------------------------------------------------------
PREDICTOR_PIPELINES = {"agrawal": AGRAWAL, "shop": SHOP_DEF, "trump": TRUMP}
SIGNING = Settings(
    bootstrap_servers="127.0.0.1:1", topic_prefix="unit", signing_key="fuzz-key", _env_file=None
)


def _trained_version(name: str) -> dict[str, Any]:
    """A signed version 1 of the pipeline's online model, learned from a few valid events."""
    definition = PREDICTOR_PIPELINES[name]
    model = definition["models"][0]
    learner = OnlineLearner(pipeline=name, model_name=model["name"], estimator_spec=model["estimator_spec"],
                            params=dict(model["params"]), regression=definition["task"] == "REGRESSION",
                            signing_key=LEARNER_KEY)  # fmt: skip
    engine = FeatureEngine(definition)
    example = {"agrawal": AGRAWAL_EVENT, "shop": SHOP_EVENT, "trump": TRUMP_EVENT}[name]
    for i in range(30):
        fields = {k: v * (1 + i % 5) if isinstance(v, float) else v for k, v in example.items()}
        fv = engine.transform({"fields": fields, "event_time": None}, timestamp_ms=0, now_ms=0)
        learner.learn(fv["features"], {"agrawal": i % 2, "shop": "xyz"[i % 3], "trump": 40.0 + i % 7}[name])
    return learner.snapshot(0)


TRAINED = {name: _trained_version(name) for name in PREDICTOR_PIPELINES}


def new_predictor() -> predictor_app.Predictor:
    service = predictor_app.Predictor(SIGNING, CATALOGUE)
    for name, definition in PREDICTOR_PIPELINES.items():
        service.on_pipeline(definition, None)
        service.on_version(TRAINED[name], FakeMessage(CATALOGUE.model_versions().name, None, 0))
        service.on_promotion(promotion(pipeline=name), None)
        assert service.registry.live[name].version == 1
    return service


@st.composite
def predictor_batches(draw: st.DrawFn) -> list[tuple[str, Event]]:
    """(pipeline, event) on features topics: valid vectors, each with an id of its own, and hostile ones
    (huge features included: predicting changes no state)."""
    items: list[tuple[str, Event]] = []
    for i in range(draw(st.integers(1, 20))):
        name = draw(st.sampled_from(sorted(PREDICTOR_PIPELINES)))
        if draw(st.booleans()):
            items.append((name, vector_event({**draw(vectors_of(name)), "event_id": f"m{i}"})))
            continue
        other = vectors_of("shop" if name != "shop" else "agrawal")
        hostile = st.one_of(
            hostile_vectors(name, huge=True),
            other.map(lambda fv: vector_event(fv, "invalid", "another pipeline's vector")),
        )
        items.append((name, draw(hostile)))
    return items


@fuzz(50)
@given(batch=predictor_batches())
def test_predictor_predicts_or_dead_letters_every_vector_once(batch: list[tuple[str, Event]]) -> None:
    service = new_predictor()
    msgs = messages([(CATALOGUE.features(name).name, e.value) for name, e in batch])
    outputs = service.handle(msgs)  # never raises

    predicted: dict[str, list[dict[str, Any]]] = {}
    for out in outputs:
        if out.topic.endswith(".predictions"):
            record = codec_for("Prediction").decode(out.value or b"")
            assert (out.topic, out.key) == (
                CATALOGUE.predictions(record["pipeline"]).name,
                record["event_id"].encode(),
            )
            predicted.setdefault(record["event_id"], []).append(record)
    dead = dead_letters(outputs, msgs, "predictor", lambda offset: batch[offset][0])
    assert sum(map(len, predicted.values())) + len(dead) == len(msgs), "one fate per record"
    check_fates(msgs, [e for _n, e in batch], dead)
    for msg, (name, event) in zip(msgs, batch, strict=True):
        if event.fate == "valid":  # the prediction it would get alone: hostile records change nothing
            fv = codec_for("FeatureVector").decode(msg.value() or b"")
            (record,) = predicted[fv["event_id"]]
            alone = prediction_record(service.registry.live[name], fv, record["prediction_time"])
            assert record == codec_for("Prediction").decode(codec_for("Prediction").encode(alone))


def _request(name: str, body: bytes) -> bytes:
    return b'{"pipeline": "' + name.encode() + b'", ' + body + b"}"


@st.composite
def predict_bodies(draw: st.DrawFn) -> tuple[bytes, str]:
    """(POST /predict body, what it is): valid requests, and requests and bytes of every hostile shape."""
    name = draw(st.sampled_from(sorted(PREDICTOR_PIPELINES)))
    events = EVENTS_OF[name]
    how = draw(st.sampled_from(["features", "event", "bad event", "mutated", "noise", "huge", "tokens"]))
    if how == "noise":
        return draw(fs.raw_noise), how
    if how == "huge":
        return _request(name, b'"features": {"x": "' + b"x" * 70_000 + b'"}'), how
    if how == "features":
        return json.dumps({"pipeline": name, "features": draw(vectors_of(name))["features"]}).encode(), how
    if how == "event":
        return json.dumps({"pipeline": name, "event": draw(events.valid_fields())}).encode(), how
    if how == "bad event":
        return _request(name, b'"event": ' + (draw(events.invalid()).value or b"")), how
    if how == "tokens":  # NaN, Infinity and integers beyond every range as raw JSON
        token = draw(st.sampled_from([*fs.NUMBER_TOKENS, fs.TOO_MANY_DIGITS]))
        return _request(name, b'"features": {"x": ' + token.encode() + b"}"), how
    request = {
        "pipeline": name,
        "features": draw(vectors_of(name))["features"],
        "event_id": "r",
    }
    mutation = draw(st.sampled_from(["pipeline", "event_id", "both", "neither", "extra", "value", "nested"]))
    if mutation == "pipeline":
        request["pipeline"] = draw(fs.hostile_text.filter(lambda t: t not in PREDICTOR_PIPELINES))
    elif mutation == "event_id":
        request["event_id"] = draw(st.sampled_from(["", "i" * (limits.MAX_EVENT_ID_CHARS + 1), 3, None]))
    elif mutation == "both":
        request["event"] = {"a": 1}
    elif mutation == "neither":
        del request["features"]
    elif mutation == "extra":
        request["model"] = "os.system"
    elif mutation == "value":  # a feature the pipeline does not have
        request["features"] = {**request["features"], f"no {draw(fs.hostile_text)}": draw(fs.json_scalars)}
    else:
        request["features"] = draw(fs.json_shapes)
    return json.dumps(request).encode(), f"mutated {mutation}"


def _windows(service: predictor_app.Predictor) -> dict[str, dict[Any, list[float]]]:
    return {n: {k: list(w) for k, w in e.windows.windows.items()} for n, e in service.engines.items()}


@fuzz(80)
@given(bodies=st.lists(predict_bodies(), min_size=1, max_size=5))
def test_predict_http_answers_every_body_with_a_status_and_finite_json_and_never_moves_windows(
    bodies: list[tuple[bytes, str]],
) -> None:
    service = new_predictor()
    before = _windows(service)
    for body, how in bodies:
        status, answer = service.predict_http(body)  # never raises
        json.dumps(answer, allow_nan=False)  # what the view sends: no NaN, no Infinity
        assert status in (200, 400, 404, 413, 422, 503), (how, status, answer)
        if how in ("features", "event"):
            assert status == 200, (how, body[:300], answer)
        elif how != "noise" and how != "mutated nested":  # random shapes may be valid features ({})
            assert 400 <= status < 500 and answer["error"], (how, body[:300], status, answer)
    assert _windows(service) == before, "a request is not part of the stream"


KEY = b"fuzz-signing-key"
GOOD = {"model": "a verified model", "metrics": {}}
EVIL = {"model": "an unverified model", "metrics": {}}
EVIL_BYTES = artifacts.serialize(EVIL)


def signed(version: int, payload: Any, key: bytes = KEY) -> dict[str, Any]:
    data = payload if isinstance(payload, bytes) else artifacts.serialize(payload)
    digests = {"sha256": artifacts.sha256_hex(data), "signature": artifacts.sign(data, key)}
    return model_version(version=version, artifact=data, **digests)


def _ascii_digests(record: dict[str, Any]) -> bool:
    return all(str(record.get(k) or "").isascii() for k in ("sha256", "signature"))


versions = st.one_of(
    st.integers(1, 4).map(lambda v: signed(v, GOOD)),
    st.integers(1, 4).map(lambda v: signed(v, EVIL, key=b"someone else's key")),
    st.integers(1, 4).map(lambda v: {**signed(v, GOOD), "artifact": EVIL_BYTES}),  # checksum mismatch
    st.integers(1, 4).map(  # checksum right, signature wrong
        lambda v: {**signed(v, GOOD), "artifact": EVIL_BYTES, "sha256": artifacts.sha256_hex(EVIL_BYTES)}
    ),
    st.integers(1, 4).map(lambda v: {**signed(v, EVIL), "signature": None}),
    st.integers(1, 4).map(lambda v: {**signed(v, EVIL), "artifact_format": "joblib"}),
    st.integers(1, 4).map(lambda v: signed(v, b"\x80\x05not a pickle")),  # signed, cannot be loaded
    fs.mutated("ModelVersion", signed(1, GOOD)),
    fs.mutated("ModelVersion", signed(1, EVIL, key=b"someone else's key")),
    st.integers(1, 4).map(lambda v: {**signed(v, GOOD), "sha256": "é" * 64}),
).filter(lambda r: _ascii_digests(r) or not KNOWN_BUGS["non-ascii digest"])
decisions = st.builds(
    promotion,
    action=st.sampled_from(["PROMOTE", "ROLLBACK", "SHADOW", "DISCARD", "UNKNOWN"]),
    version=st.integers(0, 5),
    actor=st.sampled_from(["auto", "controller", "user"]),
)


@fuzz(150)
@given(records=st.lists(st.one_of(versions, decisions), min_size=1, max_size=12))
def test_the_predictor_registry_serves_only_verified_artifacts_and_never_raises(
    records: list[dict[str, Any]],
) -> None:
    registry = ModelRegistry(signing_key=KEY)
    for record in records:
        if "action" in record:
            registry.on_promotion(record)
        else:
            registry.on_version(record)
        for served in (*registry.live.values(), *registry.shadow.values()):
            assert served.model == GOOD["model"], "only a verified artifact is ever loaded"


# -- control topics ----------------------------------------------------------------------------------------
FUNC_TRANSFORMER = {"name": "online", "kind": "ONLINE", "estimator_spec": "compose.FuncTransformer",
                    "params": {"compose.FuncTransformer": '{"func": "os.system"}'}}  # fmt: skip
SKLEARN_MEMORY = {"name": "batch", "kind": "BATCH", "estimator_spec": "sklearn.pipeline.Pipeline",
                  "params": {"sklearn.pipeline.Pipeline": '{"memory": "/tmp/x", "steps": []}'}}  # fmt: skip


def hostile_definitions(good: dict[str, Any]) -> list[dict[str, Any]]:
    """Definitions that decode but must never be applied, one reason each."""
    step = good["feature_steps"][0]
    online = good["models"][0]
    return [
        {**good, "name": "BAD NAME!/.."},
        {**good, "name": ""},
        {**good, "feature_steps": [{**step, "params": {"on_zero": "{not json"}}]},
        {**good, "feature_steps": [{**step, "op": "rolling_mean", "params": {"window": "1e999"}}]},
        {**good, "feature_steps": [{**step, "op": "rolling_mean", "params": {"window": "0"}}]},
        {**good, "feature_steps": [{**step, "op": "eval"}]},
        {**good, "models": [{**m, "kind": "BATCH"} for m in good["models"]]},
        {**good, "models": []},
        {**good, "models": [FUNC_TRANSFORMER]},
        {**good, "models": [online, SKLEARN_MEMORY]},
        {**good, "models": [{**online, "estimator_spec": "os.system"}]},
        {**good, "models": [{**online, "params": {online["estimator_spec"].split(" | ")[0]: "not json"}}]},
        {**good, "raw_topic": CATALOGUE.pipelines().name},
        {**good, "raw_topic": "../../etc"},
        {**good, "fields": []},
        {**good, "fields": [*good["fields"], good["fields"][0]]},
        {**good, "task": "UNKNOWN"},
        {**good, "label": {**good["label"], "ttl_seconds": math.inf}},
        {**good, "snapshot_every_seconds": math.nan},
        {**good, "snapshot_every_events": 0},
        {**good, "monitoring": {**good["monitoring"], "concept_params": {"delta": "[[["}}},
        {**good, "monitoring": {**good["monitoring"], "data_window": -1}},
        {**good, "monitoring": {**good["monitoring"], "concept_detector": "os.system"}},
    ] + ([] if KNOWN_BUGS["deep params"] else [
        {**good, "feature_steps": [{**step, "params": {"on_zero": "[" * 100_000}}]},
        {**good, "monitoring": {**good["monitoring"], "concept_params": {"delta": "[" * 100_000}}},
    ])  # fmt: skip


def deep_json(at: Any) -> st.SearchStrategy[Any]:
    """For text values (parameters are JSON text): JSON deeper than the parser's stack, or too many digits."""
    if at == "string" and not KNOWN_BUGS["deep params"]:
        return st.sampled_from(["[" * 100_000, "[" * 5_000 + "]" * 5_000, fs.TOO_MANY_DIGITS])
    return st.nothing()


def control_values(
    schema: str, good: dict[str, Any], hostile: list[dict[str, Any]]
) -> st.SearchStrategy[Event]:
    codec = codec_for(schema)
    return st.one_of(
        st.just(Event(codec.encode(good), "valid")),
        st.sampled_from(hostile or [good]).map(
            lambda r: Event(codec.encode(r), "invalid" if hostile else "valid")
        ),
        fs.mutated(schema, good, deep_json).map(lambda r: Event(codec.encode(r), "any", "mutated")),
        fs.truncated(st.just(codec.encode(good))).map(lambda b: Event(b, "invalid", "truncated")),
        fs.any_avro(exclude=(schema,)).map(lambda b: Event(b, "invalid", "another schema")),
        st.binary(max_size=100).map(lambda b: Event(b, "invalid", "random bytes")),
        st.just(Event(None, "tombstone")),
    )


ALERT = dict(alert_id="a", pipeline="agrawal", model_name="online", model_version=1, kind="CONCEPT",
             detector="d", feature=None, statistic=None, threshold=None, window=[], severity="WARNING",
             message="", detected_at=0, event_time=None)  # fmt: skip
CONTROL_CASES: dict[str, tuple[str, str, st.SearchStrategy[Event]]] = {  # case: (topic, schema, values)
    "pipelines": (
        CATALOGUE.pipelines().name,
        "PipelineDefinition",
        control_values("PipelineDefinition", AGRAWAL, hostile_definitions(AGRAWAL)),
    ),
    "promotions": (
        CATALOGUE.promotions().name,
        "Promotion",
        control_values(
            "Promotion",
            promotion(),
            [promotion(pipeline="BAD NAME!/.."), promotion(pipeline=""), promotion(model_name="undeclared")],
        ),
    ),
    "model-versions": (
        CATALOGUE.model_versions().name,
        "ModelVersion",
        control_values(
            "ModelVersion",
            model_version(),
            [model_version(pipeline="../x"), model_version(pipeline=""), model_version(signature="0" * 64)],
        ),
    ),
    "drift-alerts": (CATALOGUE.drift_alerts().name, "DriftAlert", control_values("DriftAlert", ALERT, [])),
}


def control_services() -> list[tuple[str, Any, dict[str, Callable[..., None]]]]:
    """(service name, service, {case: apply}) of the services that follow control topics, agrawal applied."""
    features = features_app.Features(SETTINGS, CATALOGUE)
    learner = learner_app.Learner(SETTINGS, CATALOGUE, LEARNER_KEY)
    monitor = monitor_app.MonitorService(SETTINGS, CATALOGUE)
    for service in (features, learner, monitor):
        service.on_pipeline(AGRAWAL, None)
    learner_applies = {"pipelines": learner.on_pipeline, "promotions": learner.on_promotion,
                       "model-versions": learner.on_version, "drift-alerts": learner.on_alert}  # fmt: skip
    return [
        ("features", features, {"pipelines": features.on_pipeline}),
        ("learner", learner, learner_applies),
        ("monitor", monitor, {"pipelines": monitor.on_pipeline, "promotions": monitor.on_promotion}),
    ]


def _checked(
    apply: Callable[..., None], schema: str, outcome: dict[int, str], wrong: list[str]
) -> Callable[..., None]:
    """`apply`, recording per offset whether it completed, and in `wrong` any record given to it that does
    not pass every check (recorded, not raised: the follower would take an assertion for a bad record)."""

    def recording(record: dict[str, Any] | None, msg: Any) -> None:
        try:
            if record is not None and schema == "PipelineDefinition":
                validate_definition(record, CATALOGUE)
            if record is not None and "pipeline" in record and schema != "DriftAlert":
                assert PIPELINE_NAME.match(record["pipeline"]), record["pipeline"]
        except Exception as exc:
            wrong.append(f"offset {msg.offset()}: {type(exc).__name__}: {exc}")
        outcome[msg.offset()] = "applying"
        apply(record, msg)
        outcome[msg.offset()] = "applied"

    return recording


@fuzz(100)
@given(case=st.sampled_from(sorted(CONTROL_CASES)), data=st.data())
def test_control_records_are_applied_when_valid_else_skipped_counted_and_alerted(
    case: str, data: st.DataObject
) -> None:
    topic, schema, values = CONTROL_CASES[case]
    events = data.draw(st.lists(values, min_size=1, max_size=8), label="records")
    for name, service, applies in control_services():
        if case not in applies:
            continue
        follower = service.control
        follower._alerts = alerts = FakeProducer()
        outcome: dict[int, str] = {}
        wrong: list[str] = []
        apply = _checked(applies[case], schema, outcome, wrong)
        skipped_before = follower.skipped
        for offset, event in enumerate(events):
            msg = FakeMessage(topic, event.value, offset)
            follower._apply(topic, schema, 0, offset, event.value, apply, msg)  # never raises

        assert wrong == [], (name, wrong)  # applied only once it passed every check
        skipped = [offset for offset in range(len(events)) if outcome.get(offset) != "applied"]
        assert follower.skipped - skipped_before == len(skipped), (name, outcome)
        for offset, event in enumerate(events):
            if event.fate in ("valid", "tombstone"):
                assert outcome.get(offset) == "applied", (name, event)
            elif event.fate == "invalid":
                assert outcome.get(offset) != "applied", (name, event)
        if case == "drift-alerts":
            assert alerts.produced == [], "a bad alert is never answered with another alert"
            continue
        alerted = []
        for alert_topic, value, _key in alerts.produced:
            alert = codec_for("DriftAlert").decode(value or b"")
            assert (alert_topic, alert["kind"], alert["window"][0]["topic"]) == (
                CATALOGUE.drift_alerts().name,
                "CONTROL",
                topic,
            )
            assert alert["message"]
            alerted.append(alert["window"][0]["start_offset"])
        assert alerted == skipped, name  # one CONTROL alert per skipped record


# -- definitions and estimators ----------------------------------------------------------------------------
definitions = st.one_of(
    fs.mutated("PipelineDefinition", AGRAWAL, deep_json),
    fs.mutated("PipelineDefinition", SHOP_DEF, deep_json),
    st.sampled_from(hostile_definitions(AGRAWAL) + hostile_definitions(SHOP_DEF)),
    fs.records_of("PipelineDefinition"),
)


@fuzz(120)
@given(definition=definitions)
def test_a_definition_validates_or_raises_validation_error_and_a_valid_one_applies_everywhere(
    definition: dict[str, Any],
) -> None:
    with contextlib.suppress(ValidationError):
        FeatureEngine(definition)
    try:
        validate_definition(definition, CATALOGUE)
    except ValidationError:
        return
    if definition["deleted"]:
        return
    # Valid means every service can apply it (they would skip it otherwise, keeping the old revision).
    features_app.Features(SETTINGS, CATALOGUE).on_pipeline(definition, None)
    learner_app.Learner(SETTINGS, CATALOGUE, LEARNER_KEY).on_pipeline(definition, None)
    monitor_app.MonitorService(SETTINGS, CATALOGUE).on_pipeline(definition, None)


BUILDABLE = [
    "linear_model.LogisticRegression",
    "preprocessing.StandardScaler | tree.HoeffdingTreeClassifier",
    "compose.Pipeline",
    "sklearn.pipeline.Pipeline",
    "sklearn.compose.ColumnTransformer",
    "sklearn.feature_extraction.text.TfidfVectorizer",
    "sklearn.ensemble.RandomForestClassifier",
    "sklearn.ensemble.BaggingClassifier",
    "sklearn.linear_model.LogisticRegression",
    "sklearn.feature_selection.SelectFromModel",
    "sklearn.model_selection.GridSearchCV",
]
REFUSED = [
    "compose.FuncTransformer",
    "compose.TargetTransformRegressor",
    "sklearn.preprocessing.FunctionTransformer",
    "sklearn.utils.Bunch",
    "river.datasets.Phishing",
    "os.system",
    "linear_model..X",
]
PARAM_NAMES = [
    "memory", "func", "inverse_func", "input", "cache_dir", "path", "module", "pre_dispatch", "n_jobs",
    "importance_getter", "estimator", "steps", "transformers", "optimizer", "warm_start", "verbose",
    "random_state", "__class__", "_private", "not an identifier",
]  # fmt: skip
DIR = "@@DIR@@"  # replaced by the test's own empty directory
param_values = st.recursive(
    st.one_of(
        fs.json_scalars,
        st.sampled_from([DIR, f"{DIR}/cache", f"{DIR}/x.joblib", "os.system", "builtins.eval", "~", "./x",
                         "filename", "content", "all", "auto", -1, 0, 2, 0.5, 10**30, math.inf, math.nan]),
        st.just([["scale", {"class": "sklearn.preprocessing.StandardScaler", "params": {}}]]),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.text(max_size=5), inner, max_size=3),
        st.fixed_dictionaries({"class": st.sampled_from(BUILDABLE + REFUSED),
                               "params": st.dictionaries(st.sampled_from(PARAM_NAMES), inner, max_size=3)}),
    ),
    max_leaves=8,
)  # fmt: skip


def _parameters_of(spec: str) -> list[str]:
    """The constructor parameters of a spec's first class: hostile values are most useful where they fit."""
    path = spec.split("|")[0].strip()
    module, _, name = (path if path.startswith(("river.", "sklearn.")) else f"river.{path}").rpartition(".")
    try:
        return list(inspect.signature(getattr(importlib.import_module(module), name)).parameters)
    except Exception:  # not a class (e.g. os.system): any names
        return []


def _estimator_params(spec: str) -> st.SearchStrategy[dict[str, Any]]:
    own = st.sampled_from(_parameters_of(spec) or PARAM_NAMES)
    return st.dictionaries(st.one_of(own, own, st.sampled_from(PARAM_NAMES)), param_values, max_size=4)


@fuzz(150)
@given(
    spec_params=st.one_of(
        st.sampled_from(BUILDABLE), st.sampled_from(BUILDABLE), st.sampled_from(REFUSED)
    ).flatmap(lambda spec: st.tuples(st.just(spec), _estimator_params(spec)))
)
def test_estimators_build_raises_only_validation_error_and_never_writes_files(
    spec_params: tuple[str, dict[str, Any]],
) -> None:
    spec, params = spec_params
    here = os.getcwd()
    with tempfile.TemporaryDirectory() as directory:
        params = json.loads(json.dumps(params).replace(DIR, directory))
        try:
            os.chdir(directory)
            with contextlib.suppress(ValidationError):
                estimators.build(spec, {spec.split("|")[0].strip(): params})
        finally:
            os.chdir(here)
        assert os.listdir(directory) == []


# -- known bugs: minimal examples the fuzzer found ---------------------------------------------------------
def _raw(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields).encode()


def _error(out: Output) -> str:
    return (
        "" if out.topic.endswith(".features") else codec_for("DeadLetter").decode(out.value or b"")["error"]
    )


def _dead_offsets(outputs: list[Output]) -> list[int]:
    letters = [
        codec_for("DeadLetter").decode(o.value or b"") for o in outputs if o.topic.endswith("dead-letter")
    ]
    return [letter["source_offset"] for letter in letters]


def test_lone_surrogate_in_a_refused_event_leaves_no_trace_in_rolling_windows() -> None:
    # "\ud800" is a valid JSON escape and Python text, but not UTF-8: transform accepts the event and
    # pushes its amount into the window, then the Avro encoding fails and the event is dead-lettered.
    outputs = new_features_service().handle_through(
        messages(
            [
                ("shop-events", _raw({**SHOP_EVENT, "id": "\ud800", "amount": 1000.0})),
                ("shop-events", _raw({**SHOP_EVENT, "id": "b"})),
            ]
        )
    )
    assert outputs[0].topic == CATALOGUE.dead_letter("shop").name  # refused, as it should be
    fv = codec_for("FeatureVector").decode(outputs[1].value or b"")
    assert fv["features"]["amount_mean_5"] == 10.0  # but its 1000.0 stayed in the window: 505.0


def test_huge_finite_values_do_not_refuse_later_valid_events_of_the_key() -> None:
    outputs = new_features_service().handle_through(
        messages(
            [
                ("shop-events", _raw({**SHOP_EVENT, "id": "a", "amount": 1e308})),
                ("shop-events", _raw({**SHOP_EVENT, "id": "b", "amount": 1e308})),  # "intermediate overflow"
                ("shop-events", _raw({**SHOP_EVENT, "id": "c", "amount": 10.0})),  # and so is every later one
            ]
        )
    )
    assert _error(outputs[2]) == ""


def test_the_features_service_publishes_only_vectors_the_learner_accepts() -> None:
    service = new_features_service()
    raw = _raw({**AGRAWAL_EVENT, "salary": 5e-324, "loan": 1e6})  # loan_per_salary = 1e6 / 5e-324 = inf
    (out,) = service.handle_through(messages([(AGRAWAL["raw_topic"], raw)]))
    if out.topic == CATALOGUE.features("agrawal").name:  # the learner and the predictor dead-letter it
        service.engines["agrawal"].check_vector(codec_for("FeatureVector").decode(out.value or b""))


def _learner_errors(name: str, events: list[dict[str, Any]]) -> list[str]:
    """The errors of the dead letters the learner writes for the vectors of these raw events."""
    engine = FeatureEngine(LEARNER_PIPELINES[name])
    values = []
    for i, fields in enumerate(events):
        fv = engine.transform(
            {"fields": {**fields, "id": f"e{i}"}, "event_time": None}, timestamp_ms=0, now_ms=0
        )
        values.append((CATALOGUE.features(name).name, codec_for("FeatureVector").encode(fv)))
    return [
        _error(out) for out in new_learner().handle(messages(values)) if out.topic.endswith("dead-letter")
    ]


def test_a_class_label_of_another_type_does_not_stop_a_multiclass_learner() -> None:
    # Each label is a valid class on its own (coerce_label); after one `true`, every later record fails.
    errors = _learner_errors("shop", [{**SHOP_EVENT, "label": label} for label in ["a", True, "b", "a", "c"]])
    assert errors == []  # "'<' not supported between instances of 'bool' and 'str'" three times


def test_huge_finite_features_do_not_stop_the_learner() -> None:
    # After 1e200 the tree's Gaussian (x - mu) ** 2 overflowed on every later event of the class: numbers
    # are now bounded (±1e100) where they enter, and the largest allowed one leaves the learner working.
    engine = FeatureEngine(LEARNER_PIPELINES["shop"])
    with pytest.raises(ValidationError, match="beyond"):
        engine.transform({"fields": {**SHOP_EVENT, "amount": 1e200, "id": "x"}, "event_time": None},
                         timestamp_ms=0, now_ms=0)  # fmt: skip
    errors = _learner_errors(
        "shop", [{**SHOP_EVENT, "amount": a, "label": "a"} for a in [1e100, 1.0, 2.0, 3.0]]
    )
    assert errors == []


def _trump_event_after(hostile: tuple[str, bytes]) -> list[tuple[str, bytes | None]]:
    """A hostile record, then the three valid records of event v1 of pipeline trump-labels."""
    name = "trump-labels"
    fv = dict(event_id="v1", key=None, pipeline=name, pipeline_revision=1, features={"gallup": 40.0},
              label=None, event_time=KAFKA_TS, feature_time=KAFKA_TS, source=None)  # fmt: skip
    label = {"event_id": "v1", "pipeline": name, "label": 41.0, "label_time": KAFKA_TS}
    return [
        hostile,
        (CATALOGUE.features(name).name, codec_for("FeatureVector").encode(fv)),
        (CATALOGUE.predictions(name).name, codec_for("Prediction").encode(prediction(name, "v1", 41.5))),
        (CATALOGUE.labels(name).name, codec_for("Label").encode(label)),
    ]


def test_monitor_dead_letters_a_label_that_does_not_fit_the_task() -> None:
    label = {"event_id": "v1", "pipeline": "trump-labels", "label": "garbage", "label_time": KAFKA_TS}
    hostile = (CATALOGUE.labels("trump-labels").name, codec_for("Label").encode(label))
    outputs = new_monitor().handle(messages(_trump_event_after(hostile)))
    # expected: the hostile label (offset 0); today the valid prediction (2) fails on float("garbage")
    assert _dead_offsets(outputs) == [0]


def test_an_event_refused_by_a_derived_feature_leaves_no_trace_in_rolling_windows() -> None:
    # Both numbers are within ±1e100, their sum (step 'total', after the rolling steps) is not: the event
    # is dead-lettered, but its 9e99 is already in customer c1's window.
    event = {**SHOP_EVENT, "amount": 9e99, "discount": 9e99}
    outputs = new_features_service().handle_through(
        messages([("shop-events", _raw(event)), ("shop-events", _raw({**SHOP_EVENT, "id": "b"}))])
    )
    assert outputs[0].topic == CATALOGUE.dead_letter("shop").name  # "total = 1.8e+100 is out of range"
    fv = codec_for("FeatureVector").decode(outputs[1].value or b"")
    assert fv["features"]["amount_mean_5"] == 10.0  # today 4.5e+99


def test_a_prediction_the_monitor_dead_letters_leaves_no_trace() -> None:
    record = prediction("trump-labels", "v1", "not a number")  # a text prediction for a regression
    hostile = (CATALOGUE.predictions("trump-labels").name, codec_for("Prediction").encode(record))
    outputs = new_monitor().handle(messages(_trump_event_after(hostile)))
    # the hostile prediction only: it is refused before it joins (it used to take the event's served slot,
    # so the valid prediction (2) was dropped as a duplicate and the valid label (3) dead-lettered)
    assert _dead_offsets(outputs) == [0]


def test_monitor_dead_letters_feature_vectors_the_learner_refuses() -> None:
    # The learner dead-letters this vector (check_vector); the monitor adds its label to the classes it
    # picks ROC AUC's positive class from (once, for good) and its features to the drift windows.
    fv = dict(event_id="v1", key=None, pipeline="agrawal", pipeline_revision=1,
              features={"salary": math.nan, "no_such_feature": "x"}, label="garbage", event_time=KAFKA_TS,
              feature_time=KAFKA_TS, source=None)  # fmt: skip
    topic = CATALOGUE.features("agrawal").name
    outputs = new_monitor().handle(messages([(topic, codec_for("FeatureVector").encode(fv))]))
    assert [o.topic for o in outputs] == [CATALOGUE.dead_letter("agrawal").name]


def test_a_version_with_a_non_ascii_checksum_is_rejected_not_raised() -> None:
    # The TypeError escapes ModelRegistry._activate/_shadow and OnlineLearner.resume, which catch only
    # ArtifactRejectedError: the predictor skips the valid PROMOTE naming the version (CONTROL alert).
    with pytest.raises(artifacts.ArtifactRejectedError):
        artifacts.load({**signed(1, GOOD), "sha256": "é"}, KEY)


def test_a_forged_version_with_a_non_ascii_signature_does_not_stop_the_learner_starting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # build() calls load_versions() first: the learner cannot start while this record is on the
    # model-versions topic (compacted, kept forever).
    forged = codec_for("ModelVersion").encode(model_version(signature="é"))
    topic = CATALOGUE.model_versions().name
    monkeypatch.setattr(learner_app, "read_to_end", lambda *_a, **_k: [FakeMessage(topic, forged, 0)])
    new_learner().load_versions()


@pytest.mark.parametrize("where", ["feature step", "concept_params"])
def test_deeply_nested_parameters_are_a_validation_error(where: str) -> None:
    deep = "[" * 100_000
    if where == "feature step":
        definition = {
            **AGRAWAL,
            "feature_steps": [{**AGRAWAL["feature_steps"][0], "params": {"on_zero": deep}}],
        }
    else:
        definition = {**AGRAWAL, "monitoring": {**AGRAWAL["monitoring"], "concept_params": {"delta": deep}}}
    with pytest.raises(ValidationError):  # today: RecursionError (the control follower still skips it)
        validate_definition(definition, CATALOGUE)
