"""The Prediction reader (streamml.predreader) gives what fastavro gives: the same record for every
prediction a writer of the contract produces; on a body it does not expect it raises, and the codec (and
the registry, for framed predictions) then gives what fastavro gives (the record, or a DecodeError)."""

from __future__ import annotations

import io
from typing import Any

import fastavro
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamml import fvwriter, predreader
from streamml.codec import FAST_READERS, HEADER_LEN, codec_for
from streamml.contracts import generic_contract
from streamml.errors import DecodeError
from streamml.fvreader import Malformed
from streamml.registry import Registry, frame
from streamml.schemas import get_schema
from streamml.settings import Settings
from tests.unit.fuzz_strategies import records_of

PARSED = get_schema("Prediction").parsed


def _fastavro(body: bytes) -> Any:
    """What fastavro reads from `body`, or the type of what it raises."""
    try:
        record = fastavro.schemaless_reader(io.BytesIO(body), PARSED, None)
    except Exception as exc:
        return type(exc)
    return record


def _body(record: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, PARSED, record)
    return buf.getvalue()


def _huge(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_huge(v) for v in value.values())
    return isinstance(value, int) and not isinstance(value, bool) and not -(2**62) <= value < 2**62


def test_the_codec_reads_predictions_through_it_while_the_contract_is_the_one_it_follows() -> None:
    assert codec_for("Prediction")._fast is predreader.read
    assert FAST_READERS[fvwriter.PREDICTION] is predreader.read
    assert codec_for("Prediction").canonical == fvwriter.PREDICTION
    assert codec_for("DriftAlert")._fast is None


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record=records_of("Prediction"))
def test_every_prediction_reads_as_fastavro_reads_it(record: dict[str, Any]) -> None:
    try:
        body = _body(record)
    except Exception:
        return  # not a record of the contract (the strategy is hostile)
    if _huge(record):  # |n| >= 2**62 takes 10 bytes: left to fastavro
        with pytest.raises(Malformed):
            predreader.read(body)
    else:
        assert repr(predreader.read(body)) == repr(_fastavro(body))  # (NaN and -0.0 by their text)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(record=records_of("Prediction"), data=st.data())
def test_damaged_bodies_are_refused_or_read_as_fastavro_reads_them(
    record: dict[str, Any], data: st.DataObject
) -> None:
    try:
        body = bytearray(_body(record))
    except Exception:
        return
    how = data.draw(st.sampled_from(["truncate", "flip", "insert"]))
    at = data.draw(st.integers(0, len(body)))
    if how == "truncate":
        body = body[:at]
    elif how == "flip" and body:
        body[min(at, len(body) - 1)] = data.draw(st.integers(0, 255))
    else:
        body[at:at] = data.draw(st.binary(min_size=1, max_size=4))
    damaged = bytes(body)
    theirs = _fastavro(damaged)
    try:
        ours: Any = predreader.read(damaged)
    except Exception:
        ours = None
    if ours is not None:  # read by ours: exactly what fastavro reads
        assert repr(ours) == repr(theirs)
    codec = codec_for("Prediction")
    data_ = codec.header + damaged
    if isinstance(theirs, dict):
        assert repr(codec.decode(data_)) == repr(theirs)
    else:
        with pytest.raises(DecodeError):
            codec.decode(data_)


def test_framed_predictions_written_with_the_contract_are_read_by_it_too() -> None:
    registry = Registry(Settings(schema_registry_url="http://127.0.0.1:9"))  # never called: id remembered
    contract = generic_contract("Prediction")
    registry.remember(41, contract.schema, contract.parsed)
    record = {
        "event_id": "e1", "key": "k", "pipeline": "p", "model_name": "m", "model_version": 3,
        "prediction": True, "score": 0.75, "probabilities": {"False": 0.25, "True": 0.75}, "shadow": False,
        "event_time": 1, "feature_time": 2, "prediction_time": 3,
        "source": {"topic": "t", "partition": 0, "start_offset": 5, "end_offset": 6},
    }  # fmt: skip
    framed = frame(41, _body(record))
    codec = codec_for("Prediction")
    calls: list[int] = []

    def counting(data: bytes, pos: int) -> dict[str, Any]:
        calls.append(pos)
        return predreader.read(data, pos)

    assert registry.decode_as(framed, codec._parsed, (codec.canonical, counting)) == record
    assert calls == [5]
    # another reader contract: never read by the Prediction reader (fastavro resolves, or refuses)
    with pytest.raises(DecodeError):
        registry.decode_as(
            framed, codec_for("DriftAlert")._parsed, (codec_for("DriftAlert").canonical, counting)
        )
    assert calls == [5]
    assert HEADER_LEN == 10
