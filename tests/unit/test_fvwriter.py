"""The FeatureVector and Prediction writers (streamml.fvwriter) write fastavro's bytes for every record they
take, and leave every other record to fastavro (which writes it or refuses it with its reason)."""

from __future__ import annotations

import io
import math
from typing import Any

import fastavro
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamml import fvwriter
from streamml.codec import HEADER_LEN, codec_for
from streamml.errors import SchemaError
from streamml.schemas import get_schema
from tests.unit.fuzz_strategies import records_of

WRITERS = {"FeatureVector": fvwriter.feature_vector, "Prediction": fvwriter.prediction}


def _fastavro(name: str, record: Any) -> bytes | None:
    buf = io.BytesIO()
    try:
        fastavro.schemaless_writer(buf, get_schema(name).parsed, record)
    except Exception:
        return None
    return buf.getvalue()


def _same(name: str, record: Any) -> None:
    ours = WRITERS[name](record)
    if ours is not None:  # taken: fastavro writes exactly these bytes
        assert ours == _fastavro(name, record), record


def test_the_writers_follow_the_current_contracts() -> None:
    for name in WRITERS:
        assert fvwriter.writer_for(name, get_schema(name).raw) is WRITERS[name]
        assert codec_for(name)._write is WRITERS[name]
    assert fvwriter.writer_for("FeatureVector", get_schema("Prediction").raw) is None
    assert codec_for("DriftAlert")._write is None


@pytest.mark.parametrize("name", sorted(WRITERS))
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_record_taken_is_written_as_fastavro_writes_it(name: str, data: st.DataObject) -> None:
    _same(name, data.draw(records_of(name)))


_misfits = st.one_of(
    st.booleans(), st.integers(), st.floats(), st.text(max_size=3), st.none(), st.binary(max_size=2),
    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    st.dictionaries(st.integers(), st.floats(), max_size=2), st.just(2**70), st.just("\ud800"),
)  # fmt: skip


@pytest.mark.parametrize("name", sorted(WRITERS))
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_records_that_do_not_fit_are_left_to_fastavro(name: str, data: st.DataObject) -> None:
    record = dict(data.draw(records_of(name)))
    how = data.draw(st.sampled_from(["replace", "drop", "feature"]))
    field = data.draw(st.sampled_from(sorted(record)))
    if how == "replace":
        record[field] = data.draw(_misfits)
    elif how == "drop":
        del record[field]
    else:
        maps = "features" if name == "FeatureVector" else "probabilities"
        record[maps] = {**record[maps], data.draw(st.text(max_size=3)): data.draw(_misfits)}
    _same(name, record)


def test_the_codec_writes_through_them_and_still_refuses_what_fastavro_refuses() -> None:
    codec = codec_for("Prediction")
    record = {
        "event_id": "e1", "key": None, "pipeline": "agrawal", "model_name": "online", "model_version": 7,
        "prediction": True, "score": 0.25, "probabilities": {"True": 0.25, "False": 0.75}, "shadow": False,
        "event_time": 1, "feature_time": 2, "prediction_time": 3,
        "source": {"topic": "p.agrawal.features", "partition": 0, "start_offset": 5, "end_offset": 6},
    }  # fmt: skip
    assert fvwriter.prediction(record) is not None  # taken by ours, not handed to fastavro
    data = codec.encode(record)
    assert data[HEADER_LEN:] == _fastavro("Prediction", record) and codec.decode(data) == record
    with pytest.raises(SchemaError):
        codec.encode({**record, "model_version": "seven"})
    vector = {
        "event_id": "e1", "key": "3", "pipeline": "agrawal", "pipeline_revision": 2,
        "features": {"salary": 1.0, "car": "red", "age": -0.0, "hvalue": math.inf}, "label": 1,
        "event_time": 1, "feature_time": 2, "source": None,
    }  # fmt: skip
    fv = codec_for("FeatureVector")
    assert fvwriter.feature_vector(vector) is not None
    assert fv.encode(vector)[HEADER_LEN:] == _fastavro("FeatureVector", vector)
    again = {**vector, "features": {"salary": 2.0, "car": 3.0, "age": 4.0, "hvalue": 5.0}}  # a layout now
    assert fvwriter.feature_vector(again) is not None
    assert fv.encode(again)[HEADER_LEN:] == _fastavro("FeatureVector", again)
    assert fv.encode(again)[HEADER_LEN:] == _fastavro("FeatureVector", again)


def test_longs_are_fastavros_at_every_width_and_through_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every varint width (the unrolled ones and the loop), both signs, each boundary, written twice (the
    second time from the cache of recent values), and with the cache emptied while full."""
    monkeypatch.setattr(fvwriter, "_VARINTS_MAX", 300)
    edges = [s * ((1 << k) + d) for k in range(64) for d in (-1, 0, 1) for s in (1, -1)]
    values = [v for v in edges if fvwriter._LONG_MIN <= v <= fvwriter._LONG_MAX]
    values += [fvwriter._LONG_MIN, fvwriter._LONG_MAX, 1_796_281_423_769]
    for v in values + values:
        out = io.BytesIO()
        fastavro.schemaless_writer(out, {"type": "long"}, v)  # type: ignore[arg-type]
        assert fvwriter._long(v) == out.getvalue(), v
    for unfit in (True, 1.0, 1 << 63, -(1 << 63) - 1):
        with pytest.raises(fvwriter.Unfit):
            fvwriter._long(unfit)
