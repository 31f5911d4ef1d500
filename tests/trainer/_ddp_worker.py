"""The training script ``tests/trainer/test_distributed.py`` launches with
``torchrun --nproc_per_node=2`` (gloo, CPU), and the single-process reference it is
compared with.

One launch runs every scenario in turn (starting processes is the slow part on a
small machine) and each rank writes what it saw to ``<out>/result-rank<r>.json``;
the test makes the assertions. A scenario that fails records its traceback there
instead of killing the launch, so the other scenarios still report.

    python -m torch.distributed.run --nproc_per_node=2 tests/trainer/_ddp_worker.py <out>
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import traceback
from typing import Any, Sequence

import torch

from eventbus import EVENT_TYPES, Sink
from trainer import Trainer, TrainerCallback, TrainingArguments
from trainer.trainer import TrainingInterrupted

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tests.trainer._loop_helpers import TinyClassifier, accuracy, make_dataset  # noqa: E402

TRAIN = make_dataset(40, seed=1)  # 5 global batches of 8 per epoch; 20 examples per rank
EVAL = make_dataset(21, seed=2)  # uneven shares: 11 and 10
MAX_STEPS = 8  # crosses an epoch boundary: the second epoch draws a new order (set_epoch)
GLOBAL_BATCH = 8


def make_args(output_dir: str, world_size: int, **overrides: Any) -> TrainingArguments:
    """The shared configuration; the per-device batch and accumulation make the
    global batch (per_device * world_size * accumulation) 8 at every world size."""
    per_device, accumulation = (GLOBAL_BATCH, 1) if world_size == 1 else (GLOBAL_BATCH // world_size // 2, 2)
    # Distributed eval_loss is the mean over examples (batch means weighted by size);
    # one evaluation batch makes the single-process mean of batch means the same.
    eval_batch = len(EVAL) if world_size == 1 else 4
    kwargs: dict[str, Any] = dict(
        output_dir=output_dir,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        per_device_eval_batch_size=eval_batch,
        max_steps=MAX_STEPS,
        learning_rate=0.05,
        lr_scheduler_type="linear",
        logging_steps=2,
        eval_strategy="steps",
        eval_steps=3,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=7,
        bus_close_timeout=10.0,
    )
    kwargs.update(overrides)
    args = TrainingArguments(**kwargs)
    args.ddp_timeout = 60  # a rank left alone fails within a minute instead of hanging the suite
    return args


def flat_params(model: torch.nn.Module) -> list[float]:
    """Every parameter, flattened, as plain floats."""
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()]).tolist()


def plain_logs(history: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``log_history`` with tensors turned into numbers."""
    out = []
    for entry in history:
        out.append({k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in entry.items()})
    return out


class FileSink(Sink):
    """Appends one JSON line per event to ``<dir>/<name>-rank<RANK>.jsonl``: the file
    name says which process wrote it, the line says which rank the event came from."""

    events = EVENT_TYPES

    def __init__(self, name: str, directory: str, all_ranks: bool = False) -> None:
        self.name = name  # type: ignore[misc]
        self.all_ranks = all_ranks
        self.path = os.path.join(directory, f"{name}-rank{os.environ.get('RANK', '0')}.jsonl")

    async def write(self, batch: Sequence[Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            for e in batch:
                fh.write(json.dumps({"type": type(e).__name__, "rank": e.rank, "step": e.step}) + "\n")


class StopOnOneRank(TrainerCallback):
    """On rank ``rank`` only: asks for a checkpoint at ``save_at`` and for the end of
    training at ``stop_at``. Records the steps it saw end, on every rank."""

    def __init__(self, rank: int, save_at: int, stop_at: int) -> None:
        self.rank, self.save_at, self.stop_at = rank, save_at, stop_at
        self.steps: list[int] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.steps.append(state.global_step)
        if int(os.environ["RANK"]) == self.rank:
            if state.global_step == self.save_at:
                control.should_save = True
            if state.global_step == self.stop_at:
                control.should_training_stop = True


class SigtermOnOneRank(TrainerCallback):
    """Sends SIGTERM to its own process at step ``at``, on rank ``rank`` only."""

    def __init__(self, rank: int, at: int) -> None:
        self.rank, self.at = rank, at

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if int(os.environ["RANK"]) == self.rank and state.global_step == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


def run_match(output_dir: str, world_size: int, sinks: Sequence[Sink] = (), report_to: Any = "none") -> dict[str, Any]:
    """Train the reference configuration; what the comparison needs."""
    t = Trainer(
        TinyClassifier(seed=0),
        make_args(output_dir, world_size, report_to=report_to),
        train_dataset=TRAIN,
        eval_dataset=EVAL,
        compute_metrics=accuracy,
        sinks=list(sinks),
    )
    out = t.train()
    return {
        "global_step": out.global_step,
        "train_loss": out.training_loss,
        "params": flat_params(t.model),
        "logs": plain_logs(t.state.log_history),
        "run_id": t.run_id,
        "is_world_process_zero": t.state.is_world_process_zero,
        "is_local_process_zero": t.state.is_local_process_zero,
        "wrapped": type(t.model_wrapped).__name__,
    }


def scenario_match(out: str) -> dict[str, Any]:
    sinks = [FileSink("rank0only", out), FileSink("everyrank", out, all_ranks=True)]
    return run_match(os.path.join(out, "match"), 2, sinks=sinks, report_to="jsonl")


def scenario_stop(out: str) -> dict[str, Any]:
    cb = StopOnOneRank(rank=1, save_at=2, stop_at=3)
    directory = os.path.join(out, "stop")
    t = Trainer(TinyClassifier(seed=0), make_args(directory, 2, eval_strategy="no"), train_dataset=TRAIN, callbacks=[cb])
    result = t.train()
    return {
        "global_step": result.global_step,
        "steps_seen": cb.steps,
        "checkpoints": sorted(d for d in os.listdir(directory) if d.startswith("checkpoint-")),
    }


def scenario_interrupt_and_resume(out: str) -> dict[str, Any]:
    directory = os.path.join(out, "resume")
    res: dict[str, Any] = {}
    t = Trainer(
        TinyClassifier(seed=0),
        make_args(directory, 2),
        train_dataset=TRAIN,
        eval_dataset=EVAL,
        compute_metrics=accuracy,
        callbacks=[SigtermOnOneRank(rank=1, at=3)],
    )
    try:
        t.train()
        res["interrupted"] = None
    except TrainingInterrupted as exc:
        res["interrupted"] = {"step": exc.global_step, "checkpoint": exc.checkpoint, "signum": int(exc.signum)}
    res["checkpoint_files"] = sorted(os.listdir(os.path.join(directory, "checkpoint-3")))
    # A fresh trainer (as a relaunch would build) picks the run up on every rank.
    t2 = Trainer(
        TinyClassifier(seed=123), make_args(directory, 2), train_dataset=TRAIN, eval_dataset=EVAL, compute_metrics=accuracy
    )
    out2 = t2.train(resume_from_checkpoint=True)
    res.update(
        global_step=out2.global_step,
        params=flat_params(t2.model),
        logs=plain_logs(t2.state.log_history),
        run_ids=[t.run_id, t2.run_id],
    )
    return res


def scenario_host_group(out: str) -> dict[str, Any]:
    """The NCCL path's gloo side group for host values, exercised on the CPU by
    making the default group report itself as NCCL."""
    import torch.distributed as dist

    from trainer import distributed

    rank = int(os.environ["RANK"])
    real = dist.get_backend
    dist.get_backend = lambda group=None: "nccl" if group is None else real(group)  # type: ignore[assignment]
    try:
        flags = distributed.broadcast_flags([rank == 1, False, rank == 0])
        group = distributed._host_group()
        obj = distributed.broadcast_object(f"from-{rank}")
        gathered = distributed.gather_objects(rank * 10)
    finally:
        dist.get_backend = real  # type: ignore[assignment]
    return {
        "flags": flags,
        "side_group_backend": str(real(group)) if group is not None else None,
        "broadcast": obj,
        "gathered": gathered,
    }


class FlagsFromOnLog(TrainerCallback):
    """On rank 1 only: asks for a checkpoint from ``on_log`` at step 2 and for an
    evaluation at step 4. Records where every rank saved and evaluated."""

    def __init__(self) -> None:
        self.saved: list[int] = []
        self.evaluated: list[int] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        if int(os.environ["RANK"]) == 1 and "loss" in (logs or {}):
            if state.global_step == 2:
                control.should_save = True
            if state.global_step == 4:
                control.should_evaluate = True

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.saved.append(state.global_step)

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.evaluated.append(state.global_step)


def scenario_onlog_flags(out: str) -> dict[str, Any]:
    """A flag set in on_log on one rank: every rank saves/evaluates at that step."""
    cb = FlagsFromOnLog()
    directory = os.path.join(out, "onlog")
    args = make_args(directory, 2, max_steps=4, eval_strategy="no")
    t = Trainer(TinyClassifier(seed=0), args, train_dataset=TRAIN, eval_dataset=EVAL, callbacks=[cb])
    result = t.train()
    return {
        "global_step": result.global_step,
        "saved": cb.saved,
        "evaluated": cb.evaluated,
        "checkpoints": sorted(d for d in os.listdir(directory) if d.startswith("checkpoint-")),
    }


class _Warnings(logging.Handler):
    """The trainer logger's warnings, as text."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def __enter__(self) -> "_Warnings":
        logging.getLogger("trainer").addHandler(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        logging.getLogger("trainer").removeHandler(self)


def scenario_save_fails_on_one_rank(out: str) -> dict[str, Any]:
    """Rank 1 fails while writing its RNG file into checkpoint-4: no rank commits
    checkpoint-4 (a resume would pick a checkpoint rank 1 cannot use), both raise."""
    from trainer import checkpoint as ckpt
    from trainer import distributed

    directory = os.path.join(out, "savefail")
    real = ckpt.save_rng_state

    def failing(d: str, rank: int = 0, world_size: int = 1) -> str:
        if rank == 1 and "checkpoint-4" in os.path.basename(d):
            raise OSError("No space left on device (test)")
        return real(d, rank, world_size)

    ckpt.save_rng_state = failing  # type: ignore[assignment]
    res: dict[str, Any] = {}
    try:
        args = make_args(directory, 2, max_steps=6, eval_strategy="no", save_strategy="steps", save_steps=2)
        t = Trainer(TinyClassifier(seed=0), args, train_dataset=TRAIN)
        t.train()
        res["raised"] = None
    except Exception as exc:  # noqa: BLE001 - what each rank raised is the point
        res["raised"] = f"{type(exc).__name__}: {exc}"
    finally:
        ckpt.save_rng_state = real  # type: ignore[assignment]
    distributed.barrier()  # rank 0 has cleaned up before anyone looks
    res["entries"] = sorted(os.listdir(directory))
    res["checkpoint_2"] = sorted(os.listdir(os.path.join(directory, "checkpoint-2")))
    return res


def scenario_resume_without_a_rank_rng_file(out: str) -> dict[str, Any]:
    """A checkpoint that lacks rng_state_1.pth (as an older save cut short left):
    rank 1 warns and every rank resumes, as transformers does."""
    import shutil

    from trainer import distributed

    directory = os.path.join(out, "rngmiss")
    if int(os.environ["RANK"]) == 0:
        shutil.copytree(os.path.join(out, "savefail", "checkpoint-2"), os.path.join(directory, "checkpoint-2"))
        os.remove(os.path.join(directory, "checkpoint-2", "rng_state_1.pth"))
    distributed.barrier()
    args = make_args(directory, 2, max_steps=4, eval_strategy="no")
    t = Trainer(TinyClassifier(seed=5), args, train_dataset=TRAIN)
    with _Warnings() as w:
        result = t.train(resume_from_checkpoint=True)
    return {"global_step": result.global_step, "params": flat_params(t.model), "warnings": w.messages}


class _Stream(torch.utils.data.IterableDataset):
    """``EVAL``'s 21 examples as a stream, sharded by RANK (11 and 10) or not."""

    def __init__(self, sharded: bool) -> None:
        self.sharded = sharded

    def __iter__(self) -> Any:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        return iter(EVAL[rank::world] if self.sharded else EVAL)


def scenario_uneven_stream(out: str) -> dict[str, Any]:
    """An IterableDataset sharded by rank into 6 and 5 batches (with accumulation 2):
    both ranks end the epoch at the shorter shard's last full step, and go on."""
    res: dict[str, Any] = {}
    with _Warnings() as w:
        args = make_args(os.path.join(out, "stream"), 2, max_steps=4, eval_strategy="no", logging_steps=1)
        t = Trainer(TinyClassifier(seed=0), args, train_dataset=_Stream(sharded=True))
        result = t.train()
        res.update(global_step=result.global_step, params=flat_params(t.model), warnings=list(w.messages))
        w.messages.clear()
        args = make_args(os.path.join(out, "stream-all"), 2, max_steps=1, eval_strategy="no")
        Trainer(TinyClassifier(seed=0), args, train_dataset=_Stream(sharded=False)).train()
        res["unsharded_warnings"] = list(w.messages)
    res["epochs"] = [e.get("epoch") for e in t.state.log_history if "loss" in e]
    return res


class WithUnusedLayer(TinyClassifier):
    """A model with a layer its forward never uses (a second head, a frozen branch):
    DDP fails on the second step unless told to look for unused parameters."""

    def __init__(self) -> None:
        super().__init__(seed=0)
        self.unused = torch.nn.Linear(4, 4)


def scenario_unused_parameters(out: str) -> dict[str, Any]:
    """``ddp_find_unused_parameters=True`` reaches DistributedDataParallel."""
    directory = os.path.join(out, "unused")
    args = make_args(directory, 2, eval_strategy="no", max_steps=3, ddp_find_unused_parameters=True, ddp_bucket_cap_mb=10)
    t = Trainer(WithUnusedLayer(), args, train_dataset=TRAIN)
    t.train()
    wrapped = t.model_wrapped
    return {
        "global_step": t.state.global_step,
        "find_unused_parameters": bool(getattr(wrapped, "find_unused_parameters", False)),
    }


class _MainX(TinyClassifier):
    main_input_name = "x"


def run_eval_inputs(output_dir: str, world_size: int) -> dict[str, Any]:
    """evaluate() with include_for_metrics (inputs and losses), concatenated and per
    batch: what compute_metrics received, as lists (batches of 4 at every world size,
    so the per-batch lists compare too)."""
    seen: dict[str, Any] = {}

    def record(key: str) -> Any:
        def compute_metrics(p: Any) -> dict[str, float]:
            def plain(v: Any) -> Any:
                return [plain(b) for b in v] if isinstance(v, list) else v.tolist()

            seen[key] = {name: plain(getattr(p, name)) for name in ("predictions", "label_ids", "inputs", "losses")}
            return {}

        return compute_metrics

    for concat in (True, False):
        args = make_args(output_dir, world_size, per_device_eval_batch_size=4 if world_size == 1 else 2,
                         include_for_metrics=["inputs", "loss"], eval_do_concat_batches=concat)
        t = Trainer(_MainX(seed=0), args, eval_dataset=EVAL, compute_metrics=record(f"concat={concat}"))
        t.evaluate()
    return seen


class _CountNormalised(TinyClassifier):
    """Takes loss kwargs, as transformers' models: its loss is the sum over the
    labelled rows divided by the trainer's count (num_items_in_batch)."""

    def forward(self, x: Any, labels: Any = None, num_items_in_batch: Any = None, **kwargs: Any) -> dict[str, Any]:
        logits = self.out(self.drop(torch.relu(self.norm(self.lin(x)))))
        if labels is None:
            return {"logits": logits}
        if num_items_in_batch is None:
            return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}
        total = torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
        return {"loss": total / num_items_in_batch, "logits": logits}


def _partly_unlabelled() -> list[dict[str, Any]]:
    """TRAIN with every third row's label -100: the ranks' micro-batches hold
    different numbers of labelled rows."""
    rows = [dict(r) for r in TRAIN]
    for i in range(0, len(rows), 3):
        rows[i]["labels"] = -100
    return rows


def run_count_normalised(output_dir: str, world_size: int, average: bool = True) -> dict[str, Any]:
    """Train the count-normalised model; its parameters and training loss."""
    args = make_args(output_dir, world_size, eval_strategy="no", average_tokens_across_devices=average)
    t = Trainer(_CountNormalised(seed=0), args, train_dataset=_partly_unlabelled())
    out = t.train()
    return {"params": flat_params(t.model), "train_loss": out.training_loss}


def scenario_count_normalised(out: str) -> dict[str, Any]:
    return {
        "average": run_count_normalised(os.path.join(out, "count-avg"), 2),
        "per_rank": run_count_normalised(os.path.join(out, "count-rank"), 2, average=False),
    }


def scenario_eval_inputs(out: str) -> dict[str, Any]:
    return run_eval_inputs(os.path.join(out, "eval_inputs"), 2)


SCENARIOS = {
    "match": scenario_match,
    "eval_inputs": scenario_eval_inputs,
    "count_normalised": scenario_count_normalised,
    "stop": scenario_stop,
    "resume": scenario_interrupt_and_resume,
    "host_group": scenario_host_group,
    "onlog_flags": scenario_onlog_flags,
    "save_fails": scenario_save_fails_on_one_rank,
    "rng_missing": scenario_resume_without_a_rank_rng_file,
    "uneven_stream": scenario_uneven_stream,
    "unused_parameters": scenario_unused_parameters,
}


def main(out: str) -> None:
    rank = int(os.environ["RANK"])
    results: dict[str, Any] = {"rank": rank, "world_size": int(os.environ["WORLD_SIZE"])}
    for name, fn in SCENARIOS.items():
        try:
            results[name] = fn(out)
        except BaseException:  # noqa: BLE001 - reported to the test, which fails with it
            results[name] = {"error": traceback.format_exc()}
            # A rank that failed mid-scenario leaves the others in a collective: stop
            # here, the process-group timeout ends theirs.
            break
        finally:
            with open(os.path.join(out, f"result-rank{rank}.json"), "w", encoding="utf-8") as fh:
                json.dump(results, fh)
    if all("error" not in r for r in results.values() if isinstance(r, dict)):
        # Last: the process group ends with Trainer.end(), on every rank.
        t = Trainer(TinyClassifier(seed=0), make_args(os.path.join(out, "end"), 2))
        t.end()
        results["ended"] = not torch.distributed.is_initialized()
        with open(os.path.join(out, f"result-rank{rank}.json"), "w", encoding="utf-8") as fh:
            json.dump(results, fh)


if __name__ == "__main__":
    main(sys.argv[1])
