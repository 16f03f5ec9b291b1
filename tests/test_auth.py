"""Authentication primitives: token loading, proofs, replay, allowlists."""

from __future__ import annotations

from pathlib import Path

import pytest

from rdzv.auth import (
    NONCE_BYTES,
    TOKEN_ENV,
    NetworkAllowlist,
    client_proof,
    load_token,
    new_nonce,
    server_proof,
    verify,
)
from rdzv.errors import AuthError

TOKEN = b"0123456789abcdef0123456789abcdef"


def test_token_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert load_token() is None
    monkeypatch.setenv(TOKEN_ENV, "from-the-environment-123")
    assert load_token() == b"from-the-environment-123"
    assert load_token(use_env=False) is None
    path = tmp_path / "token"
    path.write_bytes(TOKEN + b"\n")
    assert load_token(token_file=path) == TOKEN
    assert load_token(token="explicit-secret-value") == b"explicit-secret-value"


def test_token_errors(tmp_path: Path) -> None:
    with pytest.raises(AuthError, match="not both"):
        load_token(token="x" * 20, token_file=tmp_path / "t")
    with pytest.raises(AuthError, match=r"cannot read the token file .*missing"):
        load_token(token_file=tmp_path / "missing")
    with pytest.raises(AuthError, match="at least 16"):
        load_token(token="short")


def test_proofs_verify_only_with_the_same_token_and_nonces() -> None:
    server_nonce, client_nonce = new_nonce(), new_nonce()
    assert len(server_nonce) == NONCE_BYTES and server_nonce != client_nonce
    proof = client_proof(TOKEN, server_nonce, client_nonce)
    assert verify(client_proof(TOKEN, server_nonce, client_nonce), proof)
    assert not verify(
        client_proof(b"another-token-of-32-bytes-length", server_nonce, client_nonce), proof
    )
    # Replay: the same proof against a new server nonce fails.
    assert not verify(client_proof(TOKEN, new_nonce(), client_nonce), proof)
    # The server's proof is not the client's (no reflection).
    assert not verify(server_proof(TOKEN, server_nonce, client_nonce), proof)


def test_allowlist() -> None:
    allow = NetworkAllowlist(["127.0.0.0/8", "::1"])
    assert allow
    assert allow.allows("127.0.0.1") and allow.allows("127.9.9.9")
    assert allow.allows("::1") and allow.allows("::ffff:127.0.0.1")
    assert not allow.allows("10.0.0.1") and not allow.allows("not-an-ip")
    assert not NetworkAllowlist()
    with pytest.raises(ValueError, match="'bogus' is not a network"):
        NetworkAllowlist(["bogus"])
