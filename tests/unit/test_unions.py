"""Union branches named up front (streamml.unions): the same bytes as fastavro's own search, or the same
refusal, for every contract and for records that do not fit it."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import fastavro
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamml import unions
from streamml.codec import codec_for
from streamml.contracts import contracts_of
from streamml.pipelines import load_file, to_definition
from streamml.schemas import all_schemas
from tests.unit.fuzz_strategies import avro_values, records_of

REPO = Path(__file__).resolve().parents[2]
NAMES = sorted(all_schemas())


def _plain(parsed: Any, record: Any) -> bytes | type[Exception]:
    buf = io.BytesIO()
    try:
        fastavro.schemaless_writer(buf, parsed, record)
    except Exception as exc:
        return type(exc)
    return buf.getvalue()


def _hinted(parsed: Any, record: Any) -> bytes | type[Exception]:
    hint = unions.hinter(parsed)
    buf = io.BytesIO()
    try:
        fastavro.schemaless_writer(buf, parsed, record if hint is None else hint(record))
    except Exception as exc:
        return type(exc)
    return buf.getvalue()


def _same(parsed: Any, record: Any) -> None:
    plain, hinted = _plain(parsed, record), _hinted(parsed, record)
    if isinstance(plain, bytes):
        assert hinted == plain
    else:  # refused either way (the exception type may differ: a failed search vs a failed write)
        assert not isinstance(hinted, bytes), (record, plain)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_contract_writes_the_same_bytes_with_named_branches(name: str, data: st.DataObject) -> None:
    parsed = codec_for(name).schema.parsed
    _same(parsed, data.draw(records_of(name)))


# Values of the wrong type in every place a union takes: bools where numbers go, ints where only doubles
# go, lists and dicts where scalars go, records missing fields.
_misfits = st.one_of(
    st.booleans(), st.integers(), st.floats(), st.text(max_size=3), st.none(),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)  # fmt: skip


@pytest.mark.parametrize("name", ["FeatureVector", "Prediction", "DriftAlert", "ModelVersion"])
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_records_that_do_not_fit_are_refused_either_way(name: str, data: st.DataObject) -> None:
    parsed = codec_for(name).schema.parsed
    record = dict(data.draw(records_of(name)))
    field = data.draw(st.sampled_from(sorted(record)))
    record[field] = data.draw(_misfits)
    _same(parsed, record)


@pytest.mark.parametrize("pipeline", sorted(p.stem for p in (REPO / "pipelines").glob("*.yaml")))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_typed_pipeline_contracts_write_the_same_bytes(pipeline: str, data: st.DataObject) -> None:
    d = to_definition(load_file(REPO / "pipelines" / f"{pipeline}.yaml"), "p.raw").to_avro()
    for contract in (contracts_of(d).features, contracts_of(d).raw):
        record = data.draw(avro_values(contract.schema))
        _same(contract.parsed, record)


def test_only_types_that_name_one_branch_are_hinted() -> None:
    hints = unions.branch_hints(["null", "int", "long", "double", "string", {"type": "enum", "name": "E",
                                 "symbols": ["A"]}, {"type": "map", "values": "long"}])  # fmt: skip
    assert {t: name for t, (name, _) in hints.items()} == {float: "double", dict: "map"}


def test_the_callers_record_is_not_changed() -> None:
    parsed = codec_for("Prediction").schema.parsed
    hint = unions.hinter(parsed)
    assert hint is not None
    record = {"key": "k", "score": 0.5, "source": {"topic": "t", "partition": 0, "start_offset": 1,
              "end_offset": 2}, "probabilities": {"a": 1.0}}  # fmt: skip
    before = repr(record)
    hinted = hint(record)
    assert repr(record) == before
    assert hinted["key"] == ("string", "k") and hinted["score"] == ("double", 0.5)
    assert hinted["source"][0] == "dev.streamml.OffsetRange"
