"""The listen backlog a listener really gets (the request, capped by net.core.somaxconn), and
the overflow count ``bench connections`` reports."""

from __future__ import annotations

from pathlib import Path

import pytest

from iotpipe.ingest.settings import DEFAULT_LISTEN_BACKLOG, IngestSettings, listen_backlog
from iotpipe_tools.bench.connections import listen_overflows

pytestmark = pytest.mark.unit


def test_somaxconn_caps_the_request(tmp_path: Path) -> None:
    cap = tmp_path / "somaxconn"
    cap.write_text("4096\n")
    assert listen_backlog(65535, cap) == (4096, 4096)
    assert listen_backlog(512, cap) == (512, 4096)


def test_unreadable_cap_reports_the_request_as_is(tmp_path: Path) -> None:
    assert listen_backlog(777, tmp_path / "absent") == (777, None)
    garbled = tmp_path / "garbled"
    garbled.write_text("many\n")
    assert listen_backlog(777, garbled) == (777, None)


def test_default_is_high_and_the_option_is_validated() -> None:
    assert IngestSettings().listen_backlog == DEFAULT_LISTEN_BACKLOG > 100
    assert IngestSettings(listen_backlog=300).listen_backlog == 300
    with pytest.raises(ValueError, match="listen_backlog"):
        IngestSettings(listen_backlog=0)


def test_listen_overflows_is_read_from_the_tcpext_pair(tmp_path: Path) -> None:
    netstat = tmp_path / "netstat"
    netstat.write_text("TcpExt: SyncookiesSent ListenOverflows ListenDrops\n"
                       "TcpExt: 26 957 958\n"
                       "IpExt: InNoRoutes ListenOverflows\n"
                       "IpExt: 0 5\n")
    assert listen_overflows(netstat) == 957
    netstat.write_text("IpExt: InNoRoutes\nIpExt: 0\n")
    assert listen_overflows(netstat) is None
    assert listen_overflows(tmp_path / "absent") is None
