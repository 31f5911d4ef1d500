"""Metric names and values a backend cannot take as they are: MLflow's and
TensorBoard's renaming (never two metrics in one series), a key the MLflow server
refuses (it costs that key, not the batch), ints too large for a float, and a
server's echoed credentials in errors. MLflow is a loopback server that answers as
MLflow does on cue (tests/_faultserver.py); the real server is in
tests/integration/test_mlflow_names.py. TensorBoard's files are read back with
tensorboard's own reader."""

from __future__ import annotations

import logging
from typing import Any, Sequence

import anyio
import pytest

from eventbus import EventBus, Log, RunInfo, TrainBegin, TrainEnd
from eventbus.errors import SinkError
from sinks.mlflow import MAX_ENTITY_KEY_LENGTH, MLflowSink, refused_name, sanitize_name
from sinks.tensorboard import TensorBoardSink
from tests._faultserver import FaultServer, no_mlflow_env, server  # noqa: F401 (fixtures)
from tests.sinks.test_tensorboard import accumulate, scalars, text

TOKEN = "tok-NAMES-SECRET-98765"
HUGE = 10**400


class RefusingServer(FaultServer):
    """Answers a log-batch holding one of ``refuse`` as MLflow's server does: 400
    INVALID_PARAMETER_VALUE, naming the entry (``metrics[1].name``, as its name check
    does) or, with ``indexed=False``, not (as its length check does). The message
    echoes the Authorization header, as the fault server's errors do."""

    def __init__(self, refuse: set[str], indexed: bool = True) -> None:
        super().__init__()
        self.refuse = refuse
        self.indexed = indexed
        self.refusals = 0

    def _mlflow(self, method: str, path: str, query: dict[str, list[str]], body: dict[str, Any]) -> tuple[int, Any]:
        if path.endswith("/runs/log-batch"):
            auth = self.requests[-1].authorization
            for kind, field in (("metrics", "name"), ("params", "key"), ("tags", "key")):
                for i, entry in enumerate(body.get(kind) or []):
                    if entry["key"] in self.refuse:
                        self.refusals += 1
                        message = (
                            f"Invalid value \"{entry['key']}\" for parameter '{kind}[{i}].{field}' supplied: "
                            f"Names may be treated as files in certain cases (you sent {auth})"
                            if self.indexed
                            else f"'Metric name' exceeds the maximum length of 250 characters (you sent {auth})"
                        )
                        return 400, {"error_code": "INVALID_PARAMETER_VALUE", "message": message}
        return super()._mlflow(method, path, query, body)


def direct(sink: MLflowSink, *batches: Sequence[Any]) -> None:
    """Open ``sink``, write each batch, close it: no bus, so each write is one batch."""

    async def go() -> None:
        await sink.open(RunInfo(run_name="names"))
        try:
            for batch in batches:
                await sink.write(batch)
        finally:
            await sink.close()

    anyio.run(go)


def stored(server: FaultServer) -> dict[str, list[tuple[int, Any]]]:
    """Metric key -> its (step, value) points, as the server stored them."""
    out: dict[str, list[tuple[int, Any]]] = {}
    for m in server.metrics("run1"):
        out.setdefault(m["key"], []).append((m["step"], m["value"]))
    return out


def warnings_of(caplog: pytest.LogCaptureFixture, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and r.levelno == logging.WARNING]


# -- names MLflow accepts --------------------------------------------------------------


@pytest.mark.parametrize(
    "name, expected",
    [
        ("..dots", "__dots"),  # normpath keeps it, MLflow refuses a leading ".."
        ("...", "___"),
        ("a" * 249 + "/b", "a" * 249),  # the cut at 250 left a trailing "/"
        ("a" * 248 + "/.x", "a" * 248),  # ... or a trailing "/."
        ("a" * 247 + "/../b", "a" * 247 + "/__"),  # ... or a trailing "/.."
        ("../up", "__/up"),
        ("a//b/./c/", "a/b/c"),
        ("/lead", "lead"),
        ("", "_"),
        ("k" * 300, "k" * 250),
        ("acc@1", "acc_1"),
        ("eval/accuracy", "eval/accuracy"),
    ],
)
def test_sanitize_name_gives_only_names_the_mlflow_server_accepts(name: str, expected: str) -> None:
    out = sanitize_name(name)
    assert out == expected
    assert not refused_name(out) and len(out) <= MAX_ENTITY_KEY_LENGTH
    assert sanitize_name(out) == out  # stable: a second pass changes nothing


# -- a key the server refuses -------------------------------------------------------------


@pytest.mark.parametrize("indexed", [True, False], ids=["server-names-the-entry", "server-does-not-say"])
def test_a_refused_key_costs_that_key_not_its_batch(indexed: bool, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    srv = RefusingServer({"bad"}, indexed=indexed)
    try:
        sink = MLflowSink(srv.url, experiment_name="names", token=TOKEN)
        first = [TrainBegin(step=0, config={"lr": 0.1})] + [Log(step=s, values={"loss": 1.0 / s, "bad": 0.1}) for s in (1, 2)]
        later = [Log(step=3, values={"loss": 1.0 / 3, "bad": 0.1}), TrainEnd(step=3)]
        direct(sink, first, later)
        points = stored(srv)
        log_batches = srv.count("/runs/log-batch")
    finally:
        srv.close()
    # The good metrics of the very batch that held the refused key arrived, each once.
    assert points == {"loss": [(1, 1.0), (2, 0.5), (3, 1.0 / 3)]}
    assert srv.runs["run1"]["params"] == {"lr": "0.1"} and srv.runs["run1"]["status"] == "FINISHED"
    # Refused once, then never sent again: not in the rest of the batch, not later.
    assert srv.refusals == (1 if indexed else 3)
    # Indexed: the refused request, the rest of it, the later batch. Not indexed: the
    # refused request [loss@1 bad@1 loss@2 bad@2 lr], its first half (refused), that
    # half's halves (loss@1 sent, bad@1 refused alone), the second half without "bad"
    # [loss@2 lr], the later batch.
    assert log_batches == (3 if indexed else 6)
    (warning,) = [w for w in warnings_of(caplog, "sinks.mlflow") if "refused" in w]
    assert "mlflow sink" in warning and "'bad'" in warning and "rest of this run" in warning
    assert TOKEN not in caplog.text


def test_a_refused_key_with_spool_on_leaves_nothing_spooled(caplog: pytest.LogCaptureFixture, tmp_path: Any) -> None:
    srv = RefusingServer({"bad"})
    try:
        sink = MLflowSink(srv.url, experiment_name="names", token=TOKEN)
        sink.isolate = False
        sink.spool = True
        bus = EventBus([sink], run=RunInfo(run_name="names", output_dir=str(tmp_path)))  # the spool goes there
        bus.publish(Log(step=1, values={"loss": 1.0, "bad": 0.1}))
        for s in range(2, 6):
            bus.publish(Log(step=s, values={"loss": 1.0 / s}))
        bus.start()
        stats = bus.close(timeout=30).sinks["mlflow"]
        points = stored(srv)
    finally:
        srv.close()
    assert (stats.received, stats.delivered, stats.failed, stats.dropped, stats.spooled, stats.errors) == (5, 5, 0, 0, 0, 0)
    assert [s for s, _ in points["loss"]] == [1, 2, 3, 4, 5] and "bad" not in points


@pytest.mark.parametrize(
    "answer",
    [
        {"error_code": "INVALID_PARAMETER_VALUE", "message": "The run run1 must be in the 'active' state. Current state is deleted."},
        {"error_code": "BAD_REQUEST", "message": "metrics[0] is odd"},
    ],
    ids=["about-the-run", "another-error-code"],
)
def test_a_400_that_is_not_about_an_entry_stays_an_error_and_drops_no_key(answer: dict[str, str]) -> None:
    class Server(FaultServer):
        refuse = True

        def _mlflow(self, method: str, path: str, query: dict[str, list[str]], body: dict[str, Any]) -> tuple[int, Any]:
            if path.endswith("/runs/log-batch") and self.refuse:
                return 400, dict(answer, message=f"{answer['message']} (you sent {self.requests[-1].authorization})")
            return super()._mlflow(method, path, query, body)

    srv = Server()
    sink = MLflowSink(srv.url, experiment_name="names", token=TOKEN)
    batch = [Log(step=1, values={"loss": 1.0, "acc": 0.5})]

    async def go() -> None:
        await sink.open(RunInfo())
        with pytest.raises(SinkError, match="answered 400") as info:
            await sink.write(batch)
        assert TOKEN not in str(info.value)
        assert srv.count("/runs/log-batch") == 1  # not split, not retried
        srv.refuse = False
        await sink.write(batch)  # the bus's retry: every key is still sent
        await sink.close()

    try:
        anyio.run(go)
        assert sorted(m["key"] for m in srv.metrics("run1")) == ["acc", "loss"]
    finally:
        srv.close()


# -- renaming: reported once per batch, never two metrics in one series -----------------------


def test_renamed_names_are_reported_in_one_line_per_batch(server: FaultServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    names = [f"grad_norm/layer_{i:04d}(w)" for i in range(1500)]
    sink = MLflowSink(server.url, experiment_name="names")
    direct(sink, *[[Log(step=s, values={"loss": 1.0 / s, **{n: float(s) for n in names}})] for s in (1, 2)])
    lines = warnings_of(caplog, "sinks.mlflow")
    assert len(lines) == 1, lines[:3]
    assert lines[0].startswith("mlflow sink: 1500 metric names") and "'grad_norm/layer_0000(w)' -> 'grad_norm/layer_0000_w_'" in lines[0]
    assert "1495 more" in lines[0]
    points = stored(server)
    assert len(points) == 1501 and points["grad_norm/layer_1499_w_"] == [(1, 1.0), (2, 2.0)]


@pytest.mark.parametrize(
    "steps",
    [
        [{"acc@1": 0.9, "acc_1": 0.1}] * 2,
        [{"acc_1": 0.1, "acc@1": 0.9}] * 2,
        [{"acc@1": 0.9}, {"acc@1": 0.9, "acc_1": 0.1}],  # the renamed one came first
    ],
    ids=["renamed-first", "unchanged-first", "renamed-in-an-earlier-batch"],
)
def test_two_names_that_sanitise_alike_stay_two_series_in_mlflow(
    steps: list[dict[str, float]], server: FaultServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    sink = MLflowSink(server.url, experiment_name="names")
    direct(sink, *[[Log(step=s, values=v)] for s, v in enumerate(steps, 1)])
    points = stored(server)
    assert len(points) == 2
    moved = sink.metric_names["acc@1"]
    assert moved.startswith("acc_1_")
    if len(steps[0]) == 2:
        # Both in one log: each series holds one metric's values, and the name that
        # needed no change keeps it, whichever came first.
        assert points["acc_1"] == [(1, 0.1), (2, 0.1)] and points[moved] == [(1, 0.9), (2, 0.9)]
    else:
        # acc@1 alone at step 1 had the plain name; from the log where its twin
        # appears on, acc_1 has it (as in any other process) and acc@1 its own.
        assert points["acc_1"] == [(1, 0.9), (2, 0.1)] and points[moved] == [(2, 0.9)]
    assert set(sink.metric_names.values()) <= set(points)
    (warning,) = [w for w in warnings_of(caplog, "sinks.mlflow") if "kept apart" in w]
    assert "'acc@1'" in warning and "'acc_1'" in warning and "mlflow sink" in warning


@pytest.mark.parametrize("isolate", [False, True], ids=["in-process", "in-a-child-process"])
def test_two_names_that_clean_alike_stay_two_tensorboard_series(tmp_path: Any, isolate: bool, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    sink = TensorBoardSink(log_dir=str(tmp_path))
    sink.isolate = isolate
    with EventBus([sink], run=RunInfo(output_dir=str(tmp_path))) as bus:
        for step in (1, 2):
            bus.publish(Log(step=step, values={"a:b": 5.0, "a_b": 6.0, "loss": 1.0 / step}))
    acc = accumulate(str(tmp_path))
    tags = sorted(acc.Tags()["scalars"])
    (moved,) = [t for t in tags if t.startswith("train/a_b_")]
    assert tags == sorted(["train/a_b", moved, "train/loss"])
    assert scalars(acc, "train/a_b") == [(1, 6.0), (2, 6.0)]  # the name that needed no cleaning
    assert scalars(acc, moved) == [(1, 5.0), (2, 5.0)]
    (warning,) = [r.getMessage() for r in caplog.records if "would both be written" in r.getMessage()]
    assert "tensorboard sink" in warning and "'train/a:b'" in warning and "'train/a_b'" in warning and repr(moved) in warning


# -- an int too large for a float ---------------------------------------------------------


@pytest.mark.parametrize("isolate", [False, True], ids=["in-process", "in-a-child-process"])
def test_an_int_too_large_for_a_float_does_not_fail_mlflow_s_batch(server: FaultServer, isolate: bool, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    sink = MLflowSink(server.url, experiment_name="names")
    sink.isolate = isolate
    with EventBus([sink], run=RunInfo(run_name="huge")) as bus:
        bus.publish(Log(step=1, values={"loss": 1.0, "hugeint": HUGE, "bigint": 2**64}))
        bus.publish(Log(step=2, values={"loss": 0.5, "hugeint": HUGE}))
    stats = bus.stats().sinks["mlflow"]
    assert (stats.received, stats.delivered, stats.failed, stats.errors) == (2, 2, 0, 0), stats.last_error
    points = stored(server)
    assert points == {"loss": [(1, 1.0), (2, 0.5)], "bigint": [(1, float(2**64))]}
    # Skipped with one warning naming it (in a child process it arrives as its text).
    (warning,) = [r.getMessage() for r in caplog.records if "'hugeint'" in r.getMessage()]
    assert warning.startswith("mlflow sink: 'hugeint' is ") and "not logged as a metric" in warning


@pytest.mark.parametrize("isolate", [False, True], ids=["in-process", "in-a-child-process"])
def test_an_int_too_large_for_a_float_is_tensorboard_text_as_in_a_child_process(tmp_path: Any, isolate: bool) -> None:
    sink = TensorBoardSink(log_dir=str(tmp_path))
    sink.isolate = isolate
    with EventBus([sink], run=RunInfo(output_dir=str(tmp_path))) as bus:
        bus.publish(Log(step=1, values={"loss": 1.0, "hugeint": HUGE}))
        bus.publish(Log(step=2, values={"loss": 0.5}))
    stats = bus.stats().sinks["tensorboard"]
    assert (stats.delivered, stats.failed, stats.errors) == (2, 0, 0), stats.last_error
    acc = accumulate(str(tmp_path))
    assert scalars(acc, "train/loss") == [(1, 1.0), (2, 0.5)]
    assert text(acc, "train/hugeint/text_summary") == [(1, str(HUGE))]


# -- a server's echo of the credentials ----------------------------------------------------


def test_a_failed_experiment_create_does_not_show_the_echoed_token(server: FaultServer) -> None:
    server.fail("/experiments/create", 400)  # its body echoes the Authorization header
    sink = MLflowSink(server.url, experiment_name="names", token=TOKEN)

    async def go() -> None:
        with pytest.raises(SinkError, match="could not create experiment") as info:
            await sink.open(RunInfo())
        await sink.close()
        assert "you sent" in str(info.value) and TOKEN not in str(info.value)

    anyio.run(go)


def test_a_run_create_without_a_run_id_does_not_show_the_echoed_token() -> None:
    class Server(FaultServer):
        def _mlflow(self, method: str, path: str, query: dict[str, list[str]], body: dict[str, Any]) -> tuple[int, Any]:
            if path.endswith("/runs/create"):
                return 200, {"echo": self.requests[-1].authorization}
            return super()._mlflow(method, path, query, body)

    srv = Server()
    sink = MLflowSink(srv.url, experiment_name="names", token=TOKEN)

    async def go() -> None:
        with pytest.raises(SinkError, match="without a run id") as info:
            await sink.open(RunInfo())
        await sink.close()
        assert "Bearer" in str(info.value) and TOKEN not in str(info.value)

    try:
        anyio.run(go)
    finally:
        srv.close()


@pytest.mark.parametrize("order", [("a:b", "a_b"), ("a_b", "a:b")], ids=["cleaned-first", "plain-first"])
def test_tags_of_names_that_clean_alike_do_not_depend_on_which_came_first(tmp_path: Any, order: tuple[str, str]) -> None:
    """A new process (a resume, evaluate() after train() with the sink in a new child)
    may meet the two names in the other order: the one that needs no cleaning always
    writes under the plain tag, the other under its own, from the log where both are
    known on; no point of one is written under the other's tag at that step."""
    sink = TensorBoardSink(log_dir=str(tmp_path))
    sink.isolate = False
    first, second = order
    values = {"a:b": 5.0, "a_b": 6.0}
    with EventBus([sink], run=RunInfo(output_dir=str(tmp_path))) as bus:
        bus.publish(Log(step=1, values={first: values[first]}))
        bus.publish(Log(step=2, values={first: values[first], second: values[second]}))
        bus.publish(Log(step=3, values={second: values[second], first: values[first]}))
    acc = accumulate(str(tmp_path))
    (moved,) = [t for t in acc.Tags()["scalars"] if t.startswith("train/a_b_")]
    plain = scalars(acc, "train/a_b")
    assert plain[1:] == [(2, 6.0), (3, 6.0)] and scalars(acc, moved) == [(2, 5.0), (3, 5.0)]
    assert plain[0] == (1, values[first])  # before its twin appeared, each had the plain tag
