"""Model signatures: Ed25519, asymmetric — only the services that publish models hold a private key.

A signature covers the model's identity and content, so a valid artifact cannot be replayed as another
version or pipeline:

    streamml-model-v1 \\n pipeline \\n model name \\n version \\n sha256 of the artifact

and is written `ed25519:<key id>:<base64 signature>`. The key id is the first 16 hex digits of the SHA-256
of the raw 32-byte public key, so a verifier picks the key from the signature and an operator rotates keys
without downtime: add the new public key to every verifier, switch the signers, retire the old key.

Public keys travel as text lines `ed25519 <base64 raw key> [comment]` (what `streamml keys generate`
prints); private keys as PKCS#8 PEM files readable by their service only.

The former scheme, an HMAC-SHA256 of the artifact under a key every service shared (so any verifier could
also forge), is accepted only where that key is still configured (STREAMML_SIGNING_KEY): a deployment
migrates by giving learner and trainer a private key and everyone the public key, then removing the shared
key from the predictors.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from streamml.errors import ConfigError
from streamml.settings import Settings
from streamml.tlsca import write_new_private_file

PREFIX = "ed25519"
DOMAIN = b"streamml-model-v1"


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_line(public: Ed25519PublicKey, comment: str = "") -> str:
    """The text form of a public key: `ed25519 <base64> [comment]`."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return " ".join(x for x in (PREFIX, base64.b64encode(raw).decode(), comment) if x)


def parse_public_keys(text: str) -> dict[str, Ed25519PublicKey]:
    """Public keys by key id, from lines `ed25519 <base64> [comment]` (blank lines and # comments skipped;
    commas separate keys too, for an environment variable)."""
    keys: dict[str, Ed25519PublicKey] = {}
    for n, line in enumerate(text.replace(",", "\n").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) < 2 or parts[0] != PREFIX:
            raise ConfigError(f"public key {n}: expected 'ed25519 <base64 key>', got {line[:40]!r}")
        try:
            raw = base64.b64decode(parts[1], validate=True)
            public = Ed25519PublicKey.from_public_bytes(raw)
        except (binascii.Error, ValueError) as exc:
            raise ConfigError(f"public key {n}: not a base64 Ed25519 public key ({exc})") from exc
        keys[key_id(public)] = public
    return keys


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:  # the message never contains the key
        raise ConfigError(f"cannot read the model signing key {path}: {type(exc).__name__}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"the model signing key {path} is not an Ed25519 key")
    return key


def generate() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def write_private_key(path: Path, key: Ed25519PrivateKey) -> None:
    """The key as PEM in a new file readable by its owner only (an existing file is never overwritten)."""
    write_new_private_file(path, private_pem(key))


def write_key_pair(folder: Path, name: str = "model-signing.pem") -> tuple[Path, str]:
    """A new key pair: the private key in folder/name (mode 0600); returns its path and the public line."""
    key = generate()
    path = folder / name
    write_private_key(path, key)
    return path, public_line(key.public_key())


def hmac_hex(key: bytes, data: bytes) -> str:
    """HMAC-SHA256 of data, hex: the former model signature, and the monitor's state snapshots'."""
    return hmac.new(key, data, hashlib.sha256).hexdigest()


def private_pem(key: Ed25519PrivateKey) -> bytes:
    pem: bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem


def message(record: Mapping[str, Any]) -> bytes:
    """What a signature covers: the model's identity and the SHA-256 of its artifact."""
    parts = (record.get("pipeline"), record.get("model_name"), record.get("version"), record.get("sha256"))
    return b"\n".join([DOMAIN, *(str(p).encode() for p in parts)])


class SignatureError(Exception):
    """A signature that does not verify (the reason is the message)."""


@dataclass
class Signer:
    """Signs ModelVersion records: Ed25519 with `private`, else (migration only) HMAC with `hmac_key`."""

    private: Ed25519PrivateKey | None = None
    hmac_key: bytes | None = None
    id: str = field(init=False, default="")

    def __post_init__(self) -> None:
        if self.private is None and self.hmac_key is None:
            raise ConfigError("no model signing key configured (STREAMML_MODEL_SIGNING_KEY_FILE)")
        if self.private is not None:
            self.id = key_id(self.private.public_key())

    def sign(self, record: Mapping[str, Any], data: bytes) -> str:
        if self.private is not None:
            sig = self.private.sign(message(record))
            return f"{PREFIX}:{self.id}:{base64.b64encode(sig).decode()}"
        assert self.hmac_key is not None
        return hmac_hex(self.hmac_key, data)


@dataclass
class Verifier:
    """Verifies signatures with the configured public keys (and HMAC ones only if `hmac_key` is set)."""

    public: dict[str, Ed25519PublicKey] = field(default_factory=dict)
    hmac_key: bytes | None = None

    @classmethod
    def of(cls, keys: Iterable[Ed25519PublicKey], hmac_key: bytes | None = None) -> Verifier:
        return cls({key_id(k): k for k in keys}, hmac_key)

    @property
    def configured(self) -> bool:
        return bool(self.public) or self.hmac_key is not None

    def verify(self, record: Mapping[str, Any], data: bytes) -> None:
        signature = str(record.get("signature") or "")
        if signature.startswith(PREFIX + ":"):
            try:
                _, kid, b64 = signature.split(":", 2)
                sig = base64.b64decode(b64, validate=True)
            except (ValueError, binascii.Error) as exc:
                raise SignatureError("malformed Ed25519 signature") from exc
            public = self.public.get(kid)
            if public is None:
                raise SignatureError(f"signed by unknown key {kid[:16]!r} (not among the verify keys)")
            try:
                public.verify(sig, message(record))
            except InvalidSignature as exc:
                raise SignatureError(f"bad Ed25519 signature (key {kid})") from exc
            return
        if self.hmac_key is None:
            raise SignatureError("HMAC-signed, and the shared HMAC key is not configured here")
        if not hmac.compare_digest(hmac_hex(self.hmac_key, data).encode(), signature.encode()):
            raise SignatureError("bad signature (not signed with this deployment's key)")


@dataclass
class Keys:
    """What one service holds: a signer if it publishes models, and the verifier every service needs."""

    signer: Signer | None
    verifier: Verifier

    @classmethod
    def hmac(cls, key: bytes) -> Keys:
        """The former scheme: one shared HMAC key signs and verifies (unit tests, migration)."""
        return cls(Signer(hmac_key=key), Verifier(hmac_key=key))

    @classmethod
    def of(cls, key: bytes | Keys | None) -> Keys:
        if isinstance(key, Keys):
            return key
        return cls.hmac(key) if key is not None else cls(None, Verifier())


def keys_from(settings: Settings, *, signs: bool) -> Keys:
    """The keys a service holds, from its settings. Ed25519 when verify keys are configured (HMAC-signed
    versions then only with `accept_hmac_models`), else the former shared HMAC key. A service that `signs`
    (learner, trainer) needs a private key, or the HMAC key in the former scheme."""
    hmac_key = settings.signing_key.get_secret_value().encode() if settings.signing_key else None
    text = settings.model_verify_keys or ""
    if settings.model_verify_keys_file:
        try:
            text += "\n" + Path(settings.model_verify_keys_file).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read {settings.model_verify_keys_file}: {exc.strerror}") from exc
    public = parse_public_keys(text)
    private = load_private_key(settings.model_signing_key_file) if settings.model_signing_key_file else None
    if private is not None:
        public.setdefault(key_id(private.public_key()), private.public_key())  # it verifies its own
    ed25519 = bool(public)
    accept_hmac = hmac_key if (not ed25519 or settings.accept_hmac_models) else None
    verifier = Verifier(public, accept_hmac)
    if not signs:
        return Keys(None, verifier)
    if private is not None:
        return Keys(Signer(private), verifier)
    if ed25519 or hmac_key is None:
        raise ConfigError(
            "this service publishes model versions and needs STREAMML_MODEL_SIGNING_KEY_FILE (an Ed25519 "
            "private key: `streamml keys generate`)"
        )
    return Keys(Signer(hmac_key=hmac_key), verifier)
