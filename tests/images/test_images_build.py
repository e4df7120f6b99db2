"""Build both container images offline-style and run them.

No registry is reachable here, so the base image is made the way an air-gapped build farm
would: ``debootstrap --variant=minbase bookworm`` plus Debian's ``python3`` (3.11), imported
into a private dockerd that this module starts and stops itself (own data-root, exec-root
and socket under a temp dir; no bridge, no iptables; containers use host networking only).
The Dockerfiles must then work on that base exactly as on ``python:3.11-slim-bookworm``:
the base deliberately lacks ``python3-venv`` so the builder stage's fallback is exercised.

Sizes are printed (``-s``) and recorded as junit properties; budgets keep the images slim.
Run time here: about 4 minutes (debootstrap 1-2 min, both builds in parallel ~2 min, then
about twenty short container runs).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.ports import free_port, free_port_block
from support.waiting import wait_for, wait_ready

from iotpipe import lifecycle

pytestmark = [pytest.mark.docker, pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parents[2]
MIRROR = os.environ.get("IOTPIPE_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SUITE = "bookworm"
BASE_TAG = "iotpipe-test/debian-python3:bookworm"
WORKLOAD_TAG = "iotpipe-test/iotpipe:test"
OPERATOR_TAG = "iotpipe-test/iotpipe-operator:test"
# What each image may add on top of its base (MB). The workload carries pyarrow (the
# Parquet lake sink, ~150 MB) and libpmem; the operator carries kopf and the kubernetes
# client (~60 MB with bytecode, without its unused asyncio twin). Growing past these
# means something slipped in.
BUDGET_OVER_BASE_MB = {WORKLOAD_TAG: 260, OPERATOR_TAG: 160}
BUILD_TIMEOUT = 900
RUN_TIMEOUT = 120


def _missing_prerequisite() -> str | None:
    for tool in ("docker", "dockerd", "debootstrap"):
        if shutil.which(tool) is None:
            return (f"`{tool}` not found: install Debian's docker.io and debootstrap "
                    "(apt-get install -y docker.io debootstrap) to build the images")
    if os.geteuid() != 0:
        return "dockerd and debootstrap need root; run this test as root"
    try:
        with urllib.request.urlopen(f"{MIRROR}/dists/{SUITE}/Release", timeout=15):
            pass
    except OSError as exc:
        return f"Debian mirror {MIRROR} unreachable ({exc}); set IOTPIPE_DEBIAN_MIRROR"
    return None


@dataclass
class Docker:
    """A docker CLI bound to the private daemon."""

    host: str

    def env(self) -> dict[str, str]:
        # The legacy builder: BuildKit in the client needs the buildx plugin (and would fetch
        # its frontend image from a registry); the classic builder needs neither.
        return {**os.environ, "DOCKER_HOST": self.host, "DOCKER_BUILDKIT": "0"}

    def run(self, *args: str, timeout: float = RUN_TIMEOUT, input_text: str | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["docker", *args], env=self.env(), capture_output=True,
                                text=True, timeout=timeout, input=input_text)
        if check and result.returncode != 0:
            pytest.fail(f"docker {' '.join(args)} exited {result.returncode}:\n"
                        f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def size_mb(self, tag: str) -> float:
        size = self.run("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip()
        return int(size) / 1e6


def _unmount_below(root: Path) -> None:
    """Lazily unmount whatever a killed dockerd left mounted under ``root``."""
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m.startswith(str(root))), reverse=True):
        subprocess.run(["umount", "-l", mount], capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def docker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Docker]:
    reason = _missing_prerequisite()
    if reason:
        pytest.skip(reason)
    # A short root: the daemon's unix sockets must fit in 108 bytes.
    root = Path(tmp_path_factory.mktemp("dkr"))
    socket = root / "docker.sock"
    log = open(root / "dockerd.log", "wb")  # noqa: SIM115 - closed at teardown
    daemon = subprocess.Popen(
        ["dockerd", "--iptables=false", "--ip6tables=false", "--bridge=none",
         "--data-root", str(root / "data"), "--exec-root", str(root / "exec"),
         "--pidfile", str(root / "docker.pid"), "--host", f"unix://{socket}"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        # A SIGKILLed pytest runs no teardown: SIGTERM makes dockerd stop its containerd
        # and unmount rather than outlive the run.
        preexec_fn=functools.partial(lifecycle.die_with_parent, signal.SIGTERM))
    client = Docker(f"unix://{socket}")
    try:
        deadline = time.monotonic() + 60
        while client.run("info", check=False, timeout=20).returncode != 0:
            if daemon.poll() is not None or time.monotonic() > deadline:
                pytest.fail("dockerd did not start:\n"
                            + (root / "dockerd.log").read_text(errors="replace")[-3000:])
            time.sleep(0.5)
        yield client
    finally:
        daemon.terminate()  # dockerd stops its containerd and unmounts on SIGTERM
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait(timeout=10)
        log.close()
        _unmount_below(root)
        shutil.rmtree(root / "data", ignore_errors=True)
        shutil.rmtree(root / "exec", ignore_errors=True)


def _host_ca_bundle() -> Path | None:
    """The CA bundle the host's pip trusts, when it is not the default (TLS-inspecting
    proxies): the base image needs it too, or pip inside the build cannot reach PyPI."""
    for var in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"):
        value = os.environ.get(var)
        if value and Path(value).is_file():
            return Path(value)
    return None


@pytest.fixture(scope="module")
def base_image(docker: Docker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    rootfs = tmp_path_factory.mktemp("rootfs")
    try:
        # python3 only, without python3-venv: the Dockerfiles must install what they lack.
        result = subprocess.run(
            ["debootstrap", "--variant=minbase", "--include=python3", SUITE, str(rootfs),
             MIRROR], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"debootstrap failed:\n{result.stdout[-3000:]}"
        # What python:*-slim leaves out too: docs, man pages, locales, apt caches.
        for sub in ("usr/share/doc", "usr/share/man", "usr/share/locale", "usr/share/info",
                    "var/cache/apt/archives", "var/lib/apt/lists"):
            for child in (rootfs / sub).glob("*"):
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        changes: list[str] = []
        bundle = _host_ca_bundle()
        if bundle is not None:
            # Outside /etc/ssl/certs: installing ca-certificates (python3-venv pulls it in)
            # regenerates that bundle and would drop the host's extra CA.
            target = rootfs / "etc/ssl/host-ca-bundle.pem"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(bundle, target)
            changes = ["--change", f"ENV PIP_CERT=/{target.relative_to(rootfs)}"]
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run(["docker", "import", *changes, "-", BASE_TAG],
                                  stdin=tar.stdout, env=docker.env(), capture_output=True,
                                  text=True, timeout=300)
        assert tar.stdout is not None
        tar.stdout.close()
        assert tar.wait(timeout=60) == 0 and imported.returncode == 0, imported.stderr
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)
    yield BASE_TAG


def _build(docker: Docker, base: str, dockerfile: str, tag: str) -> str:
    started = time.monotonic()
    docker.run("build", "--network", "host", "--build-arg", f"BASE_IMAGE={base}",
               "-f", str(REPO / dockerfile), "-t", tag, str(REPO), timeout=BUILD_TIMEOUT)
    print(f"\n{dockerfile}: built in {time.monotonic() - started:.0f} s, "
          f"{docker.size_mb(tag):.0f} MB")
    return tag


@pytest.fixture(scope="module")
def built_images(docker: Docker, base_image: str) -> dict[str, str]:
    """Both images, built at the same time: one build's downloads overlap the other's
    installs (about a minute saved over building one after the other)."""
    builds = {WORKLOAD_TAG: "Dockerfile.workload", OPERATOR_TAG: "Dockerfile.operator"}
    with ThreadPoolExecutor(max_workers=len(builds)) as pool:
        futures = {tag: pool.submit(_build, docker, base_image, dockerfile, tag)
                   for tag, dockerfile in builds.items()}
        return {tag: future.result() for tag, future in futures.items()}


@pytest.fixture(scope="module")
def workload_image(built_images: dict[str, str]) -> str:
    return built_images[WORKLOAD_TAG]


@pytest.fixture(scope="module")
def operator_image(built_images: dict[str, str]) -> str:
    return built_images[OPERATOR_TAG]


def _run(docker: Docker, image: str, *args: str, entrypoint: str | None = None,
         env: dict[str, str] | None = None, input_text: str | None = None,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a container as the cluster would: host network, read-only root, /tmp tmpfs."""
    options = ["run", "--rm", "--network", "host", "--read-only", "--tmpfs", "/tmp"]
    if input_text is not None:
        options.append("-i")
    if entrypoint:
        options += ["--entrypoint", entrypoint]
    for key, value in (env or {}).items():
        options += ["-e", f"{key}={value}"]
    return docker.run(*options, image, *args, input_text=input_text, check=check)


# ---------------------------------------------------------------- workload image


def test_workload_image_runs_iotpipe_help(docker: Docker, workload_image: str) -> None:
    result = _run(docker, workload_image, "--help")
    assert "usage: iotpipe COMMAND" in result.stdout
    for tier in ("ingest", "middle", "relay", "storage", "drain", "token", "query"):
        assert f"  {tier} " in result.stdout


@pytest.mark.parametrize(("tier", "flag"), [
    ("ingest", "--metrics-port"), ("middle", "--metrics-port"), ("relay", "--metrics-port"),
    ("storage", "--metrics-port"), ("drain", "--middle-endpoints"),
])
def test_workload_tiers_import_their_native_dependencies(
        docker: Docker, workload_image: str, tier: str, flag: str) -> None:
    # `iotpipe <tier> --help` imports the tier's server module: pyzmq, websockets, uvloop,
    # google-crc32c and friends must load from their wheels on this base.
    result = _run(docker, workload_image, tier, "--help")
    assert "usage:" in result.stdout.lower()
    assert flag in result.stdout


def test_workload_image_issues_a_token(docker: Docker, workload_image: str) -> None:
    result = _run(docker, workload_image, "token", "sensor-1", "--ttl", "60",
                  env={"IOTPIPE_AUTH_SECRET": "s" * 32})
    header, payload, signature = result.stdout.strip().split(".")
    assert header and payload and signature


def test_workload_image_has_libpmem_the_lake_sink_and_the_c_encoder(
        docker: Docker, workload_image: str) -> None:
    script = ("import ctypes, pyarrow.parquet; lib = ctypes.CDLL('libpmem.so.1'); "
              "from iotpipe.queue import framing; "
              "print(bool(lib.pmem_is_pmem), framing.ENCODER)")
    result = _run(docker, workload_image, "-c", script, entrypoint="python3")
    assert result.stdout.strip() == "True c"


def test_workload_image_leaves_the_tools_out(docker: Docker, workload_image: str) -> None:
    """Benchmarks and the simulator (iotpipe_tools) are not in the product image, and the
    command says so instead of a traceback."""
    script = "import importlib.util; print(importlib.util.find_spec('iotpipe_tools'))"
    assert _run(docker, workload_image, "-c", script,
                entrypoint="python3").stdout.strip() == "None"
    result = _run(docker, workload_image, "simulate", "--help", check=False)
    assert result.returncode == 2
    assert "the tools package (iotpipe_tools) is not installed" in result.stderr


def test_workload_image_runs_the_pipeline_read_only(docker: Docker, workload_image: str,
                                                    request: pytest.FixtureRequest,
                                                    tmp_path: Path) -> None:
    """`iotpipe up` (every tier, embedded storage) inside one read-only container, devices
    from `iotpipe simulate` on the host (the image ships no tools): every acknowledged
    message is stored once, and SIGTERM stops the tiers in order with exit status 0."""
    base = free_port_block(9)
    name = f"iotpipe-up-{base}"
    request.addfinalizer(lambda: docker.run("rm", "-f", name, check=False))
    docker.run("run", "-d", "--name", name, "--network", "host", "--read-only",
               "--tmpfs", "/tmp", "--tmpfs", "/data:uid=10001,gid=10001,mode=0750",
               workload_image, "up", "--data-dir", "/data", "--base-port", str(base))
    # ingest's /readyz is on base+5 (see `iotpipe up --help`)
    wait_ready(f"http://127.0.0.1:{base + 5}/readyz", 90, what="ingest in the container",
               details=lambda: docker.run("logs", name, check=False).stderr)
    secret = docker.run("exec", name, "cat", "/data/auth.secret").stdout.strip()
    acked_file = tmp_path / "acked.tsv"
    simulate = subprocess.run(
        [sys.executable, "-m", "iotpipe.cli", "simulate",
         "--url", f"ws://127.0.0.1:{base}/v1/ingest", "--connections", "5", "--messages", "50",
         "--rate", "0", "--batch", "5", "--acked-file", str(acked_file), "--json"],
        env={**os.environ, "IOTPIPE_AUTH_SECRET": secret}, capture_output=True, text=True,
        timeout=120)
    report = json.loads(simulate.stdout)
    assert report["acked"] == 250 and report["ok"], report
    acked = {tuple(line.split("\t")) for line in acked_file.read_text().splitlines()}
    assert len(acked) == 250

    def stored() -> list[tuple[str, str]] | None:
        lines = docker.run("exec", name, "iotpipe", "query", "--db",
                           "/data/store/readings.db", "--json", check=False).stdout
        rows = [(r["device_id"], r["msg_id"]) for r in map(json.loads, lines.splitlines())]
        return rows if acked <= set(rows) else None

    rows = wait_for(stored, 60, "every acked message in the container's store",
                    interval=0.5)
    assert len(rows) == len(set(rows)) == 250
    docker.run("stop", "-t", "60", name, timeout=90)
    state = json.loads(docker.run("inspect", name).stdout)[0]["State"]
    assert state["ExitCode"] == 0, docker.run("logs", name, check=False).stderr[-3000:]


def _catches_sigterm(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next((line.split()[1] for line in status.splitlines()
                 if line.startswith("SigCgt:")), "0")
    return bool(int(mask, 16) & (1 << (signal.SIGTERM - 1)))


@pytest.mark.parametrize("tier", ["ingest", "middle", "relay", "storage"])
def test_workload_tier_stopped_while_starting_exits_0(
        docker: Docker, workload_image: str, tier: str, request: pytest.FixtureRequest) -> None:
    """Each tier is PID 1 in its container, where a signal with no handler is dropped: a
    `docker stop` during start-up used to wait out the whole grace period (exit 137).
    Stopped as soon as its handler exists (about 0.1 s after start, long before the tier
    is serving), it exits 0 without a SIGKILL."""
    base = free_port_block(4)
    name = f"iotpipe-early-{tier}-{base}"
    request.addfinalizer(lambda: docker.run("rm", "-f", name, check=False))
    args = {
        "ingest": ["--port", str(base), "--insecure-no-auth",
                   "--middle-endpoints", f"tcp://127.0.0.1:{base + 1}"],
        "middle": ["--router-port", str(base), "--pub-port", str(base + 1),
                   "--feed-port", str(base + 2)],
        "relay": ["--port", str(base), "--insecure-no-auth",
                  "--middle-pub-endpoints", f"tcp://127.0.0.1:{base + 1}"],
        "storage": ["--feed-endpoints", f"tcp://127.0.0.1:{base + 1}",
                    "--sinks", "sqlite:///tmp/readings.db", "--data-dir", "/tmp/store"],
    }[tier]
    docker.run("create", "--name", name, "--network", "host", "--read-only",
               "--tmpfs", "/tmp", "--tmpfs", "/var/lib/iotpipe:uid=10001,gid=10001",
               workload_image, tier, "--host", "127.0.0.1", "--metrics-port", str(base + 3),
               *args)
    docker.run("start", name)
    pid = int(docker.run("inspect", "-f", "{{.State.Pid}}", name).stdout.strip())
    deadline = time.monotonic() + 30
    while not _catches_sigterm(pid):  # the exact precondition, not a guessed delay
        assert time.monotonic() < deadline, docker.run("logs", name, check=False).stderr
        time.sleep(0.005)
    docker.run("stop", "-t", "30", name, timeout=60)
    state = json.loads(docker.run("inspect", name).stdout)[0]["State"]
    assert state["ExitCode"] == 0, (state, docker.run("logs", name, check=False).stderr[-3000:])
    assert not state["OOMKilled"]


# ---------------------------------------------------------------- operator image


def test_operator_image_runs_iotpipe_operator_help(docker: Docker, operator_image: str) -> None:
    result = _run(docker, operator_image, "--help")
    assert "iotpipe-operator run" in result.stdout
    run_help = _run(docker, operator_image, "run", "--help")
    assert "--liveness-endpoint" in run_help.stdout


def test_operator_image_renders_a_sample_pipeline(docker: Docker, operator_image: str) -> None:
    """The operator's builders (Jinja2 templates shipped as package data) work in the image."""
    sample = (REPO / "samples" / "minimal.yaml").read_text()
    result = _run(docker, operator_image, "render", "-f", "-", input_text=sample)
    kinds = {line.split(":", 1)[1].strip() for line in result.stdout.splitlines()
             if line.startswith("kind:")}
    assert {"StatefulSet", "Service"} <= kinds, result.stdout[:2000]


def test_operator_image_starts_kopf_read_only(docker: Docker, operator_image: str) -> None:
    """`iotpipe-operator run` gets as far as logging in on a read-only root: kopf, the
    handlers and the liveness endpoint load; only the (absent) cluster is missing."""
    # Host networking: a free loopback port of this host (kopf reads port 0 as 80).
    port = free_port()
    result = _run(docker, operator_image, "15", "iotpipe-operator", "run", "--standalone",
                  f"--liveness-endpoint=http://127.0.0.1:{port}/healthz", entrypoint="timeout",
                  env={"KUBECONFIG": "/nonexistent"}, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 124, output[-3000:]  # still running when timeout stopped it
    assert "Cannot authenticate the client library" in output, output[-3000:]
    for problem in ("Read-only file system", "ModuleNotFoundError", "ImportError"):
        assert problem not in output, output[-3000:]


# ---------------------------------------------------------------- both images


@pytest.mark.parametrize("which", ["workload", "operator"])
def test_images_are_non_root_without_compilers_or_pip(
        docker: Docker, request: pytest.FixtureRequest, which: str) -> None:
    image: str = request.getfixturevalue(f"{which}_image")
    config = json.loads(docker.run("image", "inspect", image).stdout)[0]["Config"]
    # Numeric, so Kubernetes runAsNonRoot can verify it without reading /etc/passwd.
    assert config["User"] == "10001:10001"
    probe = ("id -u; command -v sleep; "
             "for tool in gcc cc c++ make pip pip3; do command -v $tool; done; "
             "ls /opt/iotpipe/bin; ls -d /root/.cache 2>/dev/null; true")
    result = _run(docker, image, "-c", probe, entrypoint="sh")
    lines = result.stdout.split()
    assert lines[0] == "10001"
    # The operator's ingest pods run `sleep` as their preStop hook.
    assert lines[1].endswith("/sleep")
    for tool in ("gcc", "cc", "c++", "make", "pip", "pip3"):
        assert not any(line.endswith(f"/{tool}") for line in lines), result.stdout
    assert "/root/.cache" not in lines


@pytest.mark.parametrize("tag", [WORKLOAD_TAG, OPERATOR_TAG])
def test_image_size_stays_within_budget(docker: Docker, base_image: str, workload_image: str,
                                        operator_image: str, tag: str,
                                        record_property: Callable[[str, object], None]) -> None:
    base_mb, size_mb = docker.size_mb(base_image), docker.size_mb(tag)
    record_property("image", tag)
    record_property("size_mb", round(size_mb))
    record_property("base_mb", round(base_mb))
    print(f"\n{tag}: {size_mb:.0f} MB ({size_mb - base_mb:.0f} MB over the "
          f"{base_mb:.0f} MB base)")
    assert size_mb - base_mb <= BUDGET_OVER_BASE_MB[tag]
