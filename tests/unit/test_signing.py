"""Ed25519 model signatures: who can sign, what a signature covers, rotation and the HMAC migration."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest

from streamml import artifacts, signing
from streamml.artifacts import ArtifactRejectedError
from streamml.errors import ConfigError
from streamml.settings import Settings
from streamml.signing import Keys, Signer, Verifier, keys_from
from streams.predictor import ModelRegistry


def version(v: int, signer: bytes | Keys, payload: Any = "model") -> dict[str, Any]:
    data = pickle.dumps({"model": payload})
    record = {"pipeline": "p", "model_name": "online", "version": v, "artifact_format": artifacts.FORMAT,
              "artifact": data, "sha256": artifacts.sha256_hex(data), "signature": None}  # fmt: skip
    record["signature"] = artifacts.signature(record, data, signer)
    return record


def ed25519() -> tuple[Keys, str]:
    key = signing.generate()
    return Keys(Signer(key), Verifier.of([key.public_key()])), signing.public_line(key.public_key())


def test_a_version_signed_with_a_private_key_verifies_with_its_public_key_only() -> None:
    keys, line = ed25519()
    record = version(1, keys)
    assert record["signature"].startswith(f"ed25519:{keys.signer.id}:")  # type: ignore[union-attr]
    predictor = Keys(None, Verifier(signing.parse_public_keys(line)))
    assert artifacts.load(record, predictor) == {"model": "model"}
    with pytest.raises(ArtifactRejectedError, match="holds no model signing key"):
        version(2, predictor)  # a verifier cannot sign

    other, _ = ed25519()
    with pytest.raises(ArtifactRejectedError, match="signed by unknown key"):
        artifacts.load(version(3, other), predictor)


@pytest.mark.parametrize(
    "field, value",
    [("version", 9), ("pipeline", "q"), ("model_name", "batch")],
)
def test_a_signature_covers_the_models_identity(field: str, value: Any) -> None:
    """A valid artifact replayed as another version, pipeline or model is refused."""
    keys, _ = ed25519()
    record = {**version(1, keys), field: value}
    with pytest.raises(ArtifactRejectedError, match="bad Ed25519 signature"):
        artifacts.verify(record, keys)


def test_tampered_and_malformed_signatures_are_refused() -> None:
    keys, _ = ed25519()
    record = version(1, keys)
    prefix, kid, sig = record["signature"].split(":")
    flipped = ("A" if sig[0] != "A" else "B") + sig[1:]
    for bad in (f"{prefix}:{kid}:{flipped}", f"{prefix}:{kid}:not base64!", f"{prefix}:{kid}"):
        with pytest.raises(ArtifactRejectedError):
            artifacts.verify({**record, "signature": bad}, keys)


def test_rotation_add_the_new_key_switch_the_signer_retire_the_old() -> None:
    old, new = signing.generate(), signing.generate()
    v1 = version(1, Keys(Signer(old), Verifier()))
    both = Verifier.of([old.public_key(), new.public_key()])
    v2 = version(2, Keys(Signer(new), Verifier()))
    for record in (v1, v2):  # during the rotation every valid version verifies
        artifacts.verify(record, Keys(None, both))
    retired = Verifier.of([new.public_key()])
    artifacts.verify(v2, Keys(None, retired))
    with pytest.raises(ArtifactRejectedError, match="unknown key"):
        artifacts.verify(v1, Keys(None, retired))


def test_hmac_versions_are_accepted_only_where_the_shared_key_is_configured(tmp_path: Path) -> None:
    legacy = version(1, b"shared")
    key_file, public = _key_files(tmp_path)
    base = {"bootstrap_servers": "127.0.0.1:1", "signing_key": "shared", "_env_file": None}
    former = keys_from(Settings(**base), signs=False)  # type: ignore[arg-type]
    artifacts.verify(legacy, former)
    migrated = keys_from(Settings(**base, model_verify_keys=public), signs=False)  # type: ignore[arg-type]
    with pytest.raises(ArtifactRejectedError, match="HMAC-signed"):
        artifacts.verify(legacy, migrated)
    migrating = keys_from(
        Settings(**base, model_verify_keys=public, accept_hmac_models=True),
        signs=False,  # type: ignore[arg-type]
    )
    artifacts.verify(legacy, migrating)
    signer = keys_from(Settings(**base, model_signing_key_file=str(key_file)), signs=True)  # type: ignore[arg-type]
    artifacts.verify(version(2, signer), migrated)


def test_services_get_only_the_keys_their_role_needs(tmp_path: Path) -> None:
    key_file, public = _key_files(tmp_path)
    (tmp_path / "verify.keys").write_text(f"# model signers\n{public} learner+trainer\n\n")
    base = {"bootstrap_servers": "127.0.0.1:1", "_env_file": None}
    predictor = keys_from(Settings(**base, model_verify_keys_file=str(tmp_path / "verify.keys")), signs=False)  # type: ignore[arg-type]
    assert predictor.signer is None and len(predictor.verifier.public) == 1
    assert predictor.verifier.hmac_key is None
    with pytest.raises(ConfigError, match="STREAMML_MODEL_SIGNING_KEY_FILE"):
        keys_from(Settings(**base, model_verify_keys=public), signs=True)  # type: ignore[arg-type]
    learner = keys_from(Settings(**base, model_signing_key_file=str(key_file)), signs=True)  # type: ignore[arg-type]
    artifacts.verify(version(1, learner), learner)  # it verifies its own versions (resume)
    with pytest.raises(ConfigError, match="not a base64 Ed25519 public key"):
        keys_from(Settings(**base, model_verify_keys="ed25519 AAAA"), signs=False)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="expected 'ed25519"):
        keys_from(Settings(**base, model_verify_keys="rsa AAAA"), signs=False)  # type: ignore[arg-type]
    (tmp_path / "bad.pem").write_text("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ConfigError, match="cannot read the model signing key") as info:
        keys_from(Settings(**base, model_signing_key_file=str(tmp_path / "bad.pem")), signs=True)  # type: ignore[arg-type]
    assert "nope" not in str(info.value)


def test_the_predictor_rejects_a_version_of_an_unknown_key_and_keeps_serving() -> None:
    keys, line = ed25519()
    registry = ModelRegistry(signing_key=Keys(None, Verifier(signing.parse_public_keys(line))))
    registry.on_version(version(1, keys))
    assert [e.kind for e in registry.on_promotion(_promote(1))] == ["swap"]
    forger, _ = ed25519()
    registry.on_version(version(2, forger))
    events = registry.on_promotion(_promote(2))
    assert [e.kind for e in events] == ["rejected"] and "unknown key" in events[0].reason
    assert registry.live["p"].version == 1


def _promote(v: int) -> dict[str, Any]:
    return {"pipeline": "p", "model_name": "online", "action": "PROMOTE", "version": v, "actor": "test"}


def _key_files(tmp_path: Path) -> tuple[Path, str]:
    key = signing.generate()
    path = tmp_path / "signing.pem"
    path.write_bytes(signing.private_pem(key))
    return path, signing.public_line(key.public_key())
