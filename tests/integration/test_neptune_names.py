"""NeptuneSink and metric names Neptune cannot take as they are, against the real
``neptune`` client in offline mode (its operation queue read back with the client's
own reader, as in ``test_neptune``): a name that is also another's namespace, names
that one field path would merge, an empty name, an int no float can hold, and a
field the client refuses. Each costs only its own values, with one warning naming it;
the other metrics of the batch are logged and the events count as delivered."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from eventbus import EventBus, Log, RunInfo
from eventbus.stats import SinkStats
from tests.integration import test_neptune
from tests.integration.test_neptune import read_offline

offline = test_neptune.offline  # the fixture: a working directory for .neptune/, a token, no network

pytestmark = pytest.mark.integration


def _sink(isolate: bool = False, **options: Any) -> Any:
    from sinks.neptune import NeptuneSink

    sink = NeptuneSink(mode="offline", capture_hardware_metrics=False, **options)
    sink.isolate = isolate
    return sink


def _publish(sink: Any, rows: list[dict[str, Any]], run_id: str = "names") -> SinkStats:
    """One Log per row, at steps 1, 2, ...; the sink's stats once the bus is closed."""
    with EventBus([sink], run=RunInfo(run_id=run_id)) as bus:
        for step, values in enumerate(rows, 1):
            bus.publish(Log(step=step, values=values))
    return bus.stats().sinks["neptune"]


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("sinks") and r.levelno >= logging.WARNING]


@pytest.mark.parametrize(
    ("first", "second", "renamed"),
    [
        # A callback's per-layer norms come first, then the trainer's own grad_norm.
        ("grad_norm/layer0", "grad_norm", {"train/grad_norm": "finetuning/train/grad_norm_"}),
        ("grad_norm", "grad_norm/layer0", {"train/grad_norm/layer0": "finetuning/train/grad_norm_/layer0"}),
    ],
    ids=["namespace-first", "series-first"],
)
def test_a_metric_that_is_also_a_namespace_is_logged_apart(
    offline: Path, caplog: pytest.LogCaptureFixture, first: str, second: str, renamed: dict[str, str]
) -> None:
    """``grad_norm`` and ``grad_norm/layer0``: Neptune cannot have a series and a
    namespace at one path (the client raised for every batch, and the loss logged with
    them was lost for the whole run). The name that clashes goes to a field with ``_``
    after the clashing segment, with one warning naming both; every value is logged and
    every event counts as delivered."""
    caplog.set_level(logging.WARNING, logger="sinks")
    rows = [{first: 0.5 * s, second: 2.0 * s, "loss": 1.0 / s} for s in range(1, 6)]
    stats = _publish(_sink(), rows)
    assert (stats.received, stats.delivered, stats.failed, stats.errors) == (5, 5, 0, 0), stats
    data = read_offline(offline)
    assert data.series["finetuning/train/loss"] == [(1.0 / s, s) for s in range(1, 6)]
    fields = {f"train/{first}": f"finetuning/train/{first}", f"train/{second}": f"finetuning/train/{second}", **renamed}
    assert data.series[fields[f"train/{first}"]] == [(0.5 * s, s) for s in range(1, 6)]
    assert data.series[fields[f"train/{second}"]] == [(2.0 * s, s) for s in range(1, 6)]
    [(key, field)] = renamed.items()
    [warning] = _warnings(caplog)
    assert warning.startswith(f"neptune sink: {key!r} would be logged to finetuning/{key}, ")
    assert repr(f"train/{first}") in warning and warning.endswith(f"logged to {field} instead")


def test_trainer_loss_survives_a_callback_logging_per_layer_grad_norms(offline: Path) -> None:
    """Our Trainer logs ``grad_norm``; a user callback logs ``grad_norm/<parameter>``
    at every step. With the sink in its child process (the default), the trainer's
    loss and grad norm and the callback's norms all reach the offline run, and no
    event fails."""
    from tests.trainer._loop_helpers import TinyClassifier, make_dataset, tiny_args
    from trainer import Trainer, TrainerCallback

    class LayerNorms(TrainerCallback):
        trainer: Any = None

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            self.trainer.log({f"grad_norm/{n}": float(p.grad.norm()) for n, p in model.named_parameters()})

    sink = _sink(isolate=True)
    callback = LayerNorms()
    args = tiny_args(offline / "out", max_steps=6)
    trainer = Trainer(TinyClassifier(), args, train_dataset=make_dataset(24), sinks=[sink], callbacks=[callback])
    callback.trainer = trainer
    trainer.train()
    stats = trainer.bus.stats().sinks["neptune"]
    assert stats.received > 12 and stats.delivered == stats.received and stats.failed == 0, stats
    data = read_offline(offline)
    assert [s for _, s in data.series["finetuning/train/loss"]] == [1, 2, 3, 4, 5, 6]
    assert [s for _, s in data.series["finetuning/train/grad_norm_"]] == [1, 2, 3, 4, 5, 6]
    # Logged before the optimizer step, at the step before it.
    assert [s for _, s in data.series["finetuning/train/grad_norm/lin.weight"]] == [0, 1, 2, 3, 4, 5]


def test_names_one_field_would_merge_are_kept_apart(offline: Path, caplog: pytest.LogCaptureFixture) -> None:
    """``/lead`` and ``lead`` both clean to ``train/lead`` (the client drops empty
    segments), where their values were merged without a word: the second gets
    ``train/lead_``, with one warning naming both."""
    caplog.set_level(logging.WARNING, logger="sinks")
    rows = [{"/lead": 8.0 + s, "lead": 9.0 + s, "loss": float(s)} for s in (1, 2, 3)]
    stats = _publish(_sink(), rows)
    assert (stats.delivered, stats.failed) == (3, 0), stats
    data = read_offline(offline)
    assert data.series["finetuning/train/lead"] == [(8.0 + s, s) for s in (1, 2, 3)]
    assert data.series["finetuning/train/lead_"] == [(9.0 + s, s) for s in (1, 2, 3)]
    assert data.series["finetuning/train/loss"] == [(float(s), s) for s in (1, 2, 3)]
    assert _warnings(caplog) == [
        "neptune sink: 'train/lead' would be logged to finetuning/train/lead, which 'train//lead' is logged to "
        "(Neptune cannot hold both); logged to finetuning/train/lead_ instead"
    ]


def test_an_empty_name_is_a_field_of_its_own(offline: Path) -> None:
    """An empty metric name became ``train/`` and so the ``train`` namespace itself,
    which failed every batch: it is logged as ``train/_``."""
    from sinks.neptune import clean_path

    stats = _publish(_sink(), [{"": 7.0 + s, "loss": float(s)} for s in (1, 2, 3)])
    assert (stats.delivered, stats.failed) == (3, 0), stats
    data = read_offline(offline)
    assert data.series["finetuning/train/_"] == [(7.0 + s, s) for s in (1, 2, 3)]
    assert data.series["finetuning/train/loss"] == [(float(s), s) for s in (1, 2, 3)]
    assert clean_path("train/") == "train/_" and clean_path("a//b") == "a/b" and clean_path("") == "_"


def test_an_int_too_large_for_a_float_is_skipped_with_one_warning(offline: Path, caplog: pytest.LogCaptureFixture) -> None:
    """10**400 has no float: it is skipped like any other non-number, warned about
    once, and the rest of the batch is logged (it raised OverflowError, failing the
    whole batch)."""
    caplog.set_level(logging.WARNING, logger="sinks")
    stats = _publish(_sink(), [{"huge": 10**400, "loss": 1.0}, {"huge": 10**401, "loss": 0.5}])
    assert (stats.delivered, stats.failed, stats.errors) == (2, 0, 0), stats
    data = read_offline(offline)
    assert data.series["finetuning/train/loss"] == [(1.0, 1), (0.5, 2)]
    assert not [p for p in data.series if "huge" in p]
    assert _warnings(caplog) == [
        "neptune sink: 'train/huge' is an int too large for a float; it is not logged (shown once per key)"
    ]


def test_a_run_passed_in_its_fields_are_respected_and_a_refused_series_costs_only_itself(
    offline: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A run passed in already has ``finetuning/train/grad_norm/layer0`` (a series) and
    ``finetuning/train/acc`` (a string): the sink's ``grad_norm`` goes to
    ``grad_norm_`` as the client's fields say, and ``acc``, which the client refuses
    to extend, is skipped with one warning while the batch's other series are logged
    and its events count as delivered."""
    import neptune

    caplog.set_level(logging.WARNING, logger="sinks")
    run = neptune.init_run(mode="offline", capture_hardware_metrics=False, capture_stdout=False, capture_stderr=False)
    try:
        run["finetuning/train/grad_norm/layer0"].extend([1.0], steps=[0])
        run["finetuning/train/acc"] = "high"
        rows = [{"acc": 0.5, "grad_norm": 3.0 * s, "loss": 1.0 / s} for s in (1, 2, 3)]
        stats = _publish(_sink(run=run), rows)
    finally:
        run.stop()
    assert (stats.received, stats.delivered, stats.failed, stats.errors) == (3, 3, 0, 0), stats
    data = read_offline(offline)
    assert data.series["finetuning/train/loss"] == [(1.0 / s, s) for s in (1, 2, 3)]
    assert data.series["finetuning/train/grad_norm_"] == [(3.0 * s, s) for s in (1, 2, 3)]
    assert data.values["finetuning/train/acc"] == "high"
    warnings = _warnings(caplog)
    assert len(warnings) == 2, warnings
    assert warnings[0] == (
        "neptune sink: 'train/grad_norm' would be logged to finetuning/train/grad_norm, which is a namespace of the "
        "run (Neptune cannot hold both); logged to finetuning/train/grad_norm_ instead"
    )
    assert warnings[1].startswith(
        "neptune sink: 'train/acc': the client refused field finetuning/train/acc (TypeDoesNotSupportAttributeException: "
    )
    assert warnings[1].endswith("has no attribute extend.); it is not logged from now on, the other metrics are")
