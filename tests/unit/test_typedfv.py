"""The typed FeatureVector reader and writer (streamml.typedfv) read and write what fastavro reads and writes
for every pipeline's generated contract, and leave everything else to fastavro."""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

import fastavro
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamml import typedfv, unions
from streamml.contracts import contracts_of, features_contract
from streamml.errors import DecodeError, SchemaError
from streamml.pipelines import load_file, to_definition
from streamml.registry import FramedEncoder, Registry, _renamed_features, frame
from streamml.schemas import get_schema, strip_logical_types
from streamml.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def _definition(name: str) -> dict[str, Any]:
    return to_definition(load_file(REPO / "pipelines" / f"{name}.yaml"), f"p.{name}.raw").to_avro()


def _odd_definition() -> dict[str, Any]:
    """Text features, a name Avro cannot take (renamed in the contract) and a multiclass label."""
    d = copy.deepcopy(_definition("agrawal"))
    d["fields"] += [
        {"name": "city name", "type": "STRING", "required": False, "default": None},
        {"name": "2nd-score", "type": "FLOAT", "required": False, "default": None},
    ]
    d["task"] = "MULTICLASS"
    return d


DEFINITIONS = {
    **{n: _definition(n) for n in ("agrawal", "phishing", "trump")},
    "odd": _odd_definition(),
}
REGISTRY = Registry(Settings(schema_registry_url="http://127.0.0.1:9"))  # never called: ids are remembered


def _registered(name: str, schema_id: int) -> tuple[Any, FramedEncoder]:
    contract = features_contract(DEFINITIONS[name])
    REGISTRY.remember(schema_id, contract.schema, contract.parsed)
    return contract, FramedEncoder(contract, schema_id)


def _setup(name: str, schema_id: int) -> tuple[Any, FramedEncoder, typedfv.TypedVectors]:
    """The pipeline's contract remembered under `schema_id`, its encoder and its typed reader/writer."""
    contract, encoder = _registered(name, schema_id)
    fast = typedfv.for_schema(contract.schema, _renamed_features(contract.schema))
    assert fast is not None
    return contract, encoder, fast


def _fastavro_bytes(contract: Any, record: dict[str, Any]) -> bytes | None:
    rename = {orig: avro for avro, orig in _renamed_features(contract.schema).items()}
    datum = {**record, "features": {rename.get(k, k): v for k, v in record["features"].items()}}
    hint = unions.hinter(contract.parsed)
    buf = io.BytesIO()
    try:
        fastavro.schemaless_writer(buf, contract.parsed, datum if hint is None else hint(datum))
    except Exception:
        return None
    return buf.getvalue()


def _fastavro_read(contract: Any, body: bytes) -> dict[str, Any]:
    parsed = fastavro.parse_schema(strip_logical_types(contract.schema))
    record = fastavro.schemaless_reader(io.BytesIO(body), parsed, None)
    renamed = _renamed_features(contract.schema)
    record["features"] = {renamed.get(k, k): v for k, v in record["features"].items() if v is not None}
    return record


LABELS = {
    "BINARY": st.one_of(st.none(), st.booleans(), st.integers(0, 1)),
    "MULTICLASS": st.one_of(st.none(), st.text(min_size=1, max_size=5)),
    "REGRESSION": st.one_of(st.none(), st.floats(allow_nan=False)),
}
longs = st.integers(-(2**63), 2**63 - 1)


@st.composite
def vectors(draw: st.DrawFn, name: str) -> dict[str, Any]:
    d = DEFINITIONS[name]
    kinds = {f["name"]: f["type"] for f in d["fields"]}
    contract = features_contract(d)
    renamed = _renamed_features(contract.schema)
    names = [renamed.get(f["name"], f["name"]) for f in contract.schema["fields"][4]["type"]["fields"]]
    features: dict[str, Any] = {}
    for n in names:
        value = draw(
            st.one_of(st.none(), st.text(max_size=6))
            if kinds.get(n) == "STRING"
            else st.one_of(st.none(), st.floats(allow_nan=False), st.floats())
        )
        if value is not None:
            features[n] = value
    if draw(st.booleans()):
        features = {
            n: 1.5 if kinds.get(n) != "STRING" else "x" for n in names
        }  # the common case: all present
    source = draw(
        st.one_of(
            st.none(),
            st.fixed_dictionaries(
                {
                    "topic": st.text(min_size=1, max_size=8),
                    "partition": st.integers(0, 2**31 - 1),
                    "start_offset": longs,
                    "end_offset": longs,
                }
            ),
        )
    )
    return {
        "event_id": draw(st.text(max_size=10)),
        "key": draw(st.one_of(st.none(), st.text(max_size=6))),
        "pipeline": d["name"],
        "pipeline_revision": draw(longs),
        "features": features,
        "label": draw(LABELS[d["task"]]),
        "event_time": draw(longs),
        "feature_time": draw(longs),
        "source": source,
    }


def test_every_generated_contract_gets_them_and_nothing_else_does() -> None:
    for name, d in DEFINITIONS.items():
        contract = contracts_of(d).features
        assert typedfv.for_schema(contract.schema) is not None, name
        assert typedfv.for_schema(contracts_of(d).raw.schema) is None
    assert typedfv.for_schema(get_schema("FeatureVector").raw) is None  # the generic contract: fvreader's
    changed = copy.deepcopy(features_contract(DEFINITIONS["agrawal"]).schema)
    changed["fields"].append({"name": "extra", "type": "long", "default": 0})
    assert typedfv.for_schema(changed) is None
    changed = copy.deepcopy(features_contract(DEFINITIONS["agrawal"]).schema)
    changed["fields"][4]["type"]["fields"][0]["type"] = "double"  # not nullable: another layout
    assert typedfv.for_schema(changed) is None
    assert typedfv.for_schema({"type": "nonsense"}) is None


@pytest.mark.parametrize("name", sorted(DEFINITIONS))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_records_are_written_and_read_as_fastavro_does(name: str, data: st.DataObject) -> None:
    schema_id = 100 + sorted(DEFINITIONS).index(name)
    contract, encoder, fast = _setup(name, schema_id)
    record = data.draw(vectors(name))
    expected = _fastavro_bytes(contract, record)
    ours = fast.write(record)
    if ours is not None:
        assert ours == expected
    try:
        framed = encoder.encode(record)
    except SchemaError:
        assert expected is None  # refused by fastavro's words, as before
        return
    assert framed == frame(schema_id, expected or b"")
    theirs = _fastavro_read(contract, framed[5:])
    try:
        assert repr(fast.read(framed, 5)) == repr(theirs)  # (NaN: by its text)
    except typedfv.Malformed:  # (longs of 10 bytes: fastavro reads those)
        longs = [record[k] for k in ("pipeline_revision", "event_time", "feature_time")]
        longs += [record["source"][k] for k in ("start_offset", "end_offset")] if record["source"] else []
        assert any(abs(n) >= 2**62 for n in longs)
    assert repr(REGISTRY.decode_features(framed)) == repr(theirs)


@pytest.mark.parametrize("name", sorted(DEFINITIONS))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_damaged_bodies_are_read_as_fastavro_reads_them_or_refused(name: str, data: st.DataObject) -> None:
    contract, encoder, fast = _setup(name, 200 + sorted(DEFINITIONS).index(name))
    try:
        framed = bytearray(encoder.encode(data.draw(vectors(name))))
    except SchemaError:
        return
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(5, len(framed) - 1))
        framed[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(5, len(framed)))
    damaged = bytes(framed[:cut])
    try:
        theirs: Any = _fastavro_read(contract, damaged[5:])
    except Exception:
        theirs = "refused"
    try:
        ours: Any = fast.read(damaged, 5)
    except Exception:
        ours = "refused"
    if ours != "refused":  # what it reads, fastavro reads the same way
        assert repr(ours) == repr(theirs)
    try:
        got: Any = REGISTRY.decode_features(damaged)
    except DecodeError:
        got = "refused"
    if theirs == "refused" or not isinstance(theirs.get("event_id"), str):
        assert got == "refused"
    else:
        assert repr(got) == repr(theirs)
