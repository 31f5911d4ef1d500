"""The spool is bounded: at most ``Sink.spool_max_bytes`` on disk, and no new file
while less than ``Sink.spool_min_free_fraction`` of its disk is free. Past a limit
undeliverable events are counted failed and dropped (one ERROR saying why), what
the spool holds is kept and delivered once the sink is back."""

from __future__ import annotations

import logging
import os
import time
from collections import namedtuple
from typing import Sequence

import pytest

import eventbus.spool as spool_module
from eventbus import EventBus, Log, RunInfo, Sink, TransientSinkError
from eventbus.events import BaseEvent
from eventbus.spool import Spool, SpoolError, SpoolFullError, read_spool

from tests.conftest import wait_for




def logs(start: int, n: int) -> list[Log]:
    return [Log(step=i, values={"loss": float(i), "pad": "x" * 200}) for i in range(start, start + n)]


def _spool_bytes(directory) -> int:
    return sum(os.path.getsize(os.path.join(directory, n)) for n in os.listdir(directory) if n.endswith(".spool"))


def test_appends_past_the_cap_raise_and_hold_nothing_while_what_is_held_stays(tmp_path, caplog):
    sp = Spool(tmp_path, max_file_bytes=4096, max_bytes=16 * 1024, min_free_fraction=0)
    kept = 0
    with caplog.at_level(logging.WARNING, logger="eventbus"):
        with pytest.raises(SpoolFullError, match=r"its cap \(spool_max_bytes=16384\).*raise Sink.spool_max_bytes"):
            for start in range(1, 10_000, 5):
                sp.append(logs(start, 5))
                kept += 5
    assert "over half its cap" in caplog.text and caplog.text.count("over half its cap") == 1
    assert 0 < kept < 10_000 and sp.pending == kept
    assert _spool_bytes(tmp_path) <= 16 * 1024 and sp.bytes == _spool_bytes(tmp_path)
    # Everything appended before the cap is there, in order.
    assert [e.step for e in read_spool(tmp_path)] == list(range(1, kept + 1))
    # Once delivered (consumed), there is room again.
    batch = sp.read(kept)
    sp.consume(batch)
    assert sp.bytes < 16 * 1024
    sp.append(logs(kept + 1, 5))
    sp.close()


def test_no_new_spool_file_when_the_disk_is_nearly_full(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(spool_module, "_disk_usage", lambda path: usage(100 * 2**30, 97 * 2**30, 3 * 2**30))
    sp = Spool(tmp_path, max_bytes=None)
    with pytest.raises(SpoolFullError, match=r"3.00 GiB free of 100.00 GiB, less than 5% \(Sink.spool_min_free_fraction\)"):
        sp.append(logs(1, 1))
    assert sp.pending == 0 and not [n for n in os.listdir(tmp_path) if n.endswith(".spool")]
    # With room (or no floor), it spools.
    monkeypatch.setattr(spool_module, "_disk_usage", lambda path: usage(100 * 2**30, 50 * 2**30, 50 * 2**30))
    sp.append(logs(1, 1))
    assert sp.pending == 1
    sp.close()


def test_bad_limits_are_clear_errors(tmp_path):
    with pytest.raises(SpoolError, match="spool max_bytes must be an int >= 1024, or None"):
        Spool(tmp_path, max_bytes=10)
    with pytest.raises(SpoolError, match=r"min_free_fraction must be a fraction in \[0, 1\)"):
        Spool(tmp_path, min_free_fraction=1.5)


class Down(Sink):
    """Down until ``up`` is set; records what it got."""

    name = "down"
    events = (Log,)
    spool = True
    spool_max_bytes = 24 * 1024
    spool_max_file_bytes = 4096
    spool_min_free_fraction = 0.0
    max_retries = 0
    circuit_threshold = 1
    circuit_cooldown = 0.05
    max_delay = 0.01

    def __init__(self) -> None:
        self.up = False
        self.got: list[int] = []

    async def write(self, batch: Sequence[BaseEvent]) -> None:
        if not self.up:
            raise TransientSinkError("down")
        self.got.extend(e.step for e in batch)


def test_a_long_outage_fills_the_spool_to_its_cap_then_counts_drops_and_delivers_what_it_kept(tmp_path, caplog):
    sink = Down()
    bus = EventBus([sink], run=RunInfo(run_id="cap", output_dir=str(tmp_path)), flush_interval=0.01).start()
    spool_dir = tmp_path / "spool" / "down"
    with caplog.at_level(logging.ERROR, logger="eventbus"):
        for ev in logs(1, 600):
            bus.publish(ev)
            if ev.step % 50 == 0:
                time.sleep(0.05)  # the ingress keeps up: nothing dropped before the sink
        wait_for(lambda: (lambda s: s.received == 600 and s.queue_depth == 0)(bus.stats().sinks["down"]))
    st = bus.stats().sinks["down"]
    assert 0 < st.spooled < 600 and st.failed == st.dropped == 600 - st.spooled
    assert _spool_bytes(spool_dir) <= Down.spool_max_bytes
    assert caplog.text.count("cannot write the spool of sink 'down'") == 1
    assert "its cap (spool_max_bytes=24576)" in caplog.text
    kept = st.spooled
    sink.up = True
    wait_for(lambda: len(sink.got) == kept)
    bus.close(10)
    # The oldest events were kept, in order (the ones past the cap were refused).
    assert sink.got == list(range(1, kept + 1))


def test_what_was_delivered_does_not_count_against_the_cap(tmp_path, caplog):
    # Files rotate at 16 MiB (the default), far above this cap: the delivered part of
    # the file still being written stays on disk, but the next outage has the whole
    # cap again.
    sp = Spool(tmp_path, max_bytes=64 * 1024, min_free_fraction=0)
    held = []
    for outage in range(2):
        n = 0
        with pytest.raises(SpoolFullError):
            while True:
                sp.append(logs(1 + n, 1))
                n += 1
        held.append(n)
        sp.consume(sp.read(n))
        assert sp.pending == 0 and sp.bytes == 8  # the header alone
    assert held[1] == held[0] > 100
    with caplog.at_level(logging.WARNING, logger="eventbus"):
        Spool(tmp_path / "b", max_bytes=4096, min_free_fraction=0).append(logs(1, 10))
    assert "over half its cap of 4.0 KiB" in caplog.text
    sp.close()
