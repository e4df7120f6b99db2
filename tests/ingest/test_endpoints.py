"""The endpoints file, without sockets: parsing, diffing, reload and keeping the last good
list when the file goes bad."""

from __future__ import annotations

from pathlib import Path

import pytest

from iotpipe.endpoints import (
    EndpointsCollector,
    EndpointsError,
    EndpointsFile,
    check_endpoint,
    diff_endpoints,
    parse_endpoints,
    resolve_endpoints,
)

pytestmark = pytest.mark.unit

A = "tcp://p-middle-0.p-middle.ns.svc:5555"
B = "tcp://p-middle-1.p-middle.ns.svc:5555"
C = "tcp://p-middle-2.p-middle.ns.svc:5555"


def test_parse_skips_blanks_and_comments_and_keeps_order_once() -> None:
    text = f"# router endpoints\n\n  {B}  \n{A} # the first pod\n{B}\nipc:///run/m.sock\n"
    assert parse_endpoints(text) == [B, A, "ipc:///run/m.sock"]


@pytest.mark.parametrize(("line", "problem"), [
    ("middle-0:5555", "not a ZeroMQ endpoint"),
    ("tcp://middle-0", "no valid HOST:PORT"),
    ("tcp://:5555", "no valid HOST:PORT"),
    ("tcp://middle-0:99999", "no valid HOST:PORT"),
    ("ipc://", "no path"),
])
def test_a_bad_line_is_named_with_its_number(line: str, problem: str) -> None:
    with pytest.raises(EndpointsError, match=f"router, line 2: .*{problem}"):
        parse_endpoints(f"{A}\n{line}\n", "router")
    assert check_endpoint(line) is not None
    assert check_endpoint("tcp://[::1]:5555") is None


def test_an_empty_list_is_refused() -> None:
    with pytest.raises(EndpointsError, match="no endpoint listed"):
        parse_endpoints("# nothing yet\n\n", "router")


def test_diff_names_what_to_connect_and_disconnect() -> None:
    diff = diff_endpoints([A, B], [B, C])
    assert (diff.added, diff.removed) == ((C,), (A,))
    assert diff
    assert not diff_endpoints([A, B], [B, A])


def test_file_reload_returns_a_list_only_when_it_changed(tmp_path: Path) -> None:
    path = tmp_path / "router"
    path.write_text(f"{A}\n")
    watched = EndpointsFile(path)
    assert watched.load() == [A]
    assert watched.check() is None                 # unchanged
    path.write_text(f"{A}\n# scaled up\n{B}\n")
    assert watched.check() == [A, B]
    assert watched.current == [A, B] and watched.reloads == 1
    path.write_text(f"{B}\n{A}\n")                  # same set, another order: a new list
    assert watched.check() == [B, A]
    path.write_text(f"# comment only\n{B}\n{A}\n")  # same list, other text: nothing to do
    assert watched.check() is None and watched.reloads == 2


def test_a_bad_empty_or_missing_file_keeps_the_last_good_list(tmp_path: Path) -> None:
    path = tmp_path / "router"
    path.write_text(f"{A}\n{B}\n")
    watched = EndpointsFile(path)
    watched.load()
    collector = EndpointsCollector({"router": watched})
    for bad in ("", "not-an-endpoint\n"):
        path.write_text(bad)
        assert watched.check() is None and watched.check() is None
        assert watched.current == [A, B] and watched.failing
    path.unlink()
    assert watched.check() is None and watched.current == [A, B]
    # Each distinct problem counts once, however often it is seen again.
    assert watched.errors == 3
    samples = {s.name: s.value for m in collector.collect() for s in m.samples}
    assert samples["iotpipe_endpoints"] == 2
    assert samples["iotpipe_endpoints_file_failing"] == 1
    assert samples["iotpipe_endpoints_file_errors_total"] == 3
    path.write_text(f"{C}\n")
    assert watched.check() == [C]
    assert not watched.failing


def test_resolve_prefers_a_usable_file_and_falls_back_to_the_static_list(
        tmp_path: Path) -> None:
    path = tmp_path / "router"
    path.write_text(f"{B}\n")
    assert resolve_endpoints("--e", [A], "--f", str(path))[0] == [B]
    assert resolve_endpoints("--e", [A], "--f", "")[0] == [A]
    path.write_text("")
    endpoints, watched = resolve_endpoints("--e", [A], "--f", str(path))
    assert endpoints == [A] and watched is not None and watched.failing
    with pytest.raises(EndpointsError, match=r"--f: .*no endpoint listed"):
        resolve_endpoints("--e", [], "--f", str(path))
    with pytest.raises(EndpointsError, match="--e or --f is required"):
        resolve_endpoints("--e", [], "--f", "")
    with pytest.raises(EndpointsError, match="--e: 'x:1' is not a ZeroMQ endpoint"):
        resolve_endpoints("--e", ["x:1"], "--f", "")
