"""The disk spool on its own: format, order, rotation, fsync, permissions, corruption."""

from __future__ import annotations

import json
import logging
import os
import stat
import struct

import pytest

from eventbus.errors import SpoolError
from eventbus.events import Evaluate, Log, StepEnd, encode_msgpack
from eventbus.sink import RunInfo, Sink
from eventbus.spool import FORMAT_VERSION, MAGIC, RECORD_MARK, STATE_FILE, Spool, read_spool

HEADER = len(MAGIC) + 1
FRAME = 12


def logs(n: int, start: int = 0) -> list[Log]:
    return [Log(run_id="r", step=i, values={"loss": float(i)}) for i in range(start, start + n)]


def files(d) -> list[str]:
    return sorted(n for n in os.listdir(d) if n.endswith(".spool"))


def record_offsets(path) -> list[int]:
    """Byte offset of each record in a spool file (parsed independently of the reader)."""
    data = path.read_bytes()
    offs, pos = [], HEADER
    while pos < len(data):
        offs.append(pos)
        (length,) = struct.unpack_from("<I", data, pos + 4)
        pos += FRAME + length
    return offs


def test_round_trip_in_order_with_header_and_checksummed_frames(tmp_path):
    sp = Spool(tmp_path / "s")
    events = logs(5) + [StepEnd(step=5), Evaluate(step=5, metrics={"eval_loss": 0.5})]
    sp.append(events)
    assert sp.pending == 7
    batch = sp.read(100)
    assert batch.events == events and batch.corrupt == 0
    (name,) = files(tmp_path / "s")
    data = (tmp_path / "s" / name).read_bytes()
    assert data[: len(MAGIC)] == MAGIC and data[len(MAGIC)] == FORMAT_VERSION
    assert data[HEADER : HEADER + 4] == RECORD_MARK
    assert struct.unpack_from("<I", data, HEADER + 4)[0] == len(encode_msgpack(events[0]))
    assert sp.consume(batch) == 0
    assert sp.pending == 0
    sp.close()


def test_read_does_not_consume_and_consume_advances(tmp_path):
    sp = Spool(tmp_path)
    sp.append(logs(10))
    first = sp.read(4)
    assert [e.step for e in first.events] == [0, 1, 2, 3]
    assert [e.step for e in sp.read(4).events] == [0, 1, 2, 3]  # not consumed yet
    sp.consume(first)
    assert sp.pending == 6
    assert [e.step for e in sp.read(100).events] == [4, 5, 6, 7, 8, 9]
    sp.close()


def test_a_closed_spool_is_neither_read_nor_consumed(tmp_path):
    # What a closed spool holds is left for a replay or the next run, not for a
    # thread that outlived the close (see EventBus.close).
    sp = Spool(tmp_path)
    sp.append(logs(3))
    batch = sp.read(2)
    sp.close()
    with pytest.raises(SpoolError, match="is closed"):
        sp.read(10)
    with pytest.raises(SpoolError, match="is closed"):
        sp.consume(batch)
    assert sp.pending == 3 and Spool(tmp_path).pending == 3


def test_directory_and_files_are_owner_only(tmp_path):
    root = tmp_path / "out"
    sp = Spool(root / "spool" / "sinkname")
    sp.append(logs(1))
    sp.close()
    for d in (root, root / "spool", root / "spool" / "sinkname"):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700, d
    for name in os.listdir(root / "spool" / "sinkname"):
        assert stat.S_IMODE(os.stat(root / "spool" / "sinkname" / name).st_mode) == 0o600, name


def test_files_rotate_by_size_and_read_back_across_them_in_order(tmp_path):
    sp = Spool(tmp_path, max_file_bytes=1024)
    for i in range(40):
        sp.append(logs(1, start=i))
    names = files(tmp_path)
    assert len(names) > 3
    for n in names[:-1]:
        # A file rotates once it reaches the size: at most one batch past it.
        assert os.path.getsize(tmp_path / n) < 1024 + 200
    assert [e.step for e in sp.read(1000).events] == list(range(40))
    # Consuming part of the way deletes the files read to the end, keeps the rest.
    b = sp.read(30)
    sp.consume(b)
    left = files(tmp_path)
    assert len(left) < len(names)
    assert [e.step for e in sp.read(1000).events] == list(range(30, 40))
    sp.close()


def test_fsync_on_interval_and_at_close(tmp_path, monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    every = Spool(tmp_path / "every", fsync_interval=0)
    for i in range(5):
        every.append(logs(1, start=i))
    assert len(calls) == 5
    every.close()

    calls.clear()
    lazy = Spool(tmp_path / "lazy", fsync_interval=3600)
    for i in range(5):
        lazy.append(logs(1, start=i))
    assert calls == []  # within the interval: written to the OS, not yet synced
    lazy.close()
    assert len(calls) >= 1  # the file at close (and the state file)


def test_torn_final_record_is_skipped_with_one_warning(tmp_path, caplog):
    sp = Spool(tmp_path, fsync_interval=0)
    sp.append(logs(10))
    sp.close()
    (name,) = files(tmp_path)
    path = tmp_path / name
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 5)  # a write cut short by a crash
    with caplog.at_level(logging.WARNING, logger="eventbus"):
        got = list(read_spool(path))
    assert [e.step for e in got] == list(range(9))
    torn = [r for r in caplog.records if "torn" in r.getMessage()]
    assert len(torn) == 1, caplog.text


def test_corrupt_record_in_the_middle_is_skipped_and_reading_resyncs(tmp_path, caplog):
    sp = Spool(tmp_path)
    sp.append(logs(10))
    (name,) = files(tmp_path)
    path = tmp_path / name
    offs = record_offsets(path)
    data = bytearray(path.read_bytes())
    data[offs[4] + FRAME + 3] ^= 0xFF  # one payload byte of record 4: checksum fails
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="eventbus"):
        batch = sp.read(100)
    assert [e.step for e in batch.events] == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    assert batch.corrupt == 1
    assert any("corrupt" in r.getMessage() for r in caplog.records)
    # The spool counted 10; reaching the end it knows one was unreadable.
    assert sp.consume(batch) == 1
    assert sp.pending == 0
    sp.close()


def test_bad_length_in_the_middle_resyncs_to_the_next_record(tmp_path):
    sp = Spool(tmp_path)
    sp.append(logs(6))
    sp.close()
    (name,) = files(tmp_path)
    path = tmp_path / name
    offs = record_offsets(path)
    data = bytearray(path.read_bytes())
    struct.pack_into("<I", data, offs[2] + 4, 0x7FFFFFFF)  # absurd length
    path.write_bytes(bytes(data))
    assert [e.step for e in read_spool(path)] == [0, 1, 3, 4, 5]


def test_garbage_between_records_is_skipped(tmp_path):
    sp = Spool(tmp_path)
    sp.append(logs(3))
    sp.close()
    (name,) = files(tmp_path)
    path = tmp_path / name
    offs = record_offsets(path)
    data = path.read_bytes()
    # Garbage that even contains the record marker, inserted before record 1.
    garbage = b"\x00junk" + RECORD_MARK + b"\xff\xff\x00\x00zz"
    path.write_bytes(data[: offs[1]] + garbage + data[offs[1] :])
    assert [e.step for e in read_spool(path)] == [0, 1, 2]


def test_a_future_format_version_is_a_clear_error(tmp_path):
    path = tmp_path / "00000001.spool"
    path.write_bytes(MAGIC + bytes([FORMAT_VERSION + 1]))
    with pytest.raises(SpoolError, match="version 2.*reads version 1"):
        list(read_spool(path))
    other = tmp_path / "x.spool"
    other.write_bytes(b"not a spool at all")
    with pytest.raises(SpoolError, match="not an eventbus spool"):
        list(read_spool(other))


def test_reopen_finds_what_is_left_and_resumes_at_the_persisted_cursor(tmp_path):
    sp = Spool(tmp_path)
    sp.append(logs(10))
    sp.consume(sp.read(3))
    sp.close()
    state = json.loads((tmp_path / STATE_FILE).read_text())
    assert state["format"] == FORMAT_VERSION and state["cursor"]["offset"] > 0

    again = Spool(tmp_path)
    assert again.pending == 7
    assert [e.step for e in again.read(100).events] == list(range(3, 10))
    # read_spool of the directory also starts at the cursor; from_cursor=False does not.
    assert [e.step for e in read_spool(tmp_path)] == list(range(3, 10))
    assert [e.step for e in read_spool(tmp_path, from_cursor=False)] == list(range(10))
    again.append(logs(2, start=10))
    assert again.pending == 9
    again.close()


def test_fully_drained_spool_leaves_no_event_files(tmp_path):
    sp = Spool(tmp_path)
    sp.append(logs(5))
    sp.consume(sp.read(100))
    sp.close()
    assert files(tmp_path) == []
    assert Spool(tmp_path).pending == 0


def test_failed_append_leaves_no_partial_record(tmp_path):
    sp = Spool(tmp_path)
    sp.append(logs(2))
    calls = {"n": 0}
    real = sp._write

    def half_then_enospc(fd, data):
        calls["n"] += 1
        if calls["n"] == 1:
            return real(fd, data[:7])  # a short write, then the disk is full
        raise OSError(28, "No space left on device")

    sp._write = half_then_enospc  # type: ignore[method-assign]
    with pytest.raises(OSError):
        sp.append(logs(3, start=2))
    assert sp.pending == 2
    sp._write = real  # type: ignore[method-assign]
    sp.append(logs(1, start=5))
    assert [e.step for e in sp.read(100).events] == [0, 1, 5]
    sp.close()


def test_for_sink_picks_the_directory(tmp_path, monkeypatch):
    class S(Sink):
        name = "tb"

    monkeypatch.chdir(tmp_path)
    assert Spool.for_sink(S(), RunInfo(output_dir=str(tmp_path / "o"))).directory == tmp_path / "o" / "spool" / "tb"
    assert str(Spool.for_sink(S(), RunInfo(run_id="abc")).directory) == os.path.join("eventbus-spool", "abc", "tb")
    s = S()
    s.spool_dir = str(tmp_path / "custom")
    s.spool_max_file_bytes = 4096  # type: ignore[attr-defined]
    s.spool_fsync_interval = 0  # type: ignore[attr-defined]
    sp = Spool.for_sink(s, RunInfo(output_dir="ignored"))
    assert sp.directory == tmp_path / "custom" and sp.max_file_bytes == 4096 and sp.fsync_interval == 0
    assert not (tmp_path / "custom").exists()  # created on first use, not before
    # Ranks share the output_dir: each rank's spool is its own.
    r3 = Spool.for_sink(S(), RunInfo(output_dir=str(tmp_path / "o"), rank=3))
    assert r3.directory == tmp_path / "o" / "spool" / "tb-rank3"
    assert Spool.for_sink(s, RunInfo(rank=2)).directory == tmp_path / "custom" / "rank2"


@pytest.mark.parametrize(
    "kwargs, msg",
    [({"max_file_bytes": 10}, "max_file_bytes"), ({"fsync_interval": -1}, "fsync_interval"), ({"fsync_interval": "1"}, "fsync_interval")],
)
def test_bad_settings_are_clear_errors(tmp_path, kwargs, msg):
    with pytest.raises(SpoolError, match=msg):
        Spool(tmp_path, **kwargs)


def test_records_across_read_chunks_drain_in_batches_in_order(tmp_path):
    sp = Spool(tmp_path, max_file_bytes=64 * 1024 * 1024)
    n = 3000
    for i in range(0, n, 100):  # ~1 MB in one file: several 256 KiB read chunks
        sp.append([Log(step=j, values={"pad": "x" * 300, "i": j}) for j in range(i, i + 100)])
    assert len(files(tmp_path)) == 1
    got: list[int] = []
    while sp.pending:
        b = sp.read(128)
        got += [e.step for e in b.events]
        sp.consume(b)
    assert got == list(range(n))
    sp.close()


def test_a_value_msgpack_cannot_encode_is_kept_as_its_repr(tmp_path):
    from eventbus.events import TrainBegin

    class Opaque:
        def __repr__(self) -> str:
            return "<Opaque>"

    sp = Spool(tmp_path)
    sp.append([TrainBegin(config={"collate_fn": Opaque(), "lr": 0.1}), Log(step=1)])
    got = sp.read(10).events
    assert got[0].config == {"collate_fn": "<Opaque>", "lr": 0.1} and got[1].step == 1
    sp.close()


def test_disk_full_when_opening_a_file_leaves_no_empty_file(tmp_path):
    sp = Spool(tmp_path)

    def enospc(fd, data):
        raise OSError(28, "No space left on device")

    sp._write = enospc  # type: ignore[method-assign]
    for _ in range(3):
        with pytest.raises(OSError):
            sp.append(logs(1))
    assert files(tmp_path) == [] and sp.pending == 0
