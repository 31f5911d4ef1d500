"""Tensor values: snapshotted without a device sync on the publishing thread, resolved
to Python numbers on the bus thread, immune to later in-place changes."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch

from eventbus import EventBus, Evaluate, Log, Predict, StepEnd
from eventbus import values as V
from eventbus.bus import resolve_event
from tests.eventbus.test_bus import Recorder


@pytest.mark.parametrize(
    "tensor, expected, kind",
    [
        (torch.tensor(1.5), 1.5, float),  # 0-d
        (torch.tensor([2.5]), 2.5, float),  # one element: a number, not a list
        (torch.tensor([[3.0]]), 3.0, float),
        (torch.tensor([1.0, 2.0, 3.0]), [1.0, 2.0, 3.0], list),
        (torch.tensor([[1, 2], [3, 4]]), [[1, 2], [3, 4]], list),
        (torch.tensor(7, dtype=torch.int64), 7, int),
        (torch.tensor(3, dtype=torch.int32), 3, int),
        (torch.tensor(True), True, bool),
        (torch.tensor([False]), False, bool),
        (torch.tensor(0.25, dtype=torch.bfloat16), 0.25, float),
        (torch.tensor(2.0, requires_grad=True) * 2, 4.0, float),
    ],
)
def test_snapshot_then_resolve(tensor: torch.Tensor, expected: Any, kind: type) -> None:
    snap = V.snapshot(tensor)
    # A small CPU tensor is read at once (tolist keeps the GIL; clone would not).
    assert not isinstance(snap, (V.Deferred, torch.Tensor))
    out = V.resolve(snap)
    assert out == expected and type(out) is kind
    assert V.resolve(tensor) == expected  # a live tensor resolves the same way
    handed = V.handoff(tensor)  # the trainer's fresh tensors: resolved on the bus thread
    if tensor.requires_grad:  # read at once rather than keep its graph alive
        assert handed == expected
    else:
        assert isinstance(handed, V.Deferred) and handed.tensor is tensor
    assert V.resolve(handed) == expected and type(V.resolve(handed)) is kind


def test_a_large_cpu_tensor_is_copied_not_read_on_the_publishing_thread() -> None:
    big = torch.arange(V.SMALL_CPU_TENSOR + 1, dtype=torch.float32)
    snap = V.snapshot(big)
    assert isinstance(snap, V.Deferred) and snap.tensor is not big
    big.zero_()
    assert V.resolve(snap) == [float(i) for i in range(V.SMALL_CPU_TENSOR + 1)]


def test_snapshot_and_resolve_keep_the_gil_for_cpu_scalars() -> None:
    """clone(), detach(), item() release the GIL, which costs up to the switch
    interval (5 ms) while another thread runs Python: a busy thread advances while
    the call waits. The CPU paths use none of them, so a spinning thread makes no
    progress during thousands of snapshots and resolutions."""
    stop = threading.Event()
    progress = [0]
    ready = threading.Event()

    def spin() -> None:
        ready.set()
        while not stop.is_set():
            progress[0] += 1

    loss = torch.tensor(0.5, requires_grad=True) * 2
    fresh = loss.detach()
    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()
    ready.wait()
    try:
        before = progress[0]
        for _ in range(2000):
            V.resolve(V.snapshot(loss))
            V.resolve(V.handoff(fresh))
        during = progress[0] - before
    finally:
        stop.set()
        spinner.join()
    # item() in the loop instead lets the spinner run millions of times (one switch
    # interval per call); the loop above may lose the GIL only at its own switch
    # checks, a few times.
    assert during < 2_000_000, during


def test_non_tensors_pass_through() -> None:
    for v in (1, 2.5, "x", None, True, [1, 2]):
        assert V.snapshot(v) is v and V.resolve(v) is v
    assert V.resolve_mapping({"a": 1, "b": "x"}) is None
    assert not V.has_tensor({"a": 1.0}) and V.has_tensor({"a": torch.zeros(())})
    assert V.is_tensor(torch.zeros(1)) and not V.is_tensor(0.0)
    assert V.is_finite_number(3) and V.is_finite_number(1.5)
    assert not V.is_finite_number(True) and not V.is_finite_number(float("nan")) and not V.is_finite_number("1")


def test_snapshot_is_immune_to_later_in_place_changes() -> None:
    t = torch.tensor(1.0)
    vec = torch.tensor([1.0, 2.0])
    given = {"loss": t, "vec": vec, "lr": 0.1}
    ev = Log(step=1, values=given)
    t.add_(100.0)
    vec.zero_()
    assert given["loss"] is t  # the caller's dict is not rewritten
    assert (V.resolve_mapping(ev.values) or ev.values) == {"loss": 1.0, "vec": [1.0, 2.0], "lr": 0.1}


def test_bus_resolves_tensors_published_then_modified_in_place() -> None:
    rec = Recorder(max_delay=0.0)
    loss = torch.tensor(0.5)
    acc = torch.tensor([0.9])
    with EventBus([rec], flush_interval=0.01) as bus:
        for step in range(5):
            bus.publish(Log(step=step, values={"loss": loss, "step_t": torch.tensor(step)}))
            loss.add_(1.0)  # the loop keeps training: in place
        bus.publish(Evaluate(step=5, metrics={"eval_acc": acc, "eval_n": torch.tensor(10)}))
        bus.publish(Predict(step=5, metrics={"test_loss": torch.tensor(0.125)}))
        acc.fill_(0.0)
    logs = [e for e in rec.got if isinstance(e, Log)]
    assert [e.values["loss"] for e in logs] == [0.5, 1.5, 2.5, 3.5, 4.5]
    assert [e.values["step_t"] for e in logs] == list(range(5))
    assert all(type(e.values["step_t"]) is int for e in logs)
    ev = next(e for e in rec.got if isinstance(e, Evaluate))
    assert ev.metrics == {"eval_acc": pytest.approx(0.9), "eval_n": 10}
    pred = next(e for e in rec.got if isinstance(e, Predict))
    assert pred.metrics == {"test_loss": 0.125}


def test_publishing_never_synchronises_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """The conversions that would sync a GPU may only run on the bus thread."""
    publisher = threading.current_thread()
    calls: list[str] = []

    def guard(name: str) -> Any:
        original = getattr(torch.Tensor, name)

        def wrapper(self: torch.Tensor, *a: Any, **k: Any) -> Any:
            if threading.current_thread() is publisher:
                calls.append(name)
            return original(self, *a, **k)

        return wrapper

    for name in ("item", "cpu", "tolist", "__float__", "__bool__", "__int__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, guard(name))
    rec = Recorder(max_delay=0.0)
    bus = EventBus([rec], flush_interval=0.01).start()
    # A tensor on a device (meta: the device this CPU machine has): no conversion,
    # nothing that would wait for the device, on the publishing thread.
    on_device = torch.empty((), device="meta")
    bus.publish(Log(step=1, values={"loss": on_device, "v": torch.empty(2, device="meta")}))
    assert calls == []
    # CPU tensors involve no device: small ones are read with tolist() (it keeps the
    # GIL), and nothing else.
    t = torch.tensor(2.0)
    bus.publish(Log(step=2, values={"loss": t, "v": torch.tensor([1.0, 2.0])}))
    bus.publish(Evaluate(step=2, metrics={"eval_loss": t * 2}))
    assert set(calls) <= {"tolist"}
    bus.close(timeout=5)
    monkeypatch.undo()
    assert rec.got[1].values == {"loss": 2.0, "v": [1.0, 2.0]}
    assert rec.got[2].metrics == {"eval_loss": 4.0}


def test_an_unresolvable_value_becomes_nan_and_the_event_still_arrives(monkeypatch: pytest.MonkeyPatch) -> None:
    class Broken(V.Deferred):
        def resolve(self) -> Any:
            raise RuntimeError("device lost")

    rec = Recorder(max_delay=0.0)
    with EventBus([rec], flush_interval=0.01) as bus:
        ev = Log(step=1, values={"ok": torch.tensor(1.0)})
        values = dict(ev.values)
        values["bad"] = Broken(torch.tensor(0.0))
        import msgspec

        msgspec.structs.force_setattr(ev, "values", values)
        bus.publish(ev)
    got = rec.got[0].values
    assert got["ok"] == 1.0 and got["bad"] != got["bad"]  # NaN


def test_deferred_waits_for_its_copy_before_reading() -> None:
    """The CUDA path records an event after a non-blocking copy: resolve() must wait on
    it (on the bus thread) before reading the host buffer."""
    order: list[str] = []
    host = torch.tensor(3.0)

    class FakeCudaEvent:
        def synchronize(self) -> None:
            order.append("synchronize")
            host.fill_(4.0)  # the copy "lands" only now

    d = V.Deferred(host, FakeCudaEvent())
    assert V.resolve(d) == 4.0 and order == ["synchronize"]
    assert "Deferred(Tensor()" in repr(d)


def test_handoff_keeps_a_fresh_cpu_tensor_without_a_copy_and_resolves_it():
    import torch

    from eventbus.values import Deferred, handoff, resolve

    t = torch.tensor(0.75)
    d = handoff(t)
    assert isinstance(d, Deferred) and d.tensor is t  # no torch call, no copy
    assert resolve(d) == 0.75
    g = torch.tensor(2.0, requires_grad=True)
    assert handoff(g) == 2.0  # read at once: the graph is not kept alive
    assert handoff(1.5) == 1.5


def test_an_event_keeps_a_snapshot_mapping_as_is_and_encodes_it_as_a_dict() -> None:
    from eventbus.events import decode_json, encode_json

    captured = V.Snapshot(loss=V.handoff(torch.tensor(0.5)), lr=0.1)
    ev = Log(step=3, values=captured)
    assert ev.values is captured  # not scanned or copied again
    plain = Log(step=3, values={"loss": torch.tensor(0.5)})
    assert plain.values["loss"] == 0.5  # a plain dict is snapshotted as before
    resolved = V.resolve_mapping(ev.values)
    # Resolved values are a Snapshot too: the resolved event keeps them without a scan.
    assert resolved == {"loss": 0.5, "lr": 0.1} and type(resolved) is V.Snapshot
    assert resolve_event(ev).values is not ev.values and type(resolve_event(ev).values) is V.Snapshot
    assert V.resolve_mapping({"lr": 0.1, "n": 3, "name": "x"}) is None  # nothing to resolve: no copy
    mixed = {
        "scalar": torch.tensor(2.5),
        "one": torch.tensor([[1.5]]),
        "vector": torch.tensor([1.0, 2.0]),
        "param": torch.nn.Parameter(torch.tensor(4.0)),
        "deferred": V.Deferred(torch.tensor(3.0)),
        "n": 3,
    }
    assert V.resolve_mapping(mixed) == {"scalar": 2.5, "one": 1.5, "vector": [1.0, 2.0], "param": 4.0, "deferred": 3.0, "n": 3}
    back = decode_json(encode_json(Log(step=3, values=V.Snapshot(a=1.5))))
    # encoded as a plain object; decoded, the event keeps its own copy (a Snapshot)
    assert b'"values":{"a":1.5}' in encode_json(Log(step=3, values=V.Snapshot(a=1.5)))
    assert back.values == {"a": 1.5} and isinstance(back.values, dict)


def test_publish_log_builds_the_log_on_the_bus_thread_with_its_values_read() -> None:
    """publish_log hands the bus a Snapshot; the sinks get the same Log that
    publish(Log(...)) would give (header, time of the call, tensors read as numbers),
    in order with the events around it, and the stats count it as published."""
    rec = Recorder(max_delay=0.0)
    with EventBus([rec], flush_interval=0.01) as bus:
        loss = torch.tensor(0.25)
        bus.publish(StepEnd(step=1))
        before = time.time_ns()
        bus.publish_log("run-a", 0, 1, 0.5, V.Snapshot(loss=loss, grad_norm=torch.tensor([2.0]), learning_rate=1e-3))
        after = time.time_ns()
        bus.publish(StepEnd(step=2))
    assert [type(e) for e in rec.got] == [StepEnd, Log, StepEnd]
    log = rec.got[1]
    assert (log.run_id, log.rank, log.step, log.epoch) == ("run-a", 0, 1, 0.5)
    assert before <= log.time_ns <= after
    assert log.values == {"loss": 0.25, "grad_norm": 2.0, "learning_rate": 1e-3}
    assert type(log.values["loss"]) is float
    stats = bus.stats()
    assert stats.published == 3 and stats.sinks["rec"].delivered == 3


def test_publish_log_of_an_unresolvable_value_gives_nan_and_the_log_still_arrives() -> None:
    class Broken(V.Deferred):
        def resolve(self) -> Any:
            raise RuntimeError("device lost")

    rec = Recorder(max_delay=0.0)
    with EventBus([rec], flush_interval=0.01) as bus:
        bus.publish_log("r", 0, 3, None, V.Snapshot(ok=torch.tensor(1.0), bad=Broken(torch.tensor(0.0))))
    got = rec.got[0]
    assert isinstance(got, Log) and got.step == 3
    assert got.values["ok"] == 1.0 and got.values["bad"] != got.values["bad"]  # NaN


def test_publish_log_of_an_urgent_log_is_flushed_at_once() -> None:
    """Where Log is urgent, publish_log wakes the pump as publish(Log(...)) would: the
    pump's flush interval and the sink's max_delay are far away."""
    from tests.eventbus.test_bus import wait_for

    rec = Recorder(max_batch_size=1000, max_delay=60.0)
    with EventBus([rec], flush_interval=60.0, urgent=(Log,)) as bus:
        bus.publish_log("r", 0, 1, None, V.Snapshot(loss=1.0))
        wait_for(lambda: rec.steps == [1], what="urgent Log")
        assert rec.got[0].values == {"loss": 1.0}


def test_a_float_or_int_subclass_in_an_event_s_values_is_its_plain_number() -> None:
    # A metric class deriving from float (a library's own Score type): a number for
    # every sink, in-process and in an isolated child (whose encoder would otherwise
    # write its text), as a numpy scalar is.
    class Score(float):
        pass

    class Count(int):
        pass

    assert V.resolve_mapping({"acc": Score(0.5), "n": Count(3)}) == {"acc": 0.5, "n": 3}
    assert type(V.plain_array(Score(0.5))) is float and type(V.plain_array(Count(3))) is int
    import msgspec

    from eventbus.events import encode_lenient, lenient

    assert msgspec.json.decode(msgspec.json.encode({"acc": Score(0.5)}, enc_hook=lenient)) == {"acc": 0.5}
    sent = msgspec.msgpack.decode(encode_lenient(Log(step=1, values={"acc": Score(0.5)})))
    assert sent["values"] == {"acc": 0.5}
