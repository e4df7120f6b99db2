"""CurveZMQ for every tier-to-tier ZeroMQ socket: key files, the ZAP gatekeeper, socket setup.

A pipeline has one key pair per tier role (``middle``, ``ingest``, ``relay``, ``storage``),
kept as zmq.auth certificate files in one directory (a Kubernetes Secret mounted as a
volume, or ``<data dir>/curve`` for ``iotpipe up``)::

    <role>.key_secret        the role's current key pair (secret; only that tier needs it)
    <role>.key               the role's current public key
    <role>.next.key_secret   optional: the role's next key pair (during a rotation)
    <role>.next.key          optional: the role's next public key

The middle tier is the only ZeroMQ server. Each of its sockets has its own ZAP domain and
admits only the client role that belongs there (``ADMITTED``): the fan-in ROUTER admits
ingest (and ``iotpipe drain``, which runs as ingest), PUB admits relay, the feed ROUTER
admits storage. A client key is admitted when it is the role's current *or* next public
key, so a rotation never refuses a tier that has not switched yet. The admitted keys are
re-read by ``Gatekeeper.reload`` while the middle runs; a process's own key pair (and, for a
client, the middle's public key) is read at start.

Rotation (``iotpipe keys next|promote|retire``), each step applied to the directory and
rolled out before the next:

1. ``next``: write a next key pair per role. The middle admits old and new client keys.
2. ``promote``: swap current and next. Restarted clients use the new key; the old one stays
   admitted (it is now "next"), so tiers not restarted yet keep working.
3. ``retire``: delete the next files; only the new keys are admitted.

A promoted *middle* key needs the middle and its clients restarted together (a CURVE
client must name the server's one public key): until both run the new key, batches are not
acknowledged and ingest keeps them in its durable queue and resends, so nothing acknowledged
is lost (live PUB events in that window are missed, as for any reconnect).

The ZAP handler is pyzmq's ``zmq.auth.thread.ThreadAuthenticator`` with a credentials
callback; a refused key is counted per domain and logged once (not per connection attempt:
a refused ZeroMQ client reconnects every 100 ms). A client with no CURVE at all never reaches
ZAP (the handshake fails on the mechanism); ``HandshakeWatch`` counts and logs those from the
server sockets' monitor events, once per socket, then at most once a minute.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth
from pydantic import Field
from zmq.auth.thread import ThreadAuthenticator

from iotpipe.zmqmonitor import pending_events

__all__ = [
    "ADMITTED",
    "ROLES",
    "CurveKeyError",
    "CurveKeys",
    "Gatekeeper",
    "HandshakeWatch",
    "KeyPair",
    "add_next",
    "ensure_keys",
    "fingerprint",
    "generate_keys",
    "keys_main",
    "load_keys",
    "promote",
    "retire",
    "secure_client",
    "secure_server",
]

log = logging.getLogger("iotpipe.curve")

ROLES = ("middle", "ingest", "relay", "storage")
SERVER_ROLE = "middle"
# ZAP domain (one per middle socket) -> the client roles it admits.
ADMITTED: Mapping[str, tuple[str, ...]] = {
    "router": ("ingest",),
    "pub": ("relay",),
    "feed": ("storage",),
}
SLOTS = ("current", "next")
KEYS_SUBDIR = "curve"
# Distinct refused keys remembered for "log once"; beyond that refusals are only counted.
_MAX_REMEMBERED = 1024


class CurveKeyError(ValueError):
    """A key directory or key file is missing or unusable; the message names the file."""


@dataclass(frozen=True)
class KeyPair:
    public: bytes  # Z85, 40 characters
    secret: bytes | None  # Z85; None for a public-only file


@dataclass(frozen=True)
class CurveKeys:
    """What one process needs: its own key pair, the middle's public key (clients) and the
    admitted client keys per ZAP domain (the middle)."""

    role: str
    own: KeyPair
    server_public: bytes
    admitted: Mapping[str, frozenset[bytes]] = field(default_factory=dict)


def fingerprint(public: bytes) -> str:
    """A short, label-safe name of a public key (Z85): the first 16 hex digits of its
    SHA-256. The middle's metrics and the operator's rotation status use it."""
    return hashlib.sha256(public.strip()).hexdigest()[:16]


def _stem(role: str, slot: str) -> str:
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
    if slot not in SLOTS:
        raise ValueError(f"unknown slot {slot!r}; one of {', '.join(SLOTS)}")
    return role if slot == "current" else f"{role}.next"


def public_file(directory: Path, role: str, slot: str = "current") -> Path:
    return Path(directory) / f"{_stem(role, slot)}.key"


def secret_file(directory: Path, role: str, slot: str = "current") -> Path:
    return Path(directory) / f"{_stem(role, slot)}.key_secret"


def _read(path: Path, need_secret: bool) -> KeyPair:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise CurveKeyError(f"{path}: cannot read the CURVE key ({exc})") from None
    if len(public) != 40 or (need_secret and (secret is None or len(secret) != 40)):
        raise CurveKeyError(f"{path}: not a CURVE key file (expected Z85 keys of 40 "
                            f"characters{', public and secret' if need_secret else ''})")
    return KeyPair(public, secret)


def _admitted(directory: Path, domains: Iterable[str]) -> dict[str, frozenset[bytes]]:
    admitted: dict[str, frozenset[bytes]] = {}
    for domain in domains:
        keys: set[bytes] = set()
        for role in ADMITTED[domain]:
            for slot in SLOTS:
                path = public_file(directory, role, slot)
                if slot == "next" and not path.exists():
                    continue
                keys.add(_read(path, need_secret=False).public)
        admitted[domain] = frozenset(keys)
    return admitted


def load_keys(directory: str | os.PathLike[str], role: str) -> CurveKeys:
    """The keys ``role`` runs with, from ``directory``; ``CurveKeyError`` naming the file
    that is missing or bad. The middle also gets the admitted client keys of every domain."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CurveKeyError(f"{directory}: CURVE keys directory does not exist "
                            "(create one with 'iotpipe keys generate --dir DIR')")
    own = _read(secret_file(directory, role), need_secret=True)
    server_public = _read(public_file(directory, SERVER_ROLE), need_secret=False).public
    admitted = _admitted(directory, ADMITTED) if role == SERVER_ROLE else {}
    return CurveKeys(role, own, server_public, admitted)


# -- writing key files ---------------------------------------------------------------------


def _write_pair(directory: Path, role: str, slot: str) -> None:
    """A new key pair for ``role`` in ``slot``: generated by zmq.auth into a private (0700)
    temporary directory, the secret file made 0600, then renamed into place."""
    stem = _stem(role, slot)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".keygen-") as tmp:
        pub, sec = zmq.auth.create_certificates(tmp, stem, metadata={"role": role})
        os.chmod(sec, 0o600)
        os.chmod(pub, 0o644)
        os.replace(sec, secret_file(directory, role, slot))
        os.replace(pub, public_file(directory, role, slot))


def _prepare(directory: str | os.PathLike[str]) -> Path:
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def generate_keys(directory: str | os.PathLike[str], force: bool = False) -> list[str]:
    """Current key pairs for every role that has none yet (all of them with ``force``);
    the roles written."""
    path = _prepare(directory)
    written = []
    for role in ROLES:
        if force or not secret_file(path, role).exists() or not public_file(path, role).exists():
            _write_pair(path, role, "current")
            written.append(role)
    return written


def ensure_keys(data_dir: str | os.PathLike[str]) -> Path:
    """``<data_dir>/curve`` with a key pair for every role (made on first use): what
    ``iotpipe up`` passes as ``--curve-keys-dir`` to every tier."""
    directory = Path(data_dir) / KEYS_SUBDIR
    generate_keys(directory)
    return directory


def add_next(directory: str | os.PathLike[str], roles: Sequence[str] = ROLES) -> list[str]:
    """Rotation step 1: a next key pair for each role (replacing an unused next one)."""
    path = Path(directory)
    for role in roles:
        if not secret_file(path, role).exists():
            raise CurveKeyError(f"{secret_file(path, role)}: no current key to rotate")
        _write_pair(path, role, "next")
    return list(roles)


def promote(directory: str | os.PathLike[str], roles: Sequence[str] = ROLES) -> list[str]:
    """Rotation step 2: swap current and next (the old key stays admitted as next)."""
    path = Path(directory)
    swapped = []
    for role in roles:
        if not secret_file(path, role, "next").exists():
            continue
        for name in (secret_file, public_file):
            cur, nxt = name(path, role, "current"), name(path, role, "next")
            tmp = path / f".swap-{cur.name}"
            os.replace(cur, tmp)
            os.replace(nxt, cur)
            os.replace(tmp, nxt)
        swapped.append(role)
    return swapped


def retire(directory: str | os.PathLike[str], roles: Sequence[str] = ROLES) -> list[str]:
    """Rotation step 3: delete the next key files; only current keys are admitted."""
    path = Path(directory)
    removed = []
    for role in roles:
        found = False
        for name in (secret_file, public_file):
            with contextlib.suppress(FileNotFoundError):
                name(path, role, "next").unlink()
                found = True
        if found:
            removed.append(role)
    return removed


# -- sockets -------------------------------------------------------------------------------


def secure_client(sock: zmq.Socket[bytes], keys: CurveKeys) -> None:
    """Make ``sock`` a CURVE client of the middle tier (before it connects)."""
    assert keys.own.secret is not None
    sock.curve_secretkey = keys.own.secret
    sock.curve_publickey = keys.own.public
    sock.curve_serverkey = keys.server_public


def secure_server(sock: zmq.Socket[bytes], keys: CurveKeys, domain: str) -> None:
    """Make ``sock`` a CURVE server whose clients the gatekeeper checks in ``domain``
    (before it binds). The gatekeeper must be started first: without a ZAP handler libzmq
    admits every CURVE client."""
    if domain not in ADMITTED:
        raise ValueError(f"unknown ZAP domain {domain!r}")
    assert keys.own.secret is not None
    sock.curve_server = True
    sock.curve_secretkey = keys.own.secret
    sock.curve_publickey = keys.own.public
    sock.zap_domain = domain.encode()


def _signature(directory: Path) -> tuple[tuple[str, int, int, int], ...]:
    """What changes when a key file changes (Secret volumes swap a symlink: stat follows it)."""
    entries = []
    with contextlib.suppress(OSError):
        for entry in sorted(os.listdir(directory)):
            if entry.endswith((".key", ".key_secret")):
                with contextlib.suppress(OSError):
                    st = os.stat(directory / entry)
                    if stat.S_ISREG(st.st_mode):
                        entries.append((entry, st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(entries)


class _Provider:
    """pyzmq credentials provider for one ZAP domain (called on the authenticator thread)."""

    def __init__(self, gatekeeper: Gatekeeper, domain: str) -> None:
        self._gatekeeper = gatekeeper
        self._domain = domain

    def callback(self, domain: str, key: bytes) -> bool:
        return self._gatekeeper.check(self._domain, key)


class Gatekeeper:
    """The middle's ZAP handler: admits per domain the client keys of the key directory.

    ``start`` before binding the CURVE sockets; ``reload`` (from any thread, e.g. the
    middle's loop every few seconds) re-reads the admitted keys when the files changed and
    keeps the last good set if they cannot be read.
    """

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], directory: str | os.PathLike[str],
                 keys: CurveKeys) -> None:
        self.directory = Path(directory)
        self.keys = keys
        self._admitted: Mapping[str, frozenset[bytes]] = dict(keys.admitted)
        self._signature = _signature(self.directory)
        self._lock = threading.Lock()
        self._logged: set[tuple[str, bytes]] = set()
        self.refused: Counter[str] = Counter({d: 0 for d in ADMITTED})
        self.reload_failures = 0
        # The middle's own public key as last read from disk (it runs with keys.own until a
        # restart): tells a rotation that a promoted Secret has reached this pod.
        self.disk_public: bytes = keys.own.public
        self._auth = ThreadAuthenticator(ctx, log=logging.getLogger("iotpipe.curve.zap"))

    def start(self) -> Gatekeeper:
        self._auth.start()
        for domain in ADMITTED:
            self._auth.configure_curve_callback(domain, credentials_provider=_Provider(self,
                                                                                      domain))
        return self

    def stop(self) -> None:
        self._auth.stop()

    def admitted(self, domain: str) -> frozenset[bytes]:
        return self._admitted.get(domain, frozenset())

    def check(self, domain: str, key: bytes) -> bool:
        """Is ``key`` (Z85) admitted on ``domain``? A refusal is counted, and logged the
        first time this key is refused on this domain."""
        if key in self._admitted.get(domain, frozenset()):
            return True
        with self._lock:
            self.refused[domain] += 1
            first = (domain, key) not in self._logged
            if first and len(self._logged) < _MAX_REMEMBERED:
                self._logged.add((domain, key))
        if first:
            log.warning("CURVE client refused: its public key is not one of this pipeline's",
                        extra={"fields": {"socket": domain, "client_key": key.decode(),
                                          "admits": list(ADMITTED[domain])}})
        return False

    def reload(self) -> bool:
        """Re-read the admitted keys if the directory changed; True when they changed."""
        signature = _signature(self.directory)
        if signature == self._signature:
            return False
        self._signature = signature
        try:
            admitted = _admitted(self.directory, ADMITTED)
            own = _read(secret_file(self.directory, SERVER_ROLE), need_secret=True)
        except CurveKeyError as exc:
            self.reload_failures += 1
            log.error("CURVE keys directory unusable; keeping the admitted keys in use",
                      extra={"fields": {"error": str(exc)}})
            return False
        self.disk_public = own.public
        if own.public != self.keys.own.public:
            log.warning("this middle's own CURVE key changed on disk; it is used after a "
                        "restart (clients need the same key)",
                        extra={"fields": {"dir": str(self.directory)}})
        changed = admitted != self._admitted
        self._admitted = admitted  # one reference swap: the ZAP thread sees old or new
        with self._lock:
            self._logged.clear()  # a key refused before may be refused again for a new reason
        if changed:
            log.info("CURVE admitted keys reloaded", extra={"fields": {
                "admitted": {d: len(k) for d, k in admitted.items()}}})
        return changed


_FAILED = int(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
              | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


class HandshakeWatch:
    """Counts failed handshakes on server sockets (monitor events) and logs them sparingly.

    ZAP refusals are logged by the gatekeeper with the key; this catches the clients that
    never get that far (no CURVE, the wrong server key). Call ``drain`` when a monitor socket
    is readable (``sockets()`` lists them for a poller).
    """

    SUMMARY_S = 60.0

    def __init__(self, sockets: Mapping[str, zmq.Socket[bytes]]) -> None:
        self._monitors: dict[zmq.Socket[bytes], str] = {}
        for name, sock in sockets.items():
            self._monitors[sock.get_monitor_socket(_FAILED)] = name
        self._servers = dict(sockets)
        self.failed: Counter[tuple[str, str]] = Counter()
        self._logged_at: dict[str, float] = {}
        self._since_log: Counter[str] = Counter()

    def sockets(self) -> list[zmq.Socket[bytes]]:
        return list(self._monitors)

    def drain(self, monitor: zmq.Socket[bytes]) -> None:
        name = self._monitors[monitor]
        for event in pending_events(monitor):
            kind = _kind(int(event["event"]), int(event["value"]))
            if kind == "auth":
                continue  # the gatekeeper logged it, with the key
            self._note(name, kind, int(event["value"]))

    def _note(self, name: str, kind: str, code: int) -> None:
        # Counted per kind; logged per socket (one client that retries can fail in several
        # ways: the mechanism, then a broken pipe on its next attempt).
        self.failed[(name, kind)] += 1
        self._since_log[name] += 1
        now = time.monotonic()
        last = self._logged_at.get(name)
        if last is None or now - last >= self.SUMMARY_S:
            log.warning("ZeroMQ handshake refused" + (" (repeated)" if last else ""), extra={
                "fields": {"socket": name, "reason": kind, "code": hex(code),
                           "since_last_log": self._since_log[name]}})
            self._logged_at[name] = now
            self._since_log[name] = 0

    def close(self) -> None:
        for sock in self._servers.values():
            with contextlib.suppress(zmq.ZMQError):
                sock.disable_monitor()
        for monitor in self._monitors:
            monitor.close(0)


def _kind(event: int, value: int) -> str:
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return "auth"
    if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
        return "broken"  # value is an errno: the peer went away mid-handshake
    if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
        return "no_curve"  # the client does not speak CURVE
    if value == zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
        return "wrong_server_key"
    return "protocol"


# -- CLI -----------------------------------------------------------------------------------


def keys_main(argv: Sequence[str]) -> int:
    """``iotpipe keys generate|next|promote|retire|show --dir DIR``."""
    from iotpipe.settings import CommaList, TierSettings, parse_settings, tier_config

    actions = ("generate", "next", "promote", "retire", "show")
    usage = ("usage: iotpipe keys {generate|next|promote|retire|show} --dir DIR [--force] "
             "[--roles ingest,relay,...]\n"
             "  generate  a current key pair for every role that has none (all: --force)\n"
             "  next      rotation step 1: a next key pair per role (both admitted)\n"
             "  promote   rotation step 2: swap current and next (old one still admitted)\n"
             "  retire    rotation step 3: delete the next keys\n"
             "  show      the public keys and which are admitted on which middle socket")
    args = list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage)
        return 0
    action, rest = args[0], args[1:]
    if action not in actions:
        print(f"iotpipe keys: error: unknown action {action!r}\n{usage}", file=sys.stderr)
        return 2

    class KeysSettings(TierSettings):
        """Create or rotate the pipeline's CURVE key files."""

        model_config = tier_config(f"iotpipe keys {action}", "IOTPIPE_KEYS_")
        dir: Path = Field(description="the CURVE keys directory")
        force: bool = Field(False, description="generate: replace existing current keys")
        roles: CommaList = Field(list(ROLES), description="next/promote/retire: the roles to "
                                                          "rotate, comma separated")

    settings = parse_settings(KeysSettings, rest)
    unknown = sorted(set(settings.roles) - set(ROLES))
    if unknown:
        print(f"iotpipe keys: error: --roles: unknown role(s) {', '.join(unknown)}; "
              f"roles are {', '.join(ROLES)}", file=sys.stderr)
        return 2
    roles = [r for r in ROLES if r in settings.roles]
    none = "nothing (no next keys)"
    try:
        if action == "generate":
            done = generate_keys(settings.dir, force=settings.force)
            print(f"generated: {', '.join(done) or 'nothing (keys exist; --force replaces)'}")
        elif action == "next":
            print(f"next keys written: {', '.join(add_next(settings.dir, roles))}")
        elif action == "promote":
            print(f"promoted: {', '.join(promote(settings.dir, roles)) or none}")
        elif action == "retire":
            print(f"retired: {', '.join(retire(settings.dir, roles)) or none}")
        else:
            keys = load_keys(settings.dir, SERVER_ROLE)
            print(f"middle public key: {keys.own.public.decode()}")
            for domain, admitted in keys.admitted.items():
                print(f"{domain} admits: {', '.join(sorted(k.decode() for k in admitted))}")
    except (CurveKeyError, OSError, ValueError) as exc:
        print(f"iotpipe keys: error: {exc}", file=sys.stderr)
        return 1
    return 0

