"""The C record encoder (``_framing.c``) against its pure-Python twin and google-crc32c.

The C encoder is what every append runs; the Python one is the fallback for installs
without a compiler. They must produce the same bytes and raise the same errors.
"""

from __future__ import annotations

import array
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import google_crc32c
import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.cmodules import c_module

from iotpipe.queue import PersistentQueue, framing, writer
from iotpipe.queue.framing import encode_records_python

pytestmark = pytest.mark.unit

def _c_module() -> ModuleType:
    return c_module("iotpipe.queue._framing")


def test_c_encoder_is_built_and_used() -> None:
    module = _c_module()
    assert framing.encode_records is module.encode_records
    assert framing.ENCODER == "c"
    assert module.CRC32C_IMPLEMENTATION in ("sse4.2", "table")


def _bytes_like(data: bytes, kind: int) -> bytes | bytearray | memoryview:
    if kind == 1:
        return bytearray(data)
    if kind == 2:  # a slice of a larger buffer: unaligned, and not the whole object
        return memoryview(b"<" + data + b">")[1:-1]
    return data


@given(st.lists(st.tuples(st.binary(max_size=200), st.integers(0, 2)), max_size=40),
       st.integers(0, (1 << 64) - 50))
def test_c_and_python_encoders_write_the_same_bytes(
        items: list[tuple[bytes, int]], first_seq: int) -> None:
    payloads = [_bytes_like(data, kind) for data, kind in items]
    assert _c_module().encode_records(payloads, first_seq) == \
        encode_records_python(payloads, first_seq)
    assert _c_module().encode_records(tuple(payloads), first_seq) == \
        encode_records_python(payloads, first_seq)


@given(st.lists(st.binary(max_size=300), max_size=40), st.integers(0, 1 << 40))
def test_a_payload_run_encodes_as_the_list_of_its_payloads(payloads: list[bytes],
                                                           first_seq: int) -> None:
    """Spans of one buffer (with a byte between them, so no span starts aligned) frame to the
    very bytes their list does, CRCs included."""
    module = _c_module()
    data = b"".join(b"-" + payload for payload in payloads)
    bounds: list[int] = []
    at = 0
    for payload in payloads:
        bounds += [at + 1, at + 1 + len(payload)]
        at += 1 + len(payload)
    run = module.PayloadRun(data, bounds)
    expected = encode_records_python(payloads, first_seq)
    assert module.encode_records(run, first_seq) == expected
    assert encode_records_python(run, first_seq) == expected  # a Sequence to Python too
    assert module.encode_records(run[1:], first_seq) == encode_records_python(payloads[1:],
                                                                              first_seq)


@given(st.binary(max_size=600), st.integers(0, 7))
def test_crc32c_matches_google_crc32c_on_both_paths(data: bytes, skip: int) -> None:
    module = _c_module()
    view = memoryview(data)[skip:]  # every alignment of the start
    expected = google_crc32c.value(bytes(view))
    assert module.crc32c(view) == expected
    assert module.crc32c(view, table=True) == expected


def test_crc32c_known_answer() -> None:
    # RFC 3720 (iSCSI) B.4 test vectors for CRC32C.
    module = _c_module()
    for table in (False, True):
        assert module.crc32c(bytes(32), table=table) == 0x8A9136AA
        assert module.crc32c(b"\xff" * 32, table=table) == 0x62A8AB43
        assert module.crc32c(bytes(range(32)), table=table) == 0x46DD794E
        assert module.crc32c(b"123456789", table=table) == 0xE3069283


BAD_INPUTS: list[tuple[object, object, type[Exception], str]] = [
    (["text"], 1, TypeError, "got str"),
    ([b"ok", 7], 1, TypeError, "got int"),
    ([b"ok", None], 1, TypeError, "got NoneType"),
    ([memoryview(array.array("I", [1, 2]))], 1, TypeError, "1-byte items"),
    ([memoryview(bytes(6)).cast("B", (2, 3))], 1, TypeError, "1-byte items"),
    (42, 1, TypeError, "sequence of bytes, got int"),
    ([b"a"], -1, ValueError, "first_seq"),
    ([b"a"], 1 << 64, ValueError, "first_seq"),
    ([b"a"], "1", ValueError, "first_seq"),
    ([b"a", b"b"], (1 << 64) - 1, ValueError, "seqs would pass"),
]


@pytest.mark.parametrize(("payloads", "first_seq", "error", "message"), BAD_INPUTS)
@pytest.mark.parametrize("encoder", ["c", "python"])
def test_both_encoders_reject_bad_input_alike(payloads: object, first_seq: object,
                                              error: type[Exception], message: str,
                                              encoder: str) -> None:
    encode = _c_module().encode_records if encoder == "c" else encode_records_python
    with pytest.raises(error, match=message):
        encode(payloads, first_seq)  # type: ignore[arg-type]


def test_the_last_seq_may_be_the_largest() -> None:
    last = (1 << 64) - 1
    assert _c_module().encode_records([b"x"], last) == encode_records_python([b"x"], last)


def _append_read_reopen(path: Path, batches: Sequence[Sequence[bytes]]) -> list[bytes]:
    with PersistentQueue.open(path, capacity_bytes=1 << 20, segment_bytes=8192) as queue:
        for batch in batches:
            queue.append(batch)
    with PersistentQueue.open(path, capacity_bytes=1 << 20, segment_bytes=8192) as queue:
        return [record.payload for record in queue.read(1, max_records=10_000)]


def test_queue_written_by_either_encoder_reads_the_same(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # Enough records to roll over several 8 KiB segments (the split path encodes too).
    batches = [[f"r{b}-{i}".encode() * (1 + i % 30) for i in range(40)] for b in range(12)]
    expected = [payload for batch in batches for payload in batch]
    assert _append_read_reopen(tmp_path / "c", batches) == expected
    monkeypatch.setattr(writer, "encode_records", encode_records_python)
    assert _append_read_reopen(tmp_path / "python", batches) == expected
    # Same bytes on disk: segment files are identical record for record.
    c_files = sorted(p.name for p in (tmp_path / "c").glob("*.seg"))
    assert c_files == sorted(p.name for p in (tmp_path / "python").glob("*.seg"))
    for name in c_files:
        assert (tmp_path / "c" / name).read_bytes() == (tmp_path / "python" / name).read_bytes()
