"""Model artifacts: checksum and HMAC signature are verified before a single byte is unpickled."""

from __future__ import annotations

import hashlib
import hmac
import pickle
from collections.abc import Callable
from typing import Any

import pytest
from river import linear_model, preprocessing

from streamml import artifacts
from streamml.artifacts import ArtifactRejectedError
from streamml.codec import codec_for
from streamml.errors import StreamMLError

KEY = b"test-signing-key"
OTHER_KEY = b"someone-elses-key"

UNPICKLED: list[str] = []  # what the booby-trapped payload appends to when it is unpickled


def _trap(tag: str) -> str:
    UNPICKLED.append(tag)
    return tag


class Booby:
    """Unpickling this calls `_trap`: the proof that an artifact was (or was not) unpickled."""

    def __reduce__(self) -> tuple[Callable[[str], str], tuple[str]]:
        return _trap, ("unpickled",)


@pytest.fixture(autouse=True)
def _clear_trap() -> None:
    UNPICKLED.clear()


def record_of(data: bytes | None, key: bytes | None = KEY, **overrides: Any) -> dict[str, Any]:
    """A ModelVersion record carrying `data`, checksummed and (if a key is given) signed."""
    record: dict[str, Any] = {
        "pipeline": "p",
        "model_name": "online",
        "version": 3,
        "kind": "ONLINE",
        "estimator_spec": "linear_model.LogisticRegression",
        "params": {},
        "artifact_format": artifacts.FORMAT,
        "artifact": data,
        "artifact_uri": None,
        "sha256": artifacts.sha256_hex(data) if data is not None else "",
        "signature": artifacts.sign(data, key) if data is not None and key is not None else None,
        "library_versions": artifacts.library_versions(),
        "metrics": {},
        "training_data": [],
        "events_seen": 0,
        "parent_version": None,
        "created_at": 1_700_000_000_000,
    }
    record.update(overrides)
    return record


def trained_model() -> Any:
    model = preprocessing.StandardScaler() | linear_model.LogisticRegression()
    for i in range(20):
        model.learn_one({"x": float(i), "y": float(i % 3)}, i % 2 == 0)
    return model


def test_round_trip_serialize_sign_verify_load() -> None:
    model = trained_model()
    data = artifacts.serialize({"model": model, "metrics": {}})
    record = record_of(data)
    assert artifacts.verify(record, KEY) == data
    loaded = artifacts.load(record, KEY)
    probe = {"x": 4.0, "y": 1.0}
    assert loaded["model"].predict_proba_one(probe) == model.predict_proba_one(probe)


def test_round_trip_through_the_model_version_codec() -> None:
    model = trained_model()
    codec = codec_for("ModelVersion")
    record = codec.decode(codec.encode(record_of(artifacts.serialize(model))))
    probe = {"x": 1.0, "y": 2.0}
    assert artifacts.load(record, KEY).predict_proba_one(probe) == model.predict_proba_one(probe)


def test_checksum_and_signature_are_sha256_and_hmac_sha256() -> None:
    data = b"some bytes"
    assert artifacts.sha256_hex(data) == hashlib.sha256(data).hexdigest()
    assert artifacts.sign(data, KEY) == hmac.new(KEY, data, hashlib.sha256).hexdigest()
    assert artifacts.sign(data, KEY) != artifacts.sign(data, OTHER_KEY)


def test_library_versions_name_python_and_river() -> None:
    versions = artifacts.library_versions()
    assert versions["python"].count(".") == 2
    assert versions["river"] == "0.26.1"


def test_the_trap_fires_when_a_payload_is_signed_with_our_key() -> None:
    """Positive control: without it, the rejection tests below could pass without proving anything."""
    artifacts.load(record_of(pickle.dumps(Booby())), KEY)
    assert UNPICKLED == ["unpickled"]


def _tampered(record: dict[str, Any]) -> dict[str, Any]:
    data = bytearray(record["artifact"])
    data[-2] ^= 0x01
    return {**record, "artifact": bytes(data)}


def _tampered_with_new_checksum(record: dict[str, Any]) -> dict[str, Any]:
    out = _tampered(record)
    return {**out, "sha256": artifacts.sha256_hex(out["artifact"])}


REJECTIONS: list[tuple[str, Callable[[dict[str, Any]], dict[str, Any]], bytes | None, str]] = [
    ("tampered bytes", _tampered, KEY, r"SHA-256 mismatch"),
    ("tampered bytes, checksum recomputed", _tampered_with_new_checksum, KEY, r"bad signature"),
    ("wrong checksum", lambda r: {**r, "sha256": "0" * 64}, KEY, r"SHA-256 mismatch"),
    ("wrong key", lambda r: r, OTHER_KEY, r"bad signature"),
    ("signed with another key", lambda r: {**r, "signature": artifacts.sign(r["artifact"], OTHER_KEY)}, KEY,
     r"bad signature"),
    ("missing signature", lambda r: {**r, "signature": None}, KEY, r"unsigned artifact"),
    ("empty signature", lambda r: {**r, "signature": ""}, KEY, r"unsigned artifact"),
    ("no key configured", lambda r: r, None, r"no verify keys configured"),
    ("wrong format", lambda r: {**r, "artifact_format": "joblib"}, KEY,
     r"unsupported artifact format 'joblib'"),
    ("no inline artifact", lambda r: {**r, "artifact": None, "artifact_uri": "s3://b/m"}, KEY,
     r"no inline artifact"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("change", "key", "message"), [r[1:] for r in REJECTIONS], ids=[r[0] for r in REJECTIONS]
)
def test_rejected_artifacts_are_never_unpickled(
    change: Callable[[dict[str, Any]], dict[str, Any]], key: bytes | None, message: str
) -> None:
    record = change(record_of(pickle.dumps(Booby())))
    with pytest.raises(ArtifactRejectedError, match=message) as info:
        artifacts.load(record, key)
    assert "p/online v3" in str(info.value)
    with pytest.raises(ArtifactRejectedError, match=message):
        artifacts.verify(record, key)
    assert UNPICKLED == []


def test_rejection_is_a_streamml_error() -> None:
    assert issubclass(ArtifactRejectedError, StreamMLError)


def test_signed_but_unloadable_artifact_is_rejected_not_crashing() -> None:
    record = record_of(b"\x80\x05not a pickle at all")
    with pytest.raises(ArtifactRejectedError, match=r"signed artifact could not be loaded"):
        artifacts.load(record, KEY)
