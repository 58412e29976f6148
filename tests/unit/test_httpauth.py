"""Bearer tokens of the HTTP API: constant-time check, token from a file, no token means open."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamml.httpauth import api_token, authorized
from streamml.settings import Settings

BASE = {"bootstrap_servers": "127.0.0.1:1", "_env_file": None}


def test_requests_need_the_exact_bearer_token() -> None:
    assert authorized({}, None), "no token configured: open (bound to loopback by default)"
    token = b"s3cret-token"
    assert authorized({"Authorization": "Bearer s3cret-token"}, token)
    assert authorized({"Authorization": "bearer s3cret-token "}, token)
    for header in (
        "",
        "Bearer",
        "Bearer s3cret",
        "Bearer s3cret-token2",
        "Basic s3cret-token",
        "s3cret-token",
    ):
        assert not authorized({"Authorization": header}, token), header
    assert not authorized({}, token)


def test_the_token_comes_from_the_setting_or_a_file(tmp_path: Path) -> None:
    assert api_token(Settings(**BASE)) is None  # type: ignore[arg-type]
    assert api_token(Settings(**BASE, http_token="abc")) == b"abc"  # type: ignore[arg-type]
    assert api_token(Settings(**BASE, http_token="")) is None, "empty (compose's ${VAR:-}) is unset"  # type: ignore[arg-type]
    (tmp_path / "token").write_text("from-a-file\n")
    assert api_token(Settings(**BASE, http_token_file=str(tmp_path / "token"))) == b"from-a-file"  # type: ignore[arg-type]
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match=r"http_token_file .* is empty"):  # refused when settings are read
        Settings(**BASE, http_token_file=str(tmp_path / "empty"))  # type: ignore[arg-type]
    assert "abc" not in repr(Settings(**BASE, http_token="abc")), "a secret is never shown"  # type: ignore[arg-type]
