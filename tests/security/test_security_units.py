"""CURVE key files and the gatekeeper's decision, the deny list, the reloading TLS context and
token ids: without tier processes (sockets only where CURVE itself is the subject)."""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import stat
import subprocess
import sys
import time
from pathlib import Path

import jwt
import pytest
import zmq
from support.certs import make_cert

from iotpipe import curve
from iotpipe.auth import (
    DEVICE_AUDIENCE,
    AuthError,
    issue_token,
    verify_identity,
    verify_token,
)
from iotpipe.denylist import DenyList, DenyListError, DenyListFile, parse_deny_list
from iotpipe.tlsconfig import ReloadingTLS, TLSConfigError

pytestmark = pytest.mark.unit

SECRET = b"unit-test-secret-of-at-least-32-bytes!"


# -- CURVE key files ---------------------------------------------------------------------


def test_generate_writes_private_secret_files_and_loads_per_role(tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    assert curve.generate_keys(keys_dir) == list(curve.ROLES)
    for role in curve.ROLES:
        mode = stat.S_IMODE(os.stat(curve.secret_file(keys_dir, role)).st_mode)
        assert mode == 0o600, f"{role} secret file is {oct(mode)}"
    middle = curve.load_keys(keys_dir, "middle")
    ingest = curve.load_keys(keys_dir, "ingest")
    assert ingest.server_public == middle.own.public
    assert middle.admitted["router"] == {ingest.own.public}
    assert middle.admitted["pub"] == {curve.load_keys(keys_dir, "relay").own.public}
    assert middle.admitted["feed"] == {curve.load_keys(keys_dir, "storage").own.public}
    # The ingest key is admitted on the fan-in ROUTER only.
    assert ingest.own.public not in middle.admitted["pub"] | middle.admitted["feed"]
    # Existing keys are kept unless forced.
    assert curve.generate_keys(keys_dir) == []
    assert curve.load_keys(keys_dir, "ingest").own == ingest.own
    assert curve.ensure_keys(tmp_path) == tmp_path / "curve"
    assert curve.load_keys(tmp_path / "curve", "relay").own.secret


def test_missing_or_bad_key_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(curve.CurveKeyError, match="does not exist"):
        curve.load_keys(tmp_path / "nope", "ingest")
    curve.generate_keys(tmp_path)
    curve.secret_file(tmp_path, "relay").unlink()
    with pytest.raises(curve.CurveKeyError, match=r"relay\.key_secret"):
        curve.load_keys(tmp_path, "relay")
    curve.public_file(tmp_path, "storage").write_text("curve\n    public-key = \"short\"\n")
    with pytest.raises(curve.CurveKeyError, match=r"storage\.key"):
        curve.load_keys(tmp_path, "middle")


def test_rotation_steps_admit_old_and_new_until_retired(tmp_path: Path) -> None:
    curve.generate_keys(tmp_path)
    old = curve.load_keys(tmp_path, "ingest").own.public
    curve.add_next(tmp_path)
    after_next = curve.load_keys(tmp_path, "middle").admitted["router"]
    assert old in after_next and len(after_next) == 2
    # Clients still use the current key after step 1.
    assert curve.load_keys(tmp_path, "ingest").own.public == old
    assert curve.promote(tmp_path) == list(curve.ROLES)
    promoted = curve.load_keys(tmp_path, "ingest").own.public
    assert promoted != old and promoted in after_next
    assert curve.load_keys(tmp_path, "middle").admitted["router"] == after_next
    assert curve.retire(tmp_path) == list(curve.ROLES)
    assert curve.load_keys(tmp_path, "middle").admitted["router"] == {promoted}
    assert curve.promote(tmp_path) == []  # nothing to promote without next keys


def test_gatekeeper_check_counts_and_logs_each_refused_key_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    curve.generate_keys(tmp_path)
    keys = curve.load_keys(tmp_path, "middle")
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        gate = curve.Gatekeeper(ctx, tmp_path, keys)
        ingest = curve.load_keys(tmp_path, "ingest").own.public
        relay = curve.load_keys(tmp_path, "relay").own.public
        stranger = zmq.curve_keypair()[0]
        assert gate.check("router", ingest)
        assert not gate.check("pub", ingest)  # right pipeline, wrong socket
        assert gate.check("pub", relay)
        caplog.set_level("WARNING", logger="iotpipe.curve")
        for _ in range(20):
            assert not gate.check("router", stranger)
        refusals = [r for r in caplog.records if "CURVE client refused" in r.getMessage()
                    and r.fields["client_key"] == stranger.decode()]  # type: ignore[attr-defined]
        assert len(refusals) == 1
        assert gate.refused["router"] == 20 and gate.refused["pub"] == 1
        # A next key written while running is admitted after reload.
        curve.add_next(tmp_path, ["ingest"])
        time.sleep(0.01)  # distinct mtime on coarse file systems
        assert gate.reload()
        nxt = curve.load_keys(tmp_path, "middle").admitted["router"] - {ingest}
        assert len(nxt) == 1 and gate.check("router", next(iter(nxt)))
        # A broken directory keeps the last good keys.
        curve.public_file(tmp_path, "ingest").write_text("garbage\n")
        assert not gate.reload()
        assert gate.reload_failures == 1 and gate.check("router", ingest)
    finally:
        ctx.term()


def test_curve_sockets_talk_only_with_the_pipelines_keys(tmp_path: Path) -> None:
    curve.generate_keys(tmp_path)
    middle = curve.load_keys(tmp_path, "middle")
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    gate = curve.Gatekeeper(ctx, tmp_path, middle).start()
    server = ctx.socket(zmq.ROUTER)
    clients: list[zmq.Socket[bytes]] = []
    try:
        curve.secure_server(server, middle, "router")
        port = server.bind_to_random_port("tcp://127.0.0.1")

        def client(keys: curve.CurveKeys | None) -> zmq.Socket[bytes]:
            sock = ctx.socket(zmq.DEALER)
            sock.linger = 0
            if keys is not None:
                curve.secure_client(sock, keys)
            sock.connect(f"tcp://127.0.0.1:{port}")
            clients.append(sock)
            return sock

        # Keyless, and the relay's (valid, but not for this socket): nothing arrives.
        client(None).send(b"plain")
        client(curve.load_keys(tmp_path, "relay")).send(b"relay")
        good = client(curve.load_keys(tmp_path, "ingest"))
        good.send(b"ingest")
        assert server.poll(10_000), "the ingest key was not admitted"
        assert server.recv_multipart()[1] == b"ingest"
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            assert not server.poll(100), "a refused client's message arrived"
        assert gate.refused["router"] >= 1
    finally:
        for sock in clients:
            sock.close(0)
        server.close(0)
        gate.stop()
        ctx.term()


def test_keys_cli(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "iotpipe.cli", "keys", *args],
                              capture_output=True, text=True, timeout=60)

    assert run("generate", "--dir", str(tmp_path)).returncode == 0
    shown = run("show", "--dir", str(tmp_path))
    assert shown.returncode == 0
    assert curve.load_keys(tmp_path, "ingest").own.public.decode() in shown.stdout
    assert run("next", "--dir", str(tmp_path), "--roles", "ingest").returncode == 0
    assert curve.secret_file(tmp_path, "ingest", "next").exists()
    assert not curve.secret_file(tmp_path, "middle", "next").exists()
    assert run("next", "--dir", str(tmp_path), "--roles", "bogus").returncode == 2
    assert run("next", "--dir", str(tmp_path)).returncode == 0
    assert curve.secret_file(tmp_path, "middle", "next").exists()
    assert "promoted: middle" in run("promote", "--dir", str(tmp_path)).stdout
    assert run("retire", "--dir", str(tmp_path)).returncode == 0
    assert not curve.public_file(tmp_path, "ingest", "next").exists()
    bad = run("show", "--dir", str(tmp_path / "missing"))
    assert bad.returncode == 1 and "does not exist" in bad.stderr
    assert run("bogus").returncode == 2


# -- deny list ---------------------------------------------------------------------------


def test_deny_list_parse() -> None:
    deny = parse_deny_list("devices: [d1, d2]\nclients: [app]\ntoken_ids: [t9]\n")
    assert deny.refusal("device", "d1", None) == "device"
    assert deny.refusal("device", "app", None) is None  # a client id does not deny a device
    assert deny.refusal("client", "app", "x") == "client"
    assert deny.refusal("device", "d3", "t9") == "token"
    assert deny.refusal("device", "d3", None) is None
    assert parse_deny_list("") == DenyList()
    assert parse_deny_list("# nothing yet\n") == DenyList()
    for text, problem in [("devices: d1", "must be a list"), ("device: [d1]", "unknown key"),
                          ("[d1]", "expected a mapping"), ("devices: [1]", "entry 1"),
                          ("devices: [", "not valid YAML")]:
        with pytest.raises(DenyListError, match=problem):
            parse_deny_list(text, "deny.yaml")


def test_deny_list_file_keeps_last_good_list(tmp_path: Path) -> None:
    path = tmp_path / "deny.yaml"
    with pytest.raises(DenyListError, match="not found"):
        DenyListFile(path)
    path.write_text("devices: [d1]\n")
    watched = DenyListFile(path)
    assert watched.check() is None  # unchanged
    path.write_text("devices: [d1, d2]\n")
    fresh = watched.check()
    assert fresh is not None and fresh.devices == {"d1", "d2"}
    path.write_text("devices: [d1, d2\n")  # a botched edit
    assert watched.check() is None and watched.current.devices == {"d1", "d2"}
    path.unlink()
    assert watched.check() is None and watched.current.devices == {"d1", "d2"}
    assert watched.failures == 2
    path.write_text("token_ids: [t]\n")
    again = watched.check()
    assert again is not None and again.devices == frozenset() and again.token_ids == {"t"}


# -- TLS ---------------------------------------------------------------------------------


def _served_cn(context: ssl.SSLContext, ca: Path) -> str:
    """Handshake in memory (no sockets) and return the certificate CN the client saw."""
    client_ctx = ssl.create_default_context(cafile=str(ca))
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    server = context.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        if c_out.pending:
            s_in.write(c_out.read())
        if s_out.pending:
            c_in.write(s_out.read())
    cert = client.getpeercert()
    assert cert, "handshake did not complete"
    return dict(x[0] for x in cert["subject"])["commonName"]


def test_reloading_tls_serves_the_new_certificate_and_keeps_the_old_on_bad_files(
        tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    make_cert(cert, key, "first", ca_out=ca)
    tls = ReloadingTLS(cert, key)
    assert _served_cn(tls.context, ca) == "first"
    assert not tls.check()
    make_cert(cert, key, "second", ca_out=tmp_path / "ca2.pem")
    assert tls.check() and tls.reloads == 1
    assert _served_cn(tls.context, tmp_path / "ca2.pem") == "second"
    # Half a rotation: a new key that does not match the certificate.
    make_cert(tmp_path / "other.crt", key, "third")
    assert not tls.check() and tls.failures == 1
    assert _served_cn(tls.context, tmp_path / "ca2.pem") == "second"
    with pytest.raises(TLSConfigError, match="not found"):
        ReloadingTLS(tmp_path / "missing.crt", key)
    with pytest.raises(TLSConfigError, match="cannot load"):
        ReloadingTLS(cert, key)  # key no longer matches cert


# -- token ids ---------------------------------------------------------------------------


def test_tokens_carry_a_unique_jti() -> None:
    one = issue_token(SECRET, "dev-1", DEVICE_AUDIENCE, 60)
    two = issue_token(SECRET, "dev-1", DEVICE_AUDIENCE, 60)
    a, b = verify_identity(SECRET, one, DEVICE_AUDIENCE), verify_identity(SECRET, two,
                                                                           DEVICE_AUDIENCE)
    assert a.subject == b.subject == "dev-1"
    assert a.token_id and b.token_id and a.token_id != b.token_id
    assert verify_token(SECRET, one, DEVICE_AUDIENCE) == "dev-1"
    fixed = issue_token(SECRET, "dev-1", DEVICE_AUDIENCE, 60, token_id="t-1")
    assert verify_identity(SECRET, fixed, DEVICE_AUDIENCE).token_id == "t-1"
    for jti, problem in [(5, "malformed: JWT ID must be a string"), ("x" * 257, "'jti'")]:
        bad = jwt.encode({"sub": "d", "aud": DEVICE_AUDIENCE, "exp": int(time.time()) + 60,
                          "jti": jti}, SECRET, algorithm="HS256")
        with pytest.raises(AuthError, match=problem):
            verify_identity(SECRET, bad, DEVICE_AUDIENCE)


def test_token_cli_json_prints_the_jti() -> None:
    env = {**os.environ, "IOTPIPE_AUTH_SECRET": SECRET.decode()}
    out = subprocess.run([sys.executable, "-m", "iotpipe.cli", "token", "dev-7", "--json"],
                         capture_output=True, text=True, env=env, timeout=60, check=True)
    printed = json.loads(out.stdout)
    identity = verify_identity(SECRET, printed["token"], DEVICE_AUDIENCE)
    assert identity.subject == "dev-7" and identity.token_id == printed["jti"]
