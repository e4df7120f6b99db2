"""Tokens: issue, verify, every refusal reason, secret loading and the ``iotpipe token`` CLI."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest

from iotpipe.auth import (
    CLIENT_AUDIENCE,
    DEVICE_AUDIENCE,
    AuthError,
    bearer_token,
    issue_token,
    load_secret,
    verify_token,
)

pytestmark = pytest.mark.unit

SECRET = b"unit-test-secret-that-is-at-least-32-bytes-long"


def reason_of(secret: bytes, token: str, audience: str = DEVICE_AUDIENCE) -> str:
    with pytest.raises(AuthError) as info:
        verify_token(secret, token, audience)
    return info.value.reason


def test_round_trip_returns_subject() -> None:
    token = issue_token(SECRET, "dev-42", DEVICE_AUDIENCE, 60)
    assert verify_token(SECRET, token, DEVICE_AUDIENCE) == "dev-42"


def test_client_token_is_not_a_device_token() -> None:
    token = issue_token(SECRET, "app-1", CLIENT_AUDIENCE, 60)
    assert verify_token(SECRET, token, CLIENT_AUDIENCE) == "app-1"
    assert reason_of(SECRET, token, DEVICE_AUDIENCE) == "wrong_audience"


def test_forged_token_is_bad_signature() -> None:
    forger = b"another-secret-also-at-least-32-bytes-long!"
    token = issue_token(forger, "dev-1", DEVICE_AUDIENCE, 60)
    assert reason_of(SECRET, token) == "bad_signature"


def test_expired_token() -> None:
    now = int(time.time())
    token = jwt.encode({"sub": "d", "aud": DEVICE_AUDIENCE, "exp": now - 5}, SECRET, "HS256")
    assert reason_of(SECRET, token) == "expired"


@pytest.mark.parametrize("token", ["garbage", "a.b.c", "eyJhbGciOiJIUzI1NiJ9..x"])
def test_malformed_token(token: str) -> None:
    assert reason_of(SECRET, token) == "malformed"


def test_missing_claims_and_bad_subject_are_malformed() -> None:
    no_exp = jwt.encode({"sub": "d", "aud": DEVICE_AUDIENCE}, SECRET, "HS256")
    assert reason_of(SECRET, no_exp) == "malformed"
    exp = int(time.time()) + 60
    int_sub = jwt.encode({"sub": 5, "aud": DEVICE_AUDIENCE, "exp": exp}, SECRET, "HS256")
    assert reason_of(SECRET, int_sub) == "malformed"


def test_alg_none_is_refused() -> None:
    exp = int(time.time()) + 60
    token = jwt.encode({"sub": "d", "aud": DEVICE_AUDIENCE, "exp": exp}, None, "none")
    assert reason_of(SECRET, token) == "malformed"


def test_missing_token() -> None:
    assert reason_of(SECRET, "") == "missing"


def test_bearer_header_parsing() -> None:
    assert bearer_token("Bearer abc.def.ghi") == "abc.def.ghi"
    assert bearer_token("bearer   tok ") == "tok"
    for header, reason in [(None, "missing"), ("", "missing"), ("Basic xyz", "malformed"),
                           ("Bearer", "malformed")]:
        with pytest.raises(AuthError) as info:
            bearer_token(header)
        assert info.value.reason == reason


def test_issue_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="subject"):
        issue_token(SECRET, "", DEVICE_AUDIENCE, 60)
    with pytest.raises(ValueError, match="ttl"):
        issue_token(SECRET, "d", DEVICE_AUDIENCE, 0)


def test_load_secret_from_env_and_file(tmp_path: Path) -> None:
    assert load_secret({"IOTPIPE_AUTH_SECRET": "abc"}) == b"abc"
    path = tmp_path / "secret"
    path.write_bytes(b"from-file\n")
    assert load_secret({"IOTPIPE_AUTH_SECRET_FILE": str(path)}) == b"from-file"
    with pytest.raises(RuntimeError, match="IOTPIPE_AUTH_SECRET"):
        load_secret({})
    with pytest.raises(RuntimeError, match="cannot read"):
        load_secret({"IOTPIPE_AUTH_SECRET_FILE": str(tmp_path / "nope")})
    (tmp_path / "empty").write_bytes(b"  \n")
    with pytest.raises(RuntimeError, match="empty"):
        load_secret({"IOTPIPE_AUTH_SECRET_FILE": str(tmp_path / "empty")})


def test_token_cli_prints_a_verifiable_token() -> None:
    env = {"IOTPIPE_AUTH_SECRET": SECRET.decode(), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-m", "iotpipe.cli", "token", "app-9", "--client", "--ttl", "30"],
        capture_output=True, text=True, env=env, timeout=30, check=True,
    ).stdout.strip()
    assert verify_token(SECRET, out, CLIENT_AUDIENCE) == "app-9"
    claims = jwt.decode(out, SECRET, algorithms=["HS256"], audience=CLIENT_AUDIENCE)
    assert 25 <= claims["exp"] - claims["iat"] <= 30
    missing = subprocess.run(
        [sys.executable, "-m", "iotpipe.cli", "token", "dev"], capture_output=True, text=True,
        env={"PATH": "/usr/bin:/bin"}, timeout=30,
    )
    assert missing.returncode == 2
    assert "IOTPIPE_AUTH_SECRET" in missing.stderr
