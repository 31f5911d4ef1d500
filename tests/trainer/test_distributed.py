"""Distributed training under ``torchrun --nproc_per_node=2`` (gloo, CPU).

One torchrun launch (``_ddp_worker.py``) runs every multi-process scenario, each rank
reporting what it saw to a JSON file; the tests below assert on those reports and
compare them with a single-process run of the same configuration. Launching two
processes is the expensive part on a small machine, hence one launch for all.
"""

from __future__ import annotations

import glob
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.trainer import _ddp_worker as worker
from trainer import distributed
from trainer.trainer import _EpochBatches, _interleave

REPO = Path(__file__).resolve().parents[2]
LAUNCH_DEADLINE_S = 240  # a deadline, not a timing assertion: a hung rank fails the suite instead of blocking it


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_logs(log_dir: Path) -> str:
    """Every rank's stdout/stderr (torchrun --log-dir layout), for failure messages."""
    parts = []
    for path in sorted(log_dir.rglob("*.log")):
        text = path.read_text(errors="replace")
        if text.strip():
            parts.append(f"----- {path.relative_to(log_dir)} -----\n{text[-6000:]}")
    return "\n".join(parts) or "(no rank output)"


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Launch the worker on two ranks once; the per-rank reports and the output dir."""
    out = tmp_path_factory.mktemp("ddp")
    log_dir = out / "torchrun-logs"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes=1", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        f"--log-dir={log_dir}", "--redirects=3",
        str(REPO / "tests" / "trainer" / "_ddp_worker.py"), str(out),
    ]  # fmt: skip
    # A session of its own: on a timeout the launcher and both ranks are ended together.
    proc = subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=LAUNCH_DEADLINE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"torchrun did not finish within {LAUNCH_DEADLINE_S}s (a rank is stuck)\n{_rank_logs(log_dir)}")
    launcher = f"torchrun exit {proc.returncode}\n{stdout[-4000:]}\n{stderr[-4000:]}"
    reports = {}
    for rank in (0, 1):
        path = out / f"result-rank{rank}.json"
        if not path.exists():
            pytest.fail(f"rank {rank} wrote no report\n{launcher}\n{_rank_logs(log_dir)}")
        reports[rank] = json.loads(path.read_text())
    return {"out": out, "reports": reports, "logs": f"{launcher}\n{_rank_logs(log_dir)}", "rc": proc.returncode}


def scenario(ddp: dict[str, Any], name: str) -> dict[int, dict[str, Any]]:
    """Both ranks' reports for scenario ``name``; fails with the ranks' output if a
    rank raised."""
    got = {r: ddp["reports"][r].get(name) for r in (0, 1)}
    for r, rep in got.items():
        if rep is None or "error" in rep:
            pytest.fail(f"scenario {name!r} failed on rank {r}:\n{(rep or {}).get('error', 'not run')}\n{ddp['logs']}")
    return got


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same configuration in one process, with the same global batch of 8."""
    return worker.run_match(str(tmp_path_factory.mktemp("single")), world_size=1)


def _max_diff(a: list[float], b: list[float]) -> float:
    """The largest absolute difference between two equally long vectors."""
    assert len(a) == len(b)
    return max(abs(x - y) for x, y in zip(a, b))


def _logs_by_step(logs: list[dict[str, Any]], key: str) -> dict[int, float]:
    return {e["step"]: e[key] for e in logs if key in e}


# -- the launch ---------------------------------------------------------------------


def test_torchrun_launch_exits_cleanly(ddp):
    assert ddp["rc"] == 0, ddp["logs"]
    assert [ddp["reports"][r]["world_size"] for r in (0, 1)] == [2, 2]


def test_two_ranks_train_like_one_process_with_the_same_global_batch(ddp, reference):
    got = scenario(ddp, "match")
    assert got[0]["wrapped"] == got[1]["wrapped"] == "DistributedDataParallel"
    assert reference["wrapped"] == "TinyClassifier"  # no DDP in a single process
    assert got[0]["global_step"] == got[1]["global_step"] == reference["global_step"] == worker.MAX_STEPS
    # DDP keeps the replicas identical...
    assert _max_diff(got[0]["params"], got[1]["params"]) == 0.0
    # ...and 2 ranks x 2 per device x 2 accumulation train like one process with 8.
    assert _max_diff(got[0]["params"], reference["params"]) < 1e-5
    assert math.isclose(got[0]["train_loss"], reference["train_loss"], rel_tol=1e-5)
    assert math.isclose(got[1]["train_loss"], reference["train_loss"], rel_tol=1e-5)


def test_the_logged_loss_is_the_mean_over_ranks(ddp, reference):
    got = scenario(ddp, "match")
    ref = _logs_by_step(reference["logs"], "loss")
    assert sorted(ref) == [2, 4, 6, 8]
    for r in (0, 1):
        mine = _logs_by_step(got[r]["logs"], "loss")
        assert sorted(mine) == sorted(ref)
        # Each rank saw half of every global batch: only the mean over ranks equals
        # the single-process loss.
        for step, value in ref.items():
            assert math.isclose(mine[step], value, rel_tol=1e-5), (r, step, mine[step], value)


def test_evaluation_metrics_are_reduced_across_ranks(ddp, reference):
    got = scenario(ddp, "match")
    ref_acc = _logs_by_step(reference["logs"], "eval_accuracy")
    ref_loss = _logs_by_step(reference["logs"], "eval_loss")
    assert sorted(ref_acc) == [3, 6, 8]
    for r in (0, 1):
        # The ranks evaluated 11 and 10 of the 21 examples; both see the metrics of all 21.
        assert _logs_by_step(got[r]["logs"], "eval_accuracy") == ref_acc
        for step, value in _logs_by_step(got[r]["logs"], "eval_loss").items():
            assert math.isclose(value, ref_loss[step], rel_tol=1e-5), (r, step)


def test_included_inputs_and_losses_are_gathered_in_dataset_order(ddp, tmp_path):
    """include_for_metrics under two ranks (shares of 11 and 10, batches of 2 per
    rank): compute_metrics gets what one process with batches of 4 gets: the same
    rows in the same order, and the same per-batch split without concatenation."""
    single = worker.run_eval_inputs(str(tmp_path), 1)
    got = scenario(ddp, "eval_inputs")
    for r in (0, 1):
        for key in ("concat=True", "concat=False"):
            mine, ref = got[r][key], single[key]
            for name in ("predictions", "label_ids", "inputs"):
                assert _close(mine[name], ref[name]), (r, key, name)
        # Losses: per example, each its batch's mean; the batches differ (2 per rank
        # here, 4 in one process), so compare the lengths and the batch split.
        assert len(got[r]["concat=True"]["losses"]) == 21
        assert [len(b) for b in got[r]["concat=False"]["losses"]] == [len(b) for b in single["concat=False"]["losses"]]


def test_average_tokens_across_devices_trains_like_one_process(ddp, tmp_path):
    """A model normalising its loss by num_items_in_batch, with a third of the rows
    unlabelled: counted over both ranks (and the loss scaled by 2), two ranks train
    as one process with the same global batch; each rank counting its own does not."""
    single = worker.run_count_normalised(str(tmp_path), 1)
    got = scenario(ddp, "count_normalised")
    for r in (0, 1):
        assert _max_diff(got[r]["average"]["params"], single["params"]) < 1e-5
        assert got[r]["average"]["train_loss"] == pytest.approx(single["train_loss"], rel=1e-5)
        assert _max_diff(got[r]["per_rank"]["params"], single["params"]) > 1e-4


def test_trainer_end_ends_the_process_group_on_every_rank(ddp):
    assert [ddp["reports"][r].get("ended") for r in (0, 1)] == [True, True], ddp["logs"]


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)
    return a == b


def test_process_zero_flags_and_one_run_id_for_all_ranks(ddp):
    got = scenario(ddp, "match")
    assert (got[0]["is_world_process_zero"], got[0]["is_local_process_zero"]) == (True, True)
    assert (got[1]["is_world_process_zero"], got[1]["is_local_process_zero"]) == (False, False)
    assert got[0]["run_id"] == got[1]["run_id"]


# -- sinks --------------------------------------------------------------------------


def test_only_rank_zero_sinks_write(ddp):
    out = ddp["out"]
    scenario(ddp, "match")
    assert (out / "rank0only-rank0.jsonl").stat().st_size > 0
    assert not (out / "rank0only-rank1.jsonl").exists(), "a sink without all_ranks ran on rank 1"
    # report_to="jsonl": one file, written by rank 0 alone.
    files = glob.glob(str(out / "match" / "events-*.jsonl"))
    assert len(files) == 1, files
    records = [json.loads(line) for line in Path(files[0]).read_text().splitlines() if line.strip()]
    assert any(rec["type"] == "Log" for rec in records)
    assert {rec["rank"] for rec in records} == {0}


def test_an_all_ranks_sink_writes_on_every_rank_tagged_with_its_rank(ddp):
    out = ddp["out"]
    scenario(ddp, "match")
    steps_logged = {}
    for r in (0, 1):
        lines = (out / f"everyrank-rank{r}.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert records, f"the all_ranks sink wrote nothing on rank {r}"
        assert {rec["rank"] for rec in records} == {r}
        steps_logged[r] = [rec["step"] for rec in records if rec["type"] == "Log"]
    assert steps_logged[0] == steps_logged[1] and steps_logged[0]


# -- control agreement ----------------------------------------------------------------


def test_a_stop_asked_on_rank_1_only_stops_both_ranks_at_the_same_step(ddp):
    got = scenario(ddp, "stop")
    for r in (0, 1):
        assert got[r]["global_step"] == 3, (r, got[r])
        assert got[r]["steps_seen"] == [1, 2, 3]
        # should_save set on rank 1 at step 2: the checkpoint was written (once, by
        # rank 0) with every rank taking part.
        assert got[r]["checkpoints"] == ["checkpoint-2"]


def test_sigterm_on_one_rank_stops_every_rank_at_the_same_step(ddp):
    got = scenario(ddp, "resume")
    for r in (0, 1):
        assert got[r]["interrupted"] is not None, f"rank {r} did not stop"
        assert got[r]["interrupted"]["step"] == 3
        assert got[r]["interrupted"]["checkpoint"].endswith("checkpoint-3")
    # Rank 0 wrote the checkpoint; each rank its own RNG state.
    files = got[0]["checkpoint_files"]
    assert {"pytorch_model.bin", "optimizer.pt", "trainer_state.json", "rng_state_0.pth", "rng_state_1.pth"} <= set(files)


def test_resume_under_two_ranks_continues_the_run(ddp):
    got = scenario(ddp, "resume")
    match = scenario(ddp, "match")
    for r in (0, 1):
        assert got[r]["global_step"] == worker.MAX_STEPS
        # Resumed from step 3 (each rank its own data shard and RNG state): the end
        # matches the uninterrupted run.
        assert _max_diff(got[r]["params"], match[r]["params"]) < 1e-6
        resumed = _logs_by_step(got[r]["logs"], "loss")
        full = _logs_by_step(match[r]["logs"], "loss")
        for step in (6, 8):  # logging windows that began after the resume
            assert math.isclose(resumed[step], full[step], rel_tol=1e-5)
        assert got[r]["run_ids"][0] == got[r]["run_ids"][1]  # sinks continue the same run


def test_a_flag_set_in_on_log_on_one_rank_is_acted_on_by_every_rank(ddp):
    got = scenario(ddp, "onlog_flags")
    for r in (0, 1):
        assert got[r]["global_step"] == 4
        # should_save from on_log at step 2 and should_evaluate at step 4, on rank 1
        # only: every rank took part (the checkpoint's and evaluation's collectives).
        assert got[r]["saved"] == [2] and got[r]["evaluated"] == [4], got[r]
        assert got[r]["checkpoints"] == ["checkpoint-2"]


def test_a_rank_failing_mid_save_leaves_no_checkpoint_it_cannot_resume_from(ddp):
    got = scenario(ddp, "save_fails")
    assert "No space left on device" in got[1]["raised"]
    assert got[0]["raised"] is not None and "another rank failed" in got[0]["raised"]
    for r in (0, 1):
        # checkpoint-4 lacks rank 1's RNG file: never renamed into place, and its
        # staging directory is gone; checkpoint-2 holds every rank's file.
        assert got[r]["entries"] == ["checkpoint-2"], got[r]["entries"]
        assert {"rng_state_0.pth", "rng_state_1.pth", "pytorch_model.bin"} <= set(got[r]["checkpoint_2"])


def test_a_checkpoint_missing_a_rank_rng_file_resumes_with_a_warning(ddp):
    got = scenario(ddp, "rng_missing")
    for r in (0, 1):
        assert got[r]["global_step"] == 4
    assert _max_diff(got[0]["params"], got[1]["params"]) == 0.0
    assert any("rng_state_1.pth" in m for m in got[1]["warnings"]), got[1]["warnings"]
    assert not any("rng_state" in m for m in got[0]["warnings"]), got[0]["warnings"]


def test_shards_of_a_stream_of_different_lengths_end_the_epoch_together(ddp):
    got = scenario(ddp, "uneven_stream")
    for r in (0, 1):
        assert got[r]["global_step"] == 4
        # 6 and 5 batches, 2 per step: both ranks end epoch 0 after step 2 (the
        # shorter shard's last full step), then train steps 3 and 4 in epoch 1.
        assert [math.floor(e) for e in got[r]["epochs"]] == [0, 0, 1, 1], got[r]["epochs"]
    assert _max_diff(got[0]["params"], got[1]["params"]) == 0.0
    uneven = [m for m in got[0]["warnings"] if "ran out" in m]
    assert len(uneven) == 1 and "rank(s) [1]" in uneven[0] and "rank 0: 2, rank 1: 1" in uneven[0], uneven
    # A sharded stream is not taken for one that every rank reads whole...
    assert not any("same first training batch" in m for r in (0, 1) for m in got[r]["warnings"])
    # ...an unsharded one is (said once, by rank 0).
    assert any("same first training batch" in m for m in got[0]["unsharded_warnings"])
    assert not any("same first training batch" in m for m in got[1]["unsharded_warnings"])


def test_host_values_travel_over_gloo_even_when_training_uses_nccl(ddp):
    got = scenario(ddp, "host_group")
    for r in (0, 1):
        assert got[r]["side_group_backend"] == "gloo"
        assert got[r]["flags"] == [True, False, True]  # OR over ranks
        assert got[r]["broadcast"] == "from-0"
        assert got[r]["gathered"] == [0, 10]


# -- in-process pieces ------------------------------------------------------------------


def test_ddp_find_unused_parameters_reaches_distributed_data_parallel(ddp):
    """A model with a layer its forward never uses trains under two ranks with
    ddp_find_unused_parameters=True (as in transformers); without it DDP stops at the
    second step."""
    got = scenario(ddp, "unused_parameters")
    for rank in (0, 1):
        assert got[rank] == {"global_step": 3, "find_unused_parameters": True}, got[rank]


def test_shards_follow_distributed_sampler_and_keep_the_global_batch():
    single = list(_EpochBatches(40, 8, seed=3, epoch=1, shuffle=True, drop_last=False))
    shards = [
        list(_EpochBatches(40, 2, seed=3, epoch=1, shuffle=True, drop_last=False, rank=r, world_size=2)) for r in (0, 1)
    ]
    assert len(shards[0]) == len(shards[1]) == 10
    for k, batch in enumerate(single):  # one step: 2 micro-batches on each of 2 ranks
        together = shards[0][2 * k] + shards[0][2 * k + 1] + shards[1][2 * k] + shards[1][2 * k + 1]
        assert sorted(together) == sorted(batch)
    # An odd count is padded as DistributedSampler pads: equal lengths on every rank.
    odd = [_EpochBatches(41, 4, seed=0, epoch=0, shuffle=False, drop_last=False, rank=r, world_size=2) for r in (0, 1)]
    assert len(odd[0]) == len(odd[1]) == 6
    assert [i for b in odd[1] for i in b][-1] == 0  # the pad repeats the first index
    # set_epoch draws another order; skip drops the batches a resume already trained on.
    b = _EpochBatches(40, 2, seed=3, epoch=1, shuffle=True, drop_last=False, rank=1, world_size=2, skip=3)
    assert list(b) == shards[1][3:]
    b.set_epoch(2)
    assert list(b) != shards[1][3:]


def test_shard_indices_rejects_a_bad_rank():
    with pytest.raises(ValueError, match="rank must be in"):
        distributed.shard_indices(range(4), rank=2, world_size=2)
    assert distributed.shard_indices(range(5), 1, 2, pad=False) == [1, 3]


def test_interleave_restores_dataset_order():
    import numpy as np

    shares = [np.array([[0], [2], [4]]), np.array([[1], [3]])]
    assert _interleave(shares).reshape(-1).tolist() == [0, 1, 2, 3, 4]
    pair = _interleave([(np.array([0, 2]), {"a": np.array([10, 12])}), (np.array([1]), {"a": np.array([11])})])
    assert pair[0].tolist() == [0, 1, 2] and pair[1]["a"].tolist() == [10, 11, 12]


def test_single_process_starts_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert distributed.init_process_group() is False
    assert not distributed.is_initialized()
    assert distributed.broadcast_flags([True, False]) == [True, False]
    assert distributed.broadcast_object("x") == "x"
    assert distributed.gather_objects(1) == [1]


def test_a_missing_peer_fails_within_the_timeout_instead_of_hanging(monkeypatch):
    # Rank 0 of 2, and rank 1 never comes: the rendezvous gives up after the timeout.
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    start = time.monotonic()
    with pytest.raises(Exception, match="(?i)time"):
        distributed.init_process_group(timeout=2, backend="gloo")
    assert time.monotonic() - start < 120  # a generous deadline: the point is that it ends
    assert not distributed.is_initialized()


def test_a_bad_timeout_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    with pytest.raises(ValueError, match="timeout must be > 0"):
        distributed.init_process_group(timeout=0, backend="gloo")
