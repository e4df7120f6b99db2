"""Pure day-2 decisions: step-down, Drain deletion, queue-depth parsing, names; and the
direct metrics read."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest

from iotpipe_operator import deletion, drain
from iotpipe_operator.deletion import Observation
from iotpipe_operator.kube import Kube, KubeError
from iotpipe_operator.names import Names

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("target", "live", "pods", "pvcs", "expected"), [
    (1, 4, {0, 1, 2, 3}, {0, 1, 2, 3}, 3),  # first step, from the live count
    (1, 3, {0, 1, 2, 3}, {0, 1, 2, 3}, 3),  # pod 3 still terminating: wait
    (1, 3, {0, 1, 2}, {0, 1, 2, 3}, 3),  # queue 3 not drained yet: wait
    (1, 3, {0, 1, 2}, {0, 1, 2}, 2),  # ordinal 3 finished: next step
    (1, 2, {0, 1}, {0, 1}, 1),  # reaches the target, never below
    (6, 2, {0, 1}, {0, 1}, 6),  # scale-up at once
    (None, 5, set(), set(), 5),  # autoscaled / unknown: keep live
    (3, None, set(), set(), 3),  # new StatefulSet
    (0, 1, {0}, {0}, 0),  # deletion: the last one
])
def test_next_replicas(target: int | None, live: int | None, pods: set[int],
                       pvcs: set[int], expected: int | None) -> None:
    assert drain.next_replicas(target, live, pods, pvcs) == expected


def test_step_of_more_than_one_is_bounded() -> None:
    assert drain.next_replicas(1, 8, set(range(8)), set(range(8)), step=3) == 5
    assert drain.next_replicas(4, 6, set(range(6)), set(range(6)), step=3) == 4


MIDDLE = """# TYPE iotpipe_middle_feed_lag_records gauge
iotpipe_middle_feed_lag_records{group="storage"} 12
iotpipe_middle_feed_lag_records{group="archive"} 0
# TYPE iotpipe_middle_log_tail_seq gauge
iotpipe_middle_log_tail_seq 40
"""


def test_queue_depths_from_prometheus_text() -> None:
    assert deletion.middle_backlog(MIDDLE, "storage") == 12
    assert deletion.middle_backlog(MIDDLE, "archive") == 0
    assert deletion.middle_backlog(MIDDLE, "other") is None, "no sample: never assume empty"
    empty = "# TYPE iotpipe_middle_log_tail_seq gauge\niotpipe_middle_log_tail_seq 0\n"
    assert deletion.middle_backlog(empty, "storage") == 0, "nothing ever appended"
    assert deletion.middle_backlog("not { prometheus", "storage") is None
    storage = ('iotpipe_storage_in_flight_records{endpoint="a"} 2\n'
               'iotpipe_storage_in_flight_records{endpoint="b"} 3\n')
    assert deletion.storage_in_flight(storage) == 5
    assert deletion.storage_in_flight("") == 0


def test_drain_deletion_order() -> None:
    step = deletion.decide(Observation(ingest_replicas=3, autoscalers=["HPA/x"]))
    assert step.delete_autoscalers and not step.done and step.ingest_replicas is None
    step = deletion.decide(Observation(ingest_replicas=3, ingest_pods={0, 1, 2},
                                       ingest_pvcs={0, 1, 2}))
    assert (step.reason, step.ingest_replicas) == ("DrainingIngest", 2)
    step = deletion.decide(Observation(ingest_replicas=0, ingest_pvcs={0}, drain_jobs={0}))
    assert step.reason == "DrainingIngest" and "drain Jobs [0]" in step.message
    assert deletion.decide(Observation(ingest_replicas=0)).reason == "WaitingForMiddle"
    step = deletion.decide(Observation(ingest_replicas=0, middle={"m-0": 0, "m-1": None},
                                       storage={"s-0": 0}))
    assert step.reason == "WaitingForMetrics" and "m-1" in step.message
    step = deletion.decide(Observation(ingest_replicas=None, middle={"m-0": 4, "m-1": 0},
                                       storage={"s-0": 1}))
    assert step.reason == "WaitingForStorage" and not step.done
    done = deletion.decide(Observation(ingest_replicas=0, middle={"m-0": 0}, storage={}))
    assert done.done and done.reason == "Drained"


def test_names_build_and_parse_the_same_way() -> None:
    names = Names("my-pipe")
    assert names.pvc("ingest", 7) == "queue-my-pipe-ingest-7"
    assert names.pvc_ordinal("ingest", names.pvc("ingest", 7)) == 7
    assert names.pod_ordinal("ingest", names.pod("ingest", 12)) == 12
    assert names.drain_job_ordinal(names.drain_job(3)) == 3
    # another pipeline's or tier's names never parse as ours
    assert names.pod_ordinal("ingest", "my-pipe-2-ingest-1") is None
    assert names.pod_ordinal("ingest", "my-pipe-middle-1") is None
    assert names.pvc_ordinal("ingest", "queue-my-pipe-ingest-drain-1") is None
    assert Names("a.b").pod_ordinal("ingest", "aXb-ingest-0") is None, "dots are literal"


@pytest.fixture
def metrics_server() -> Iterator[int]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = MIDDLE.encode() if self.path == "/metrics" else b""
            self.send_response(200 if body else 404)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_direct_metrics_read_from_the_pod_ip(metrics_server: int) -> None:
    kube = Kube.__new__(Kube)
    kube.timeout = 5.0
    pod = {"metadata": {"name": "p-middle-0"}, "status": {"podIP": "127.0.0.1"}}
    text = kube.pod_metrics("ns", pod, metrics_server, direct=True)
    assert deletion.middle_backlog(text, "storage") == 12
    with pytest.raises(KubeError, match="has no IP yet"):
        kube.pod_metrics("ns", {"metadata": {"name": "p"}}, metrics_server, direct=True)


def test_an_unreachable_api_server_is_a_kube_error_after_retries(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from kubernetes.client import ApiClient, Configuration

    with socket.socket() as sock:  # a loopback port with nothing listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    sleeps: list[float] = []
    monkeypatch.setattr(Kube, "_backoff", lambda _self, seconds: sleeps.append(seconds))
    configuration = Configuration(host=f"http://127.0.0.1:{port}")
    configuration.retries = 0  # urllib3's own retries off: ours are under test
    kube = Kube(ApiClient(configuration), timeout=2.0)
    try:
        with pytest.raises(KubeError) as caught:
            kube.get("v1", "ConfigMap", "ns", "x")
    finally:
        kube.close()
    assert caught.value.status == 0 and caught.value.reason == "Unreachable"
    assert sleeps == [0.2, 0.4, 0.8], "retried with backoff before giving up"
