"""Checkpoints: ``<output_dir>/checkpoint-<step>/`` written atomically, found, checked,
loaded and rotated.

One checkpoint holds everything a resumed run needs to continue exactly where the
interrupted one stopped:

- ``pytorch_model.bin``: the model's ``state_dict``
- ``optimizer.pt`` and ``scheduler.pt``: their ``state_dict``s
- ``rng_state.pth``: the python, numpy and torch (CPU and CUDA) generator states
- ``trainer_state.json``: transformers' format, including the stateful callbacks
- ``run_info.json``: the event bus run id, so that sinks continue the same run

Everything is loaded with ``torch.load(weights_only=True)``: the RNG states are saved
as tuples, lists and tensors (not numpy objects) so that no pickle is ever needed.

What transformers' ``Trainer`` reads and writes is laid out the same way, so a
checkpoint directory moves between the two when the model, the optimizer (AdamW with
the same parameter groups) and the schedule are the same: ``rng_state.pth`` holds
the python state as ``random.getstate()`` returns it and the numpy state in a form
``np.random.set_state`` takes, which transformers loads; a transformers checkpoint's
``model.safetensors`` (read with the ``safetensors`` package, which transformers
installs) stands in for ``pytorch_model.bin``, and its ``rng_state.pth`` (numpy
arrays inside) is read with the same numpy allowlist transformers uses.

A checkpoint is written into ``checkpoint-<step>.tmp-<pid>`` and renamed into place,
so a crash mid-save never leaves a half-written ``checkpoint-<step>`` that a resume
would pick up. Distributed, every rank writes its ``rng_state_<rank>.pth`` into that
staging directory and the ranks agree that all of them did before rank 0 renames it.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

__all__ = [
    "PREFIX_CHECKPOINT_DIR",
    "WEIGHTS_NAME",
    "SAFE_WEIGHTS_NAME",
    "OPTIMIZER_NAME",
    "SCHEDULER_NAME",
    "RNG_STATE_NAME",
    "TRAINER_STATE_NAME",
    "RUN_INFO_NAME",
    "REQUIRED_FILES",
    "CheckpointError",
    "checkpoint_path",
    "sorted_checkpoints",
    "get_last_checkpoint",
    "rotate_checkpoints",
    "check_checkpoint",
    "rng_state_name",
    "required_files",
    "save_model_weights",
    "load_model_weights",
    "save_rng_state",
    "load_rng_state",
    "save_torch",
    "load_torch",
    "write_run_info",
    "read_run_info",
    "staging_dir",
    "commit_staging_dir",
]

PREFIX_CHECKPOINT_DIR = "checkpoint"
WEIGHTS_NAME = "pytorch_model.bin"
SAFE_WEIGHTS_NAME = "model.safetensors"
"""transformers' default weights file: read (when ``pytorch_model.bin`` is absent), never written."""
OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"
RNG_STATE_NAME = "rng_state.pth"
TRAINER_STATE_NAME = "trainer_state.json"
RUN_INFO_NAME = "run_info.json"

REQUIRED_FILES: tuple[str, ...] = (WEIGHTS_NAME, TRAINER_STATE_NAME, OPTIMIZER_NAME, SCHEDULER_NAME, RNG_STATE_NAME)
"""What :func:`check_checkpoint` insists on before a resume."""

_RE_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


class CheckpointError(FileNotFoundError):
    """A checkpoint directory is missing, incomplete or unreadable; the message names
    the directory, what is missing and how to fix it."""


def checkpoint_path(output_dir: str | os.PathLike[str], step: int) -> str:
    """``<output_dir>/checkpoint-<step>``."""
    return os.path.join(os.fspath(output_dir), f"{PREFIX_CHECKPOINT_DIR}-{step}")


def sorted_checkpoints(output_dir: str | os.PathLike[str]) -> list[str]:
    """Checkpoint directories under ``output_dir``, oldest (lowest step) first.

    Ordered by step number, never by mtime: mtimes are unreliable on network and
    fuse filesystems, and the step is what a resume means by "latest".
    """
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found: list[tuple[int, str]] = []
    for child in root.iterdir():
        m = _RE_CHECKPOINT.match(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), str(child)))
    return [p for _, p in sorted(found)]


def get_last_checkpoint(output_dir: str | os.PathLike[str]) -> str | None:
    """The checkpoint with the highest step under ``output_dir``, or ``None``."""
    ckpts = sorted_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def rotate_checkpoints(
    output_dir: str | os.PathLike[str],
    save_total_limit: int | None,
    best_model_checkpoint: str | None = None,
    current: str | os.PathLike[str] | None = None,
) -> list[str]:
    """Delete old checkpoints so that at most ``save_total_limit`` remain.

    Never deletes the most recent checkpoint (a resume needs it) nor the best one
    (``load_best_model_at_end`` needs it); when both must be kept and the limit is 1,
    two remain, as in transformers. Returns the deleted paths.

    ``current`` is the checkpoint just written: it is the most recent one (as
    transformers, which protects the newest by mtime), even when directories with a
    higher step exist. Those are left by an abandoned run (this run resumed from an
    earlier checkpoint and has not reached their step), so they are deleted first,
    then the others, lowest step first: a later ``resume_from_checkpoint=True``,
    which picks the highest step, then finds this run's latest checkpoint, not a
    stale one. Without ``current``, the highest step counts as the most recent.
    """
    if save_total_limit is None or save_total_limit <= 0:
        return []
    ckpts = sorted_checkpoints(output_dir)
    if len(ckpts) <= save_total_limit:
        return []
    newest = ckpts[-1]
    if current is not None and os.path.isdir(current):
        newest = os.fspath(current)
        m = _RE_CHECKPOINT.match(os.path.basename(os.path.normpath(newest)))
        if m is not None:
            step = int(m.group(1))
            # Past the checkpoint just saved: stale, deleted first (sort is stable).
            ckpts.sort(key=lambda p: not _step_of(p) > step)
    protected = {os.path.realpath(newest)}
    if best_model_checkpoint is not None:
        protected.add(os.path.realpath(best_model_checkpoint))
    keep = max(save_total_limit, len(protected))
    remaining = len(ckpts)
    deleted: list[str] = []
    for ckpt in ckpts:
        if remaining <= keep:
            break
        if os.path.realpath(ckpt) in protected:
            continue
        shutil.rmtree(ckpt, ignore_errors=True)
        deleted.append(ckpt)
        remaining -= 1
    return deleted


def _step_of(path: str) -> int:
    m = _RE_CHECKPOINT.match(os.path.basename(path))
    return int(m.group(1)) if m else -1


def rng_state_name(rank: int = 0, world_size: int = 1) -> str:
    """The RNG file of ``rank``: ``rng_state.pth`` in a single process,
    ``rng_state_<rank>.pth`` when distributed (as transformers)."""
    return RNG_STATE_NAME if world_size <= 1 else f"rng_state_{rank}.pth"


def required_files(rank: int = 0, world_size: int = 1) -> tuple[str, ...]:
    """What a checkpoint must hold for ``rank`` to resume from it."""
    return tuple(rng_state_name(rank, world_size) if f == RNG_STATE_NAME else f for f in REQUIRED_FILES)


def _has_file(directory: str, name: str) -> bool:
    if os.path.isfile(os.path.join(directory, name)):
        return True
    # transformers' checkpoints hold model.safetensors instead of pytorch_model.bin.
    return name == WEIGHTS_NAME and os.path.isfile(os.path.join(directory, SAFE_WEIGHTS_NAME))


def check_checkpoint(path: str | os.PathLike[str], required: Iterable[str] = REQUIRED_FILES) -> str:
    """Return ``path`` as a string if it is a complete checkpoint, else raise
    :class:`CheckpointError` naming every missing file. ``model.safetensors``
    (transformers' checkpoints) stands in for ``pytorch_model.bin``."""
    p = os.fspath(path)
    if not os.path.isdir(p):
        raise CheckpointError(
            f"checkpoint directory {p!r} does not exist; pass a checkpoint-<step> directory written by "
            "Trainer, or resume_from_checkpoint=True to pick the latest one in output_dir"
        )
    missing = [
        f"{name} (or {SAFE_WEIGHTS_NAME})" if name == WEIGHTS_NAME else name
        for name in required
        if not _has_file(p, name)
    ]
    if missing and _model_only(p):
        raise CheckpointError(
            f"checkpoint directory {p!r} holds the model and the trainer state only (written with "
            "save_only_model=True): it has no optimizer, scheduler or RNG states, so training cannot resume from it. "
            "Load its weights into the model (trainer.checkpoint.load_model_weights(model, path)) and start a new "
            "run, or resume from a checkpoint written with save_only_model=False"
        )
    if missing:
        raise CheckpointError(
            f"checkpoint directory {p!r} is incomplete: missing {', '.join(missing)}. "
            "It was probably cut short by a crash or copied partially; resume from an earlier "
            "checkpoint-<step> directory instead"
        )
    return p


def _model_only(directory: str) -> bool:
    """Whether ``directory`` is a whole checkpoint written with ``save_only_model``:
    the weights and the trainer state, and none of the states a resume needs."""
    if not (_has_file(directory, WEIGHTS_NAME) and _has_file(directory, TRAINER_STATE_NAME)):
        return False
    names = os.listdir(directory)
    rng = os.path.splitext(RNG_STATE_NAME)[0]  # rng_state.pth, rng_state_<rank>.pth
    return not any(n in (OPTIMIZER_NAME, SCHEDULER_NAME) or n.startswith(rng) for n in names)


def save_torch(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` with a flush to disk, so a crash right after leaves a whole file."""
    with open(path, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


def load_torch(path: str | os.PathLike[str]) -> Any:
    """``torch.load(weights_only=True)`` onto the CPU, with a clear error on a bad file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {os.fspath(path)!r} is missing") from None
    except Exception as exc:
        raise CheckpointError(
            f"could not read checkpoint file {os.fspath(path)!r} ({type(exc).__name__}: {exc}); "
            "the file is corrupt or was not written by this Trainer"
        ) from exc


def save_model_weights(model: torch.nn.Module, directory: str | os.PathLike[str]) -> str:
    """Write the model's ``state_dict`` to ``directory/pytorch_model.bin``."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(os.fspath(directory), WEIGHTS_NAME)
    # Contiguous CPU copies: loadable on any device, no storage sharing surprises.
    state = {k: v.detach().cpu().contiguous() if isinstance(v, torch.Tensor) else v for k, v in model.state_dict().items()}
    save_torch(state, path)
    return path


def load_model_weights(model: torch.nn.Module, directory: str | os.PathLike[str], strict: bool = True) -> None:
    """Load ``directory/pytorch_model.bin`` into ``model`` (``weights_only=True``), or,
    when there is none, transformers' ``model.safetensors``."""
    path = os.path.join(os.fspath(directory), WEIGHTS_NAME)
    safe_path = os.path.join(os.fspath(directory), SAFE_WEIGHTS_NAME)
    if os.path.isfile(path):
        state = load_torch(path)
    elif os.path.isfile(safe_path):
        path = safe_path
        state = _load_safetensors(safe_path)
    else:
        raise CheckpointError(
            f"checkpoint directory {os.fspath(directory)!r} has no model weights ({WEIGHTS_NAME} or {SAFE_WEIGHTS_NAME})"
        )
    try:
        model.load_state_dict(state, strict=strict)
    except RuntimeError as exc:
        raise CheckpointError(
            f"the weights in {path!r} do not fit this model: {exc}. Resume with the same model architecture"
        ) from exc


def _load_safetensors(path: str) -> dict[str, Any]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(
            f"{path!r} is a safetensors file (a transformers checkpoint) and the safetensors package is not "
            "installed; pip install safetensors"
        ) from None
    try:
        return load_file(path, device="cpu")
    except Exception as exc:
        raise CheckpointError(f"could not read checkpoint file {path!r} ({type(exc).__name__}: {exc})") from exc


def _rng_states(world_size: int = 1) -> dict[str, Any]:
    import numpy as np

    np_state = np.random.get_state()
    states: dict[str, Any] = {
        # Tuples, lists and tensors only: loadable with weights_only=True, no numpy
        # pickles. The python state is random.getstate()'s tuple and the numpy one a
        # list np.random.set_state takes, so transformers' Trainer restores them too.
        "python": random.getstate(),
        "numpy": [
            str(np_state[0]),
            torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "cpu": torch.random.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # As transformers: the current device's state in a single process, every
        # device's (a list) when distributed.
        states["cuda"] = torch.cuda.random.get_rng_state() if world_size <= 1 else torch.cuda.random.get_rng_state_all()
    return states


def save_rng_state(directory: str | os.PathLike[str], rank: int = 0, world_size: int = 1) -> str:
    """Save the python, numpy and torch generator states (one file per rank when
    distributed: ``rng_state_<rank>.pth``)."""
    os.makedirs(directory, exist_ok=True)
    name = rng_state_name(rank, world_size)
    path = os.path.join(os.fspath(directory), name)
    save_torch(_rng_states(world_size), path)
    return path


def _numpy_safe_globals() -> Any:
    """transformers' allowlist for the numpy arrays in its ``rng_state.pth``
    (``trainer_pt_utils.safe_globals``); a no-op context where torch has none."""
    import contextlib

    import numpy as np

    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is None:  # torch < 2.5
        return contextlib.nullcontext()
    np_core = getattr(np, "_core", None) or np.core
    return safe_globals([np_core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))])


def load_rng_state(
    directory: str | os.PathLike[str], rank: int = 0, world_size: int = 1, missing_ok: bool = False
) -> bool:
    """Restore what :func:`save_rng_state` saved, or what transformers' ``Trainer``
    saved (its numpy state is a numpy array, loaded with transformers' allowlist).

    Returns whether a state was restored: with ``missing_ok`` an absent file leaves
    the generators as they are and returns ``False`` (as transformers does for a
    missing ``rng_state_<rank>.pth``); otherwise it is a :class:`CheckpointError`."""
    import numpy as np

    name = rng_state_name(rank, world_size)
    path = os.path.join(os.fspath(directory), name)
    if missing_ok and not os.path.isfile(path):
        return False
    with _numpy_safe_globals():
        states = load_torch(path)
    try:
        version, internal, gauss = states["python"]
        random.setstate((int(version), tuple(int(x) for x in internal), gauss))
        kind, keys, pos, has_gauss, cached = states["numpy"]
        keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)
        np.random.set_state((kind, keys.astype(np.uint32), int(pos), int(has_gauss), float(cached)))
        torch.random.set_rng_state(states["cpu"])
        if "cuda" in states and torch.cuda.is_available():
            cuda_states = states["cuda"]
            if isinstance(cuda_states, torch.Tensor):  # one device's state (a single process)
                torch.cuda.random.set_rng_state(cuda_states)
            elif len(cuda_states) == torch.cuda.device_count():
                torch.cuda.random.set_rng_state_all(cuda_states)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"the RNG state in {os.fspath(directory)!r} is malformed ({exc!r})") from exc
    return True


def write_run_info(directory: str | os.PathLike[str], info: Mapping[str, Any]) -> None:
    """Write ``run_info.json`` (the bus run id and friends) into a checkpoint."""
    with open(os.path.join(os.fspath(directory), RUN_INFO_NAME), "w", encoding="utf-8") as fh:
        json.dump(dict(info), fh, indent=2, sort_keys=True)


def read_run_info(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``run_info.json`` from a checkpoint; ``{}`` when it is absent or unreadable
    (checkpoints written by transformers have none)."""
    path = os.path.join(os.fspath(directory), RUN_INFO_NAME)
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


_STAGING = re.compile(r"^checkpoint-\d+\.tmp-(\d+)$")


def staging_dir(final: str) -> str:
    """A fresh temporary sibling of ``final`` to write a checkpoint into. Staging
    directories that a process killed while writing a checkpoint left beside it
    (``checkpoint-<step>.tmp-<pid>`` of a process no longer running on this machine)
    are removed first: they are never a checkpoint a resume could use."""
    tmp = f"{final}.tmp-{os.getpid()}"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    _remove_stale_staging(os.path.dirname(final) or ".")
    os.makedirs(tmp)
    return tmp


def _remove_stale_staging(parent: str) -> None:
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        m = _STAGING.match(name)
        if m is None or int(m.group(1)) == os.getpid() or process_alive(int(m.group(1))):
            continue
        shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (one of another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def commit_staging_dir(tmp: str, final: str) -> str:
    """Move a fully written staging directory to ``final`` (replacing an older one)."""
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final
