"""Model artifacts: serialized, checksummed and signed (streamml.signing); verified before anything is
unpickled."""

from __future__ import annotations

import hashlib
import hmac
import pickle
import platform
from collections.abc import Mapping
from importlib import metadata
from typing import Any

from streamml.errors import StreamMLError
from streamml.signing import Keys, SignatureError, hmac_hex

FORMAT = "pickle"


class ArtifactRejectedError(StreamMLError):
    """A model artifact failed verification; it was not loaded."""


def serialize(model: Any) -> bytes:
    return pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sign(data: bytes, key: bytes) -> str:
    """HMAC-SHA256 of data (the monitor's own state snapshots, written and read by monitors only)."""
    return hmac_hex(key, data)


def signature(record: Mapping[str, Any], data: bytes, key: bytes | Keys) -> str:
    """The signature of a ModelVersion record (its pipeline, model, version and sha256 already set)."""
    signer = Keys.of(key).signer
    if signer is None:
        raise ArtifactRejectedError("this service holds no model signing key")
    return signer.sign(record, data)


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("river", "scikit-learn", "numpy", "streamml"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions


def verify(record: Mapping[str, Any], key: bytes | Keys | None) -> bytes:
    """The artifact bytes of a ModelVersion record, only if its checksum and signature are valid."""
    where = f"{record.get('pipeline')}/{record.get('model_name')} v{record.get('version')}"
    data = record.get("artifact")
    if data is None:
        raise ArtifactRejectedError(f"{where}: no inline artifact (artifact_uri is not supported yet)")
    if record.get("artifact_format") != FORMAT:
        raise ArtifactRejectedError(f"{where}: unsupported artifact format {record.get('artifact_format')!r}")
    if not hmac.compare_digest(sha256_hex(data).encode(), str(record.get("sha256", "")).encode()):
        raise ArtifactRejectedError(f"{where}: SHA-256 mismatch (artifact corrupted or tampered with)")
    if not record.get("signature"):
        raise ArtifactRejectedError(f"{where}: unsigned artifact")
    verifier = Keys.of(key).verifier
    if not verifier.configured:
        raise ArtifactRejectedError(
            f"{where}: no verify keys configured (set STREAMML_MODEL_VERIFY_KEYS or STREAMML_SIGNING_KEY)"
        )
    try:
        verifier.verify(record, bytes(data))
    except SignatureError as exc:
        raise ArtifactRejectedError(f"{where}: {exc}") from exc
    return bytes(data)


def load(record: Mapping[str, Any], key: bytes | Keys | None) -> Any:
    """Verify, then unpickle. Unpickling happens only for artifacts signed with a key we trust."""
    data = verify(record, key)
    try:
        return pickle.loads(data)  # verified above: checksum and signature
    except Exception as exc:  # a signed artifact built by incompatible library versions
        raise ArtifactRejectedError(f"signed artifact could not be loaded: {exc}") from exc
