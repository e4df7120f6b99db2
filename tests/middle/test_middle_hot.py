"""The middle's C encoding (``_hot.c``) against ``iotpipe.wire``'s Python, byte for byte.

The C module is what every group runs; ``hot``'s Python twins are the fallback for installs
without a compiler. Same bytes, same readings left out, same errors.
"""

from __future__ import annotations

from types import ModuleType

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.cmodules import c_module

from iotpipe import wire
from iotpipe.middle import hot
from iotpipe.queue.framing import PayloadRun, encode_records

pytestmark = pytest.mark.unit


def _c_module() -> ModuleType:
    return c_module("iotpipe.middle._hot")


def test_c_module_is_built_and_used() -> None:
    c = _c_module()
    assert hot.BUILT
    assert hot._log_run is c.log_run and hot.live_frames is c.live_frames
    assert hot._record_readings is c.record_readings and hot.pack_runs is c.pack_runs
    assert hot.pack_bins is c.pack_bins and hot.total_bytes is c.total_bytes
    assert hot.decode_batch is hot._decode_batch_c


# Sizes around every msgpack header boundary: fixstr/str8/str16, bin8/bin16/bin32,
# fixint/uint8/uint16/uint32/uint64.
NAMES = st.one_of(st.text(max_size=40), st.sampled_from(["", "n" * 31, "n" * 32, "é" * 200,
                                                         "x" * 255, "x" * 256, "x" * 70_000]))
SEQS = st.one_of(st.integers(1, 2**64 - 600),
                 st.sampled_from([1, 127, 128, 255, 256, 65_535, 65_536, 2**32 - 1, 2**32,
                                  2**64 - 513]))
BLOBS = st.lists(st.one_of(st.binary(max_size=300),
                           st.sampled_from([b"", b"r" * 255, b"r" * 256, b"r" * 65_536])),
                 max_size=12)


@given(st.lists(st.tuples(NAMES, SEQS, BLOBS, st.booleans()), max_size=5))
def test_log_run_matches_wire(parts: list[tuple[str, int, list[bytes], bool]]) -> None:
    """A group's log records in one buffer: the very bytes wire encodes, one per reading,
    from readings given as lists or as runs over a batch body (as the middle decodes them),
    and the readings inside them found again without a copy."""
    c = _c_module()
    expected = [record for node, first, readings, _ in parts
                for record in wire.encode_log_records(node, first, readings)]
    given_parts = [(node, first, _as_run(readings) if as_run else readings)
                   for node, first, readings, as_run in parts]
    run = c.log_run(given_parts)
    assert isinstance(run, PayloadRun)
    assert list(run) == expected == hot._log_run_py(given_parts)
    assert run.nbytes == sum(map(len, expected)) and len(run) == len(expected)
    readings = [r for _, _, part, _ in parts for r in part]
    assert list(c.record_readings(run)) == readings == hot._record_readings_py(expected)
    assert encode_records(run, 5) == encode_records(expected, 5)


def _as_run(readings: list[bytes]) -> PayloadRun:
    """``readings`` as the C decoder gives them: spans over a v2 batch body."""
    body = msgpack.packb(readings, use_bin_type=True)
    bounds: list[int] = []
    at = 1 if len(readings) < 16 else 3 if len(readings) < 65_536 else 5
    for reading in readings:
        n = len(reading)
        at += 2 if n < 256 else 3 if n < 65_536 else 5
        bounds += [at, at + n]
        at += n
    run = PayloadRun(body, bounds)
    assert list(run) == readings
    return run


def test_a_group_too_large_for_a_run_is_made_a_list(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run's spans are 32-bit: a group of 4 GiB or more (the C raises OverflowError) is
    encoded as a list instead, and its readings are found in that list, so the middle
    stores it (or answers busy) rather than failing."""
    c = _c_module()

    def too_large(parts: list[hot.LogPart]) -> PayloadRun:
        raise OverflowError("a run's payloads must total under 4 GiB")

    monkeypatch.setattr(hot, "_log_run", too_large)
    readings = [b"r1", b"r22"]
    records = hot.log_run([("n", 9, _as_run(readings))])
    assert records == wire.encode_log_records("n", 9, readings)
    assert hot.record_readings(records) == readings
    assert list(hot.record_readings(c.log_run([("n", 9, readings)]))) == readings


def test_payload_runs_slice_and_index_like_lists() -> None:
    items = [b"a", b"", b"ccc", b"dd"]
    run = _as_run(items)
    assert len(run) == 4 and run[2] == b"ccc" and run[-1] == b"dd" and list(run) == items
    for start in range(-5, 6):
        for stop in range(-5, 6):
            assert list(run[start:stop]) == items[start:stop]
            assert run[start:stop].nbytes == sum(map(len, items[start:stop]))
            assert list(run[1:][start:stop]) == items[1:][start:stop]  # a slice of a slice
    assert run[::2] == items[::2] and run[::-1] == items[::-1]
    with pytest.raises(IndexError):
        run[4]
    with pytest.raises(ValueError, match="outside data"):
        PayloadRun(b"abc", [1, 4])
    with pytest.raises(ValueError, match="pairs"):
        PayloadRun(b"abc", [1])
    with pytest.raises(ValueError, match="is not a log record"):
        _c_module().record_readings(run)


def readings_strategy() -> st.SearchStrategy[list[bytes]]:
    real = st.builds(lambda d, n: wire.encode_reading(d, f"m{n}", n, b"{}", n),
                     NAMES, st.integers(0, 2**40))
    junk = st.one_of(st.binary(max_size=40), st.just(b"\x95"), st.just(b"\x95\xd9"),
                     st.just(b"\x95\xa5ab"), st.just(b"\x94\xa1a"))
    return st.lists(st.one_of(real, junk), max_size=12)


@given(st.text(max_size=40), SEQS, readings_strategy())
def test_live_frames_match_wire(middle_id: str, first: int, readings: list[bytes]) -> None:
    c = _c_module()
    prefix = wire.live_meta_prefix(middle_id)
    expected = hot._live_frames_py(prefix, first, readings)
    assert c.live_frames(prefix, first, readings) == expected
    assert c.live_frames(prefix, first, _as_run(readings)) == expected  # the v1 path's input
    # each event carries encode_live's meta for the seq of its reading's position
    publishable = [(seq, r) for seq, r in enumerate(readings, first)
                   if wire.reading_topic(r) is not None]
    assert len(expected) == len(publishable)
    for (topic, meta, reading), (seq, original) in zip(expected, publishable, strict=True):
        assert reading is original and topic == wire.reading_topic(reading)
        assert meta == wire.encode_live("d", middle_id, seq, reading)[1]


def test_errors_are_the_pythons_kinds() -> None:
    c = _c_module()
    with pytest.raises(TypeError):
        c.log_run([("n", 1, [b"a", "b"])])
    with pytest.raises(TypeError):
        c.log_run([("n", 1)])
    with pytest.raises(TypeError):
        c.live_frames(b"p", 1, [b"a", 3])
    with pytest.raises(OverflowError):
        c.log_run([("n", -1, [b"a"])])
    assert list(c.log_run([("n", 5, [])])) == [] and c.live_frames(b"p", 5, []) == []
    assert msgpack.unpackb(c.log_run([("nödé", 2**40, [b"\x00"])])[0]) == ["nödé", 2**40,
                                                                            b"\x00"]


# Array lengths around msgpack's fixarray/array16/array32 boundaries.
ITEM_LISTS = st.one_of(BLOBS, st.integers(0, 70_000).map(lambda n: [b"i" * (n % 7)] * n),
                       st.sampled_from([[b""] * 15, [b""] * 16, [b"a"] * 65_535,
                                        [b"a"] * 65_536]))


@given(ITEM_LISTS)
def test_pack_bins_and_total_bytes_match_msgpack(items: list[bytes]) -> None:
    c = _c_module()
    expected = msgpack.packb(items, use_bin_type=True)
    assert c.pack_bins(items) == expected == hot._pack_bins_py(items)
    assert c.total_bytes(items) == sum(map(len, items)) == hot._total_bytes_py(items)
    run = _as_run(items)
    assert c.pack_bins(run) == expected and c.total_bytes(run) == sum(map(len, items))
    # a delivery packed from parts (runs and lists) is the one array of all their items
    cut = len(items) // 3
    parts = [run[:cut], items[cut:2 * cut], run[2 * cut:]]
    assert c.pack_runs(parts) == expected == hot._pack_runs_py(parts)
    for budget in (0, 1, 255, 300, 10**9):
        assert c.count_within(run, budget) == c.count_within(items, budget) \
            == hot._count_within_py(items, budget)
    # what the middle sends with them decodes as the contract says
    group = wire.decode_live_group(wire.encode_live_group("m", 7, items, c.pack_bins)) \
        if items else None
    assert group is None or group.readings == items
    records = wire.decode_records(wire.encode_records_packed("g", "m", 3, len(items),
                                                             c.pack_bins(items)))
    assert records.records == items and records.first == 3


def test_pack_bins_refuses_what_is_not_a_list_of_bytes() -> None:
    c = _c_module()
    for bad in ([b"a", "b"], [b"a", bytearray(b"b")], [None]):
        with pytest.raises(TypeError, match="items must be bytes"):
            c.pack_bins(bad)
        with pytest.raises(TypeError, match="items must be bytes"):
            c.total_bytes(bad)
    with pytest.raises(TypeError, match="a list of bytes or a PayloadRun"):
        c.pack_bins((b"a",))
    with pytest.raises(TypeError, match="a list of bytes or a PayloadRun"):
        c.total_bytes(b"ab")


# -- decoding a v2 batch -------------------------------------------------------------------

BATCH_READINGS = st.lists(st.one_of(st.binary(max_size=300),
                                    st.sampled_from([b"", b"r" * 255, b"r" * 256,
                                                     b"r" * 65_536])),
                          min_size=1, max_size=20)


def _wire_result(frames: list[bytes]) -> wire.Batch | str:
    try:
        return wire.decode_batch(frames)
    except wire.WireError as exc:
        return f"WireError: {exc}"


def _plain(batch: wire.Batch) -> wire.Batch:
    """The batch with its readings as a list (the C decoder gives a run over the body)."""
    return wire.Batch(batch.node, batch.first, list(batch.readings))


def _hot_result(frames: list[bytes]) -> wire.Batch | str:
    try:
        return _plain(hot.decode_batch(frames))
    except wire.WireError as exc:
        return f"WireError: {exc}"


@given(NAMES, SEQS, BATCH_READINGS)
def test_decode_batch_v2_of_what_ingest_sends_matches_wire(node: str, first: int,
                                                           readings: list[bytes]) -> None:
    c = _c_module()
    frames = wire.encode_batch(node, first, readings)
    got_node, got_first, run = c.decode_batch_v2(frames[1], frames[2])
    assert (got_node, got_first, list(run)) == (node, first, readings)
    assert isinstance(run, PayloadRun) and run.nbytes == sum(map(len, readings))
    assert _plain(hot.decode_batch(frames)) == wire.decode_batch(frames)


@st.composite
def damaged_batches(draw: st.DrawFn) -> list[bytes]:
    """v2 batches changed where a decoder could go wrong: each header field, the count,
    a length, a flipped byte, a cut or an extra byte, other msgpack shapes."""
    node = draw(st.one_of(NAMES, st.integers(-(2**63), 2**64 - 1), st.binary(max_size=4),
                          st.none()))
    first = draw(st.one_of(SEQS, st.integers(-5, 5), st.booleans(), st.text(max_size=3)))
    readings = draw(st.lists(st.one_of(st.binary(max_size=40), st.text(max_size=5),
                                       st.integers(-9, 2**40)), max_size=6))
    header: dict[object, object] = {"node": node, "first": first, "n": draw(
        st.one_of(st.just(len(readings)), st.integers(-1, 8), st.booleans()))}
    if draw(st.booleans()):
        header[draw(st.sampled_from(["x", "node", 1]))] = draw(st.integers(0, 3))
    if draw(st.booleans()):
        del header[draw(st.sampled_from(["node", "first", "n"]))]
    head = msgpack.packb(draw(st.sampled_from([header, list(header.values()), 7])),
                         use_bin_type=True)
    body = msgpack.packb(readings, use_bin_type=True)
    frames = [wire.KIND_BATCH_V2, head, body]
    for _ in range(draw(st.integers(0, 2))):
        which = draw(st.integers(1, 2))
        data = bytearray(frames[which])
        action = draw(st.sampled_from(["flip", "cut", "extend"]))
        if action == "flip" and data:
            at = draw(st.integers(0, len(data) - 1))
            data[at] = draw(st.integers(0, 255))
        elif action == "cut" and data:
            del data[draw(st.integers(0, len(data) - 1)):]
        else:
            data += draw(st.binary(min_size=1, max_size=3))
        frames[which] = bytes(data)
    return frames


@given(damaged_batches())
def test_decode_batch_v2_decodes_like_wire_or_leaves_it_to_wire(frames: list[bytes]) -> None:
    c = _c_module()
    fast = c.decode_batch_v2(frames[1], frames[2])
    expected = _wire_result(frames)
    if fast is not None:  # whatever C decodes, wire decodes the same
        assert _plain(wire.Batch(*fast)) == expected
    assert _hot_result(frames) == expected


def test_decode_batch_falls_back_for_v1_and_other_kinds() -> None:
    readings = [b"a", b"bc"]
    v1 = wire.encode_batch_v1("n", 3, readings)
    assert hot.decode_batch(v1) == wire.decode_batch(v1) == wire.Batch("n", 3, readings)
    for frames in ([b"other", *wire.encode_batch("n", 3, readings)[1:]], [], [b"x"]):
        assert _hot_result(frames) == _wire_result(frames)
        assert isinstance(_hot_result(frames), str)


def test_decode_batch_v2_with_a_count_its_body_cannot_hold_makes_nothing() -> None:
    c = _c_module()
    header = msgpack.packb({"node": "n", "first": 1, "n": 2**32 - 1})
    body = b"\xdd\xff\xff\xff\xff" + b"\xc4\x00" * 3  # array32 claiming 4 billion bins
    assert c.decode_batch_v2(header, body) is None
    assert isinstance(_hot_result([wire.KIND_BATCH_V2, header, body]), str)
