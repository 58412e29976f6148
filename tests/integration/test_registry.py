"""Pipeline contracts in a real Schema Registry (Apicurio, started by the tests): `pipeline apply` registers
the generated schemas under `<topic>-value` with BACKWARD compatibility and refuses an incompatible
revision with the registry's reason; raw events written by confluent-kafka's own AvroSerializer (with the
producer's own schema) become feature vectors and predictions that confluent-kafka's own AvroDeserializer
reads."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from confluent_kafka import Producer
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.serialization import MessageField, SerializationContext
from river import linear_model, preprocessing
from typer.testing import CliRunner, Result

from services.features.app import Features
from services.predictor.app import Predictor
from streamml import artifacts, cli, control, doctor
from streamml.codec import codec_for, encoder_for, use_registry
from streamml.contracts import contracts_of
from streamml.kafka import ensure_topics
from streamml.registry import Registry, is_framed
from streamml.runtime import read_to_end
from streamml.service import framed_topics, prepare
from streamml.settings import Settings, get_settings
from streamml.topics import Catalogue

REPO = Path(__file__).resolve().parents[2]
AGRAWAL = REPO / "pipelines" / "agrawal.yaml"


@pytest.fixture
def isolated(kafka_bootstrap: str, registry_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """Settings with a topic prefix of this test only (so subjects too), also given to the CLI."""
    settings = Settings(
        bootstrap_servers=kafka_bootstrap,
        topic_prefix=f"t{uuid.uuid4().hex[:10]}",
        schema_registry_url=registry_url,
    )
    monkeypatch.setenv("STREAMML_BOOTSTRAP_SERVERS", settings.bootstrap_servers)
    monkeypatch.setenv("STREAMML_TOPIC_PREFIX", settings.topic_prefix)
    monkeypatch.setenv("STREAMML_SCHEMA_REGISTRY_URL", registry_url)
    get_settings.cache_clear()
    yield settings
    get_settings.cache_clear()
    use_registry(None)  # (a test may have given the process's codecs one)


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli.app, list(args))


def pipeline_file(tmp_path: Path, change: Any = None) -> Path:
    spec = yaml.safe_load(AGRAWAL.read_text())
    if change is not None:
        change(spec)
    path = tmp_path / f"agrawal-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_apply_registers_typed_contracts_and_refuses_an_incompatible_revision(
    isolated: Settings, registry_url: str, tmp_path: Path
) -> None:
    catalogue = Catalogue(isolated)
    raw, features = catalogue.raw("agrawal").name, catalogue.features("agrawal").name
    client = SchemaRegistryClient({"url": registry_url})

    first = invoke("pipeline", "apply", str(AGRAWAL))
    assert first.exit_code == 0, first.output
    for topic in (raw, features):
        latest = client.get_latest_version(f"{topic}-value")
        assert client.get_compatibility(f"{topic}-value") == "BACKWARD"
        schema = json.loads(latest.schema.schema_str)
        assert schema["namespace"] == "dev.streamml.pipelines.agrawal"
    features_schema = json.loads(client.get_latest_version(f"{features}-value").schema.schema_str)
    typed = {f["name"]: f["type"] for f in features_schema["fields"][4]["type"]["fields"]}
    assert typed["zipcode_mean_salary_100"] == ["null", "double"] and len(typed) == 14

    def add_feature(spec: dict[str, Any]) -> None:  # a new model input: a field with a default (null)
        spec["features"].append({"op": "log1p", "output": "log_loan", "inputs": ["loan"]})

    second = invoke("pipeline", "apply", str(pipeline_file(tmp_path, add_feature)))
    assert second.exit_code == 0, second.output
    assert len(client.get_versions(f"{features}-value")) == 2

    def retype(spec: dict[str, Any]) -> None:  # salary becomes text: old raw events no longer fit
        spec["fields"]["salary"] = "string"
        spec["features"] = [s for s in spec["features"] if "salary" not in s["inputs"]]

    refused = invoke("pipeline", "apply", str(pipeline_file(tmp_path, retype)))
    assert refused.exit_code != 0
    message = " ".join(str(refused.exception).split())
    assert f"{raw}-value" in message and "salary" in message, message
    state = control.read_pipelines(isolated)
    assert state.current["agrawal"]["revision"] == 2  # nothing published
    assert len(client.get_versions(f"{raw}-value")) == 2  # nothing registered


def test_raw_events_from_a_confluent_avro_producer_become_feature_vectors(
    isolated: Settings, registry_url: str
) -> None:
    """The producer's own schema, registered by confluent-kafka's AvroSerializer under the raw topic's subject
    (the registry accepts it only if BACKWARD compatible with the pipeline's contract): no docs, event ids
    as longs, a field of its own; our features service reads the records with it."""
    applied = invoke("pipeline", "apply", str(AGRAWAL))
    assert applied.exit_code == 0, applied.output
    catalogue = Catalogue(isolated)
    raw = catalogue.raw("agrawal").name
    theirs = {
        "type": "record",
        "name": "RawEvent",
        "namespace": "dev.streamml.pipelines.agrawal",
        "fields": [
            {"name": "event_id", "type": ["long", "string"]},
            *({"name": n, "type": "double"} for n in ("salary", "commission")),
            *({"name": n, "type": "long"} for n in ("age", "elevel", "car", "zipcode")),
            {"name": "hvalue", "type": "double"},
            {"name": "hyears", "type": "long"},
            {"name": "loan", "type": "double"},
            {"name": "label", "type": ["null", "boolean", "long", "string"], "default": None},
            {"name": "branch", "type": "string", "default": "main"},
        ],
    }
    client = SchemaRegistryClient({"url": registry_url})
    serializer = AvroSerializer(client, json.dumps(theirs), conf={"auto.register.schemas": True})
    events = [
        {
            "event_id": 1000 + i, "salary": 50_000.0 + i, "commission": 0.0, "hvalue": 90_000.0,
            "loan": 10_000.0, "age": 40, "elevel": 2, "car": 3, "zipcode": i % 3, "hyears": 10,
            "label": i % 2 == 0, "branch": "north",
        }
        for i in range(6)
    ]  # fmt: skip
    producer = Producer({"bootstrap.servers": isolated.bootstrap_servers})
    for event in events:
        producer.produce(raw, serializer(event, SerializationContext(raw, MessageField.VALUE)))
    assert producer.flush(30) == 0
    # their schema went to the same subject: the registry found it compatible with the pipeline's contract
    assert len(client.get_versions(f"{raw}-value")) == 2

    service = Features(isolated, catalogue)
    state = control.read_pipelines(isolated)
    service.on_pipeline(state.current["agrawal"], None)
    ensure_topics(isolated, catalogue.pipeline_topics("agrawal"))
    out = service.handle_through(read_to_end(isolated, raw))
    written = [o.value for o in out if o.topic.endswith(".features")]
    assert written and all(v is not None and is_framed(v) for v in written)  # typed, Confluent-framed
    # our readers (learner, predictor, monitor, trainer) decode them through the process's registry
    use_registry(Registry(isolated))
    decode = codec_for("FeatureVector").decode
    vectors = {v["event_id"]: v for v in (decode(b) for b in written if b is not None)}
    # ... and so does a consumer that has nothing but confluent-kafka's own AvroDeserializer
    deserializer = AvroDeserializer(client)
    features_topic = catalogue.features("agrawal").name
    theirs_read = [deserializer(b, SerializationContext(features_topic, MessageField.VALUE)) for b in written]
    by_id = {r["event_id"]: r for r in theirs_read if r is not None}
    assert by_id["1003"]["features"]["salary"] == 50_003.0 and by_id["1003"]["features"]["log_hvalue"] > 11
    assert by_id["1003"]["pipeline"] == "agrawal" and by_id["1003"]["source"]["topic"] == raw
    assert sorted(vectors) == [str(1000 + i) for i in range(6)], [o.topic for o in out]
    assert vectors["1000"]["features"]["salary"] == 50_000.0 and vectors["1000"]["label"] is True
    counts = sorted(vectors[e]["features"]["zipcode_count_100"] for e in ("1002", "1005"))  # key 2 twice
    assert counts == [1.0, 2.0]
    assert "branch" not in vectors["1000"]["features"]  # not declared: not a model input
    contract = contracts_of(state.current["agrawal"]).raw
    assert contract.schema["name"] == "RawEvent"

    # The predictor scores those vectors and writes framed predictions under the predictions topic's
    # subject: AvroDeserializer reads them, and so do our own readers (the monitor's codec).
    predictor = Predictor(isolated, catalogue)
    predictor.registry.signing_key = MODEL_KEY
    predictor.registry.fetch = None
    predictor.on_pipeline(state.current["agrawal"], None)
    predictor.on_version(signed_version(), None)
    predictor.on_promotion(promoted(), None)
    feature_msgs = [_Msg(features_topic, b, i) for i, b in enumerate(written)]
    predictions = [
        o for o in predictor.handle(feature_msgs) if o.topic == catalogue.predictions("agrawal").name
    ]
    assert len(predictions) == 6 and all(o.value is not None and is_framed(o.value) for o in predictions)
    topic = catalogue.predictions("agrawal").name
    theirs_preds = [
        deserializer(o.value, SerializationContext(topic, MessageField.VALUE)) for o in predictions
    ]
    ours_preds = [codec_for("Prediction").decode(o.value or b"") for o in predictions]
    assert [p["event_id"] for p in theirs_preds] == [p["event_id"] for p in ours_preds]
    assert {p["event_id"] for p in ours_preds} == {str(1000 + i) for i in range(6)}
    assert all(p["model_name"] == "online" and p["model_version"] == 1 for p in theirs_preds)
    assert client.get_latest_version(f"{topic}-value").schema.schema_str is not None

    # A raw record nobody can read is dead-lettered on the pipeline's dead-letter topic, framed under that
    # topic's subject (registered when the service loaded the pipeline, the registry being in use).
    producer.produce(raw, b"not an event")
    assert producer.flush(30) == 0
    later = Features(isolated, catalogue)
    later.on_pipeline(state.current["agrawal"], None)
    dead_topic = catalogue.dead_letter("agrawal").name
    raw_msgs = read_to_end(isolated, raw)
    bad = next(m for m in raw_msgs if m.value() == b"not an event")
    dead = [o.value for o in later.handle_through(raw_msgs) if o.topic == dead_topic]
    assert len(dead) == 1 and dead[0] is not None and is_framed(dead[0])
    letter = deserializer(dead[0], SerializationContext(dead_topic, MessageField.VALUE))
    assert letter["source_topic"] == raw and letter["original_value"] == b"not an event"
    ours = codec_for("DeadLetter").decode(dead[0])
    assert (ours["source_partition"], ours["source_offset"]) == (bad.partition(), bad.offset())


def test_control_records_are_framed_under_their_topics_subjects(
    isolated: Settings, registry_url: str
) -> None:
    """With a registry, the control topics a service writes carry the Confluent wire format under their own
    subjects (registered at the service's start), and so does what the CLI publishes: confluent-kafka's own
    AvroDeserializer reads them, and so do our readers (the CLI's, a service's control follower)."""
    applied = invoke("pipeline", "apply", str(AGRAWAL))  # the CLI publishes the definition
    assert applied.exit_code == 0, applied.output
    catalogue = Catalogue(isolated)
    client = SchemaRegistryClient({"url": registry_url})
    deserializer = AvroDeserializer(client)
    pipelines_topic = catalogue.pipelines().name
    (definition,) = read_to_end(isolated, pipelines_topic)
    framed = definition.value()
    assert framed is not None and is_framed(framed)
    theirs = deserializer(framed, SerializationContext(pipelines_topic, MessageField.VALUE))
    assert theirs["name"] == "agrawal" and theirs["revision"] == 1
    assert control.read_pipelines(isolated).current["agrawal"]["revision"] == 1  # ours, in this process

    # A controller's start registers the topics it writes; its decisions and requests are framed.
    prepare(isolated, "controller")
    promotions = catalogue.promotions().name
    value = encoder_for(promotions, "Promotion").encode(promoted())
    assert is_framed(value)
    assert deserializer(value, SerializationContext(promotions, MessageField.VALUE))["version"] == 1
    assert codec_for("Promotion").decode(value)["actor"] == "auto"
    written = {topic for topic, _schema in framed_topics(catalogue, "controller")}
    assert {promotions, catalogue.training_requests().name, catalogue.dead_letters().name} <= written
    assert catalogue.controller_state().name not in written  # its own state: read by itself alone
    assert {f"{t}-value" for t in written} <= set(client.get_subjects())
    assert not is_framed(encoder_for(catalogue.evaluations().name, "Evaluation").encode(evaluation()))


MODEL_KEY = b"registry-test-model-key"


class _Msg:
    """A consumed record as the predictor's handler reads it."""

    def __init__(self, topic: str, value: bytes | None, offset: int) -> None:
        self._topic, self._value, self._offset = topic, value, offset

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return None

    def value(self) -> bytes | None:
        return self._value

    def headers(self) -> None:
        return None

    def timestamp(self) -> tuple[int, int]:
        return (1, 0)

    def error(self) -> None:
        return None


def signed_version() -> dict[str, Any]:
    """A signed online version 1 (River) of the agrawal pipeline."""
    model = preprocessing.StandardScaler() | linear_model.LogisticRegression()
    model.learn_one({"salary": 1.0}, True)
    data = artifacts.serialize({"model": model, "metrics": {}})
    return {
        "pipeline": "agrawal", "model_name": "online", "version": 1, "kind": "ONLINE",
        "estimator_spec": "x", "params": {}, "artifact_format": artifacts.FORMAT, "artifact": data,
        "artifact_uri": None, "sha256": artifacts.sha256_hex(data),
        "signature": artifacts.sign(data, MODEL_KEY),
        "library_versions": artifacts.library_versions(), "metrics": {}, "training_data": [],
        "events_seen": 1, "parent_version": None, "created_at": 1,
    }  # fmt: skip


def evaluation() -> dict[str, Any]:
    """An Evaluation record (the monitor writes them; the controller does not: single-object here)."""
    return {
        "pipeline": "agrawal", "champion_model": "online", "champion_version": 1, "challenger_model": "batch",
        "challenger_version": 1, "metric": "accuracy", "higher_is_better": True, "champion_value": 0.5,
        "challenger_value": 0.6, "labels": 10, "evaluated_at": 1,
    }  # fmt: skip


def promoted() -> dict[str, Any]:
    return {
        "pipeline": "agrawal", "model_name": "online", "action": "PROMOTE", "version": 1,
        "previous_version": None, "actor": "auto", "reason": "", "metrics": {}, "decided_at": 1,
    }  # fmt: skip


def test_doctor_checks_the_registry_holds_every_pipelines_contracts(isolated: Settings) -> None:
    assert invoke("pipeline", "apply", str(AGRAWAL)).exit_code == 0
    (ok,) = doctor.registry(isolated, {"agrawal": None})
    assert ok.status == "ok", ok
    (missing,) = doctor.registry(isolated, {"agrawal": None, "phishing": None})
    assert missing.status == "warn" and "phishing.raw-value" in missing.detail
    away = isolated.model_copy(update={"schema_registry_url": "http://127.0.0.1:1/apis/ccompat/v7"})
    (failed,) = doctor.registry(away, {"agrawal": None})
    assert failed.status == "fail" and failed.fix
    (skipped,) = doctor.registry(isolated.model_copy(update={"schema_registry_url": None}), {})
    assert skipped.status == "skip"


def test_adding_a_feature_keeps_consumers_built_on_the_old_contract_working(
    isolated: Settings, registry_url: str, tmp_path: Path
) -> None:
    """Schema evolution end to end: revision 2 adds a model input. The features service writes its vectors
    with the new schema version; a consumer built on revision 1's contract (confluent-kafka's
    AvroDeserializer with that reader schema) goes on reading every vector, old and new, and StreamML's own
    readers see the new feature in the new ones."""
    catalogue = Catalogue(isolated)
    features_topic = catalogue.features("agrawal").name
    raw = catalogue.raw("agrawal").name
    assert invoke("pipeline", "apply", str(AGRAWAL)).exit_code == 0
    ensure_topics(isolated, catalogue.pipeline_topics("agrawal"))
    first = control.read_pipelines(isolated).current["agrawal"]
    old_contract = contracts_of(first).features

    def add_feature(spec: dict[str, Any]) -> None:
        spec["features"].append({"op": "log1p", "output": "log_loan", "inputs": ["loan"]})

    service = Features(isolated, catalogue)
    service.on_pipeline(first, None)
    event = {
        "event_id": "e0", "salary": 50_000.0, "commission": 0.0, "age": 40, "elevel": 1, "car": 3,
        "zipcode": 2, "hvalue": 100_000.0, "hyears": 10, "loan": 20_000.0, "label": 1,
    }  # fmt: skip
    before = _features_of(service, raw, [{**event, "event_id": "v1-0"}])
    applied = invoke("pipeline", "apply", str(pipeline_file(tmp_path, add_feature)))
    assert applied.exit_code == 0, applied.output
    second = control.read_pipelines(isolated).current["agrawal"]
    service.on_pipeline(second, None)
    after = _features_of(service, raw, [{**event, "event_id": "v2-0"}])
    assert all(is_framed(v) for v in before + after)
    assert before[0][1:5] != after[0][1:5]  # a new schema id: the new version of the subject

    client = SchemaRegistryClient({"url": registry_url})
    old_reader = AvroDeserializer(client, schema_str=old_contract.text())
    context = SerializationContext(features_topic, MessageField.VALUE)
    old_view = [old_reader(v, context) for v in before + after]
    assert [r["event_id"] for r in old_view] == ["v1-0", "v2-0"]
    assert all("log_loan" not in r["features"] and r["features"]["salary"] == 50_000.0 for r in old_view)
    use_registry(Registry(isolated))
    ours = [codec_for("FeatureVector").decode(v) for v in before + after]
    assert "log_loan" not in ours[0]["features"] and ours[1]["features"]["log_loan"] > 9.9


def _features_of(service: Features, raw_topic: str, events: list[dict[str, Any]]) -> list[bytes]:
    """The typed feature vectors the service writes for these raw events (JSON, as a producer sends)."""
    msgs = [_Msg(raw_topic, json.dumps(e).encode(), i) for i, e in enumerate(events)]
    out = service.handle_through(msgs)  # type: ignore[arg-type]
    return [o.value for o in out if o.topic.endswith(".features") and o.value is not None]
