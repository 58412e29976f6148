"""Model artifacts: serialized, checksummed and HMAC-signed; verified before anything is unpickled."""

from __future__ import annotations

import hashlib
import hmac
import pickle
import platform
from collections.abc import Mapping
from importlib import metadata
from typing import Any

from streamml.errors import StreamMLError

FORMAT = "pickle"


class ArtifactRejectedError(StreamMLError):
    """A model artifact failed verification; it was not loaded."""


def serialize(model: Any) -> bytes:
    return pickle.dumps(model, protocol=pickle.HIGHEST_PROTOCOL)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sign(data: bytes, key: bytes) -> str:
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("river", "scikit-learn", "numpy", "streamml"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return versions


def verify(record: Mapping[str, Any], key: bytes | None) -> bytes:
    """The artifact bytes of a ModelVersion record, only if its checksum and signature are valid."""
    where = f"{record.get('pipeline')}/{record.get('model_name')} v{record.get('version')}"
    data = record.get("artifact")
    if data is None:
        raise ArtifactRejectedError(f"{where}: no inline artifact (artifact_uri is not supported yet)")
    if record.get("artifact_format") != FORMAT:
        raise ArtifactRejectedError(f"{where}: unsupported artifact format {record.get('artifact_format')!r}")
    if not hmac.compare_digest(sha256_hex(data).encode(), str(record.get("sha256", "")).encode()):
        raise ArtifactRejectedError(f"{where}: SHA-256 mismatch (artifact corrupted or tampered with)")
    signature = record.get("signature")
    if not signature:
        raise ArtifactRejectedError(f"{where}: unsigned artifact")
    if key is None:
        raise ArtifactRejectedError(f"{where}: no signing key configured (set STREAMML_SIGNING_KEY)")
    if not hmac.compare_digest(sign(data, key).encode(), str(signature).encode()):
        raise ArtifactRejectedError(f"{where}: bad signature (not signed with this deployment's key)")
    return bytes(data)


def load(record: Mapping[str, Any], key: bytes | None) -> Any:
    """Verify, then unpickle. Unpickling happens only for artifacts signed with our key."""
    data = verify(record, key)
    try:
        return pickle.loads(data)  # verified above: checksum and HMAC signature
    except Exception as exc:  # a signed artifact built by incompatible library versions
        raise ArtifactRejectedError(f"signed artifact could not be loaded: {exc}") from exc
