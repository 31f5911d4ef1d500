"""Control callbacks with transformers' API, and the handler that dispatches them and
publishes every hook to the event bus.

A callback written for transformers' ``Trainer`` runs here unchanged: the same hooks,
the same positional ``(args, state, control)`` and keyword arguments (``model``,
``processing_class``, ``optimizer``, ``lr_scheduler``, ``train_dataloader``,
``eval_dataloader``; ``metrics`` for ``on_evaluate``/``on_predict``, ``logs`` for
``on_log``), and a returned control (or ``None``) with the same meaning.

What differs is the cost of the hooks called on every step (:data:`BOUND_HOOKS`):
:class:`CallbackHandler` binds them when a callback is added (a tuple of the bound
methods of the callbacks that implement each one, rebuilt when the callback list
changes), so a callback is never called for a hook it does not implement, and a
per-step hook nobody implements costs nothing. A per-step hook replaced on a callback
after it was added (assigned, or patched with ``unittest.mock``) is seen after
:meth:`CallbackHandler.refresh`. Every other hook, and any event name given to
:meth:`CallbackHandler.call_event`, is looked up on every callback at each call, as
transformers does, so patching those needs nothing. Each hook's event is built and
published only when a sink subscribes to it (decided once, in
:meth:`CallbackHandler.set_bus`).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import sys
import time
from typing import Any, Callable, Iterable, Mapping, SupportsIndex

from eventbus.events import (
    HOOK_EVENTS,
    EpochBegin,
    EpochEnd,
    Evaluate,
    InitEnd,
    Log,
    OptimizerStep,
    Predict,
    PredictionStep,
    PreOptimizerStep,
    PushBegin,
    Save,
    StepBegin,
    StepEnd,
    SubstepEnd,
    TrainBegin,
    TrainEnd,
)
from eventbus.redact import redact, redact_str
from eventbus.values import Snapshot, plain_array, resolve, snapshot
from trainer.state import CallbackStateError, TrainerControl, TrainerState, _add_state, is_exportable, load_state_into

__all__ = ["TrainerCallback", "CallbackHandler", "HOOKS", "STEP_HOOKS", "BOUND_HOOKS", "ignores_kwargs"]

_monotonic = time.monotonic  # one lookup per sampled StepEnd (tests replace it)

logger = logging.getLogger("trainer")

HOOKS: tuple[str, ...] = (
    "on_init_end",
    "on_train_begin",
    "on_train_end",
    "on_epoch_begin",
    "on_epoch_end",
    "on_step_begin",
    "on_pre_optimizer_step",
    "on_optimizer_step",
    "on_substep_end",
    "on_step_end",
    "on_evaluate",
    "on_predict",
    "on_save",
    "on_log",
    "on_prediction_step",
    "on_push_begin",
)
"""Every callback hook, in the order transformers declares them."""
if set(HOOKS) != set(HOOK_EVENTS):  # pragma: no cover - a development-time invariant
    raise ImportError("trainer.callbacks.HOOKS and eventbus.events.HOOK_EVENTS must name the same hooks")

STEP_HOOKS: tuple[str, ...] = ("on_step_begin", "on_substep_end", "on_pre_optimizer_step", "on_optimizer_step", "on_step_end")
"""The hooks called on every (micro-)step: the hot path."""

BOUND_HOOKS: tuple[str, ...] = (*STEP_HOOKS, "on_log", "on_prediction_step")
"""The hooks that can run on every step or batch. :class:`CallbackHandler` binds the
callbacks' methods for these when a callback is added (or the list is edited);
:meth:`CallbackHandler.refresh` re-reads them after a method was replaced on a
callback already in the list. The other hooks are looked up at every call."""
_BOUND = frozenset(BOUND_HOOKS)


class TrainerCallback:
    """A control callback: inspects the training loop at each event and may steer it
    through ``control`` (transformers' ``TrainerCallback``).

    Every hook receives ``args`` (:class:`~trainer.TrainingArguments`), ``state``
    (:class:`~trainer.TrainerState`) and ``control`` (:class:`~trainer.TrainerControl`)
    positionally, and as keywords ``model``, ``processing_class``, ``optimizer``,
    ``lr_scheduler``, ``train_dataloader``, ``eval_dataloader`` (plus ``metrics`` in
    ``on_evaluate``/``on_predict``, ``logs`` in ``on_log``, and what the loop adds:
    ``checkpoint_dir`` in ``on_save``, ``status``/``error`` in ``on_train_end``,
    ``resumed_from`` in ``on_train_begin``). Take the ones you need by name and
    accept ``**kwargs``. Change ``control`` and return it (or return ``None``).

    Callbacks run inline on the training thread: override only the hooks you need
    (the others are never called), and keep the per-step ones cheap. Observing
    without steering is better done by an event-bus sink.

    Example::

        class StopAtLoss(TrainerCallback):
            def on_evaluate(self, args, state, control, metrics=None, **kwargs):
                if metrics["eval_loss"] < 0.1:
                    control.should_training_stop = True
    """

    def on_init_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """The trainer finished its ``__init__``."""

    def on_train_begin(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """Training begins."""

    def on_train_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """Training ended."""

    def on_epoch_begin(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """An epoch begins."""

    def on_epoch_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """An epoch ended."""

    def on_step_begin(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """An optimizer step begins (with gradient accumulation, before its first batch)."""

    def on_pre_optimizer_step(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """Gradients are ready and clipped, before ``optimizer.step()``."""

    def on_optimizer_step(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """Right after ``optimizer.step()``, before the gradients are zeroed."""

    def on_substep_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """A gradient-accumulation micro-step (not the last of its step) ended."""

    def on_step_end(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """An optimizer step ended."""

    def on_evaluate(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """An evaluation ended; ``metrics`` holds its results (``eval_``-prefixed)."""

    def on_predict(self, args: Any, state: TrainerState, control: TrainerControl, metrics: Any, **kwargs: Any) -> Any:
        """A prediction run ended; ``metrics`` holds its results (``test_``-prefixed)."""

    def on_save(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """A checkpoint was saved (``checkpoint_dir`` names it)."""

    def on_log(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """Values were logged; ``logs`` holds them, as plain numbers (a class that sets
        ``accepts_tensor_logs = True`` gets the loop's loss tensors as they are)."""

    def on_prediction_step(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """An evaluation or prediction batch ended."""

    def on_push_begin(self, args: Any, state: TrainerState, control: TrainerControl, **kwargs: Any) -> Any:
        """A push of the model to a hub begins."""


_OUR_NOOPS: dict[str, Any] = {hook: TrainerCallback.__dict__[hook] for hook in HOOKS}


def overrides(callback: Any, hook: str) -> bool:
    """Whether ``callback`` implements ``hook`` (its class, or the instance itself,
    defines something other than the base class's no-op), read now.

    The no-ops of transformers' own ``TrainerCallback`` count as not implemented too,
    found by name in the class's MRO, so callbacks subclassing transformers' base
    class get the same dispatch without transformers being imported here. ``hook``
    may be any name (a custom event given to ``call_event``).
    """
    return _implementation(callback, hook) is not None


def _implementation(callback: Any, hook: str) -> Any:
    """``callback``'s ``hook`` as looked up now, or ``None`` when it has none or only
    a base class's no-op (see :func:`overrides`)."""
    method = getattr(callback, hook, None)
    if method is None or not callable(method):
        return None
    func = getattr(method, "__func__", method)
    if func is _OUR_NOOPS.get(hook):
        return None
    for klass in type(callback).__mro__:
        if klass.__name__ == "TrainerCallback" and klass.__module__.startswith("transformers"):
            if func is klass.__dict__.get(hook):
                return None
    return method


class _CallbackList(list):  # type: ignore[type-arg]
    """The handler's list of callbacks: any change rebuilds its dispatch tables, so
    code that edits ``handler.callbacks`` directly (as some transformers code does)
    stays correct."""

    def __init__(self, handler: CallbackHandler, items: Iterable[Any] = ()) -> None:
        super().__init__(items)
        self._handler = handler

    def _changed(self) -> None:
        # Only the handler's current list drives its tables (not a copy of it, nor a
        # list being rebuilt by copy/pickle before the handler is complete).
        handler = getattr(self, "_handler", None)
        if handler is not None and getattr(handler, "_callbacks", None) is self:
            handler._rebuild()

    def append(self, item: Any) -> None:
        super().append(item)
        self._changed()

    def extend(self, items: Iterable[Any]) -> None:
        super().extend(items)
        self._changed()

    def insert(self, index: SupportsIndex, item: Any) -> None:
        super().insert(index, item)
        self._changed()

    def remove(self, item: Any) -> None:
        super().remove(item)
        self._changed()

    def pop(self, index: SupportsIndex = -1) -> Any:
        item = super().pop(index)
        self._changed()
        return item

    def clear(self) -> None:
        super().clear()
        self._changed()

    def sort(self, *args: Any, **kwargs: Any) -> None:
        super().sort(*args, **kwargs)
        self._changed()

    def reverse(self) -> None:
        super().reverse()
        self._changed()

    def __setitem__(self, index: Any, value: Any) -> None:
        super().__setitem__(index, value)
        self._changed()

    def __delitem__(self, index: Any) -> None:
        super().__delitem__(index)
        self._changed()

    def __iadd__(self, items: Iterable[Any]) -> _CallbackList:  # type: ignore[override]
        super().__iadd__(items)
        self._changed()
        return self

    def __imul__(self, n: SupportsIndex) -> _CallbackList:  # type: ignore[override]
        super().__imul__(n)
        self._changed()
        return self


def _timed(fn: Callable[..., Any], cell: list[float]) -> Callable[..., Any]:
    perf = time.perf_counter

    def call(*args: Any, **kwargs: Any) -> Any:
        t0 = perf()
        try:
            return fn(*args, **kwargs)
        finally:
            cell[0] += 1
            cell[1] += perf() - t0

    return call


def ignores_kwargs(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a hook that reads none of its keyword arguments (``model``,
    ``optimizer``, ..., ``logs``, ``metrics``): the handler then calls it with
    ``(args, state, control)`` alone, which saves building six keyword arguments on
    every step. Only for hooks whose body, and any override's ``super()`` call,
    needs nothing from ``**kwargs``."""
    fn.__eventbus_ignores_kwargs__ = True  # type: ignore[attr-defined]
    return fn


_HANDLER_OBJECTS = ("model", "processing_class", "optimizer", "lr_scheduler", "train_dataloader", "eval_dataloader")


def _handler_object(name: str) -> property:
    """A handler attribute passed to every callback as a keyword argument; setting
    it updates the keyword dictionary the hooks pass on."""

    def get(self: CallbackHandler) -> Any:
        return self._objects[name]

    def set_(self: CallbackHandler, value: Any) -> None:
        self._objects[name] = value

    return property(get, set_, doc=f"Passed to every callback as ``{name}=``.")


class CallbackHandler(TrainerCallback):
    """Calls the control callbacks in order and publishes each hook to the bus.

    Hook lookup: the per-step hooks (:data:`BOUND_HOOKS`: ``on_step_begin``,
    ``on_pre_optimizer_step``, ``on_optimizer_step``, ``on_substep_end``,
    ``on_step_end``, ``on_log``, ``on_prediction_step``) are bound when a callback is
    added or the list is edited, for speed: a method replaced on a callback already
    in the list (assigned to the instance or class, ``mock.patch.object``) is called
    only after :meth:`refresh`. Every other hook, and any name given to
    :meth:`call_event`, is looked up on every callback at each call, as
    transformers does, so patching them needs no refresh. Either way a callback
    whose hook is missing or the base class's no-op is not called.

    Same constructor, attributes and methods as transformers' ``CallbackHandler``
    (``callbacks``, ``add_callback``, ``pop_callback``, ``remove_callback``,
    ``callback_list``, one method per hook, the control resets), plus:

    - ``bus``/:meth:`set_bus`: the :class:`~eventbus.EventBus` that hooks publish to;
      each hook builds its event only if a sink subscribes to its type.
    - :meth:`export_callback_states`/:meth:`restore_callback_states`: stateful
      callbacks in checkpoints, restored into the same instances.
    - ``profile``: when set, time spent per (callback class, hook) is recorded for
      :meth:`profile_report`; when not set it costs nothing.
    - ``logs_are_fresh``: set by the trainer, whose logged tensors are new results it
      never modifies in place; the ``Log`` event then keeps CPU tensors as they are
      instead of copying them (no torch call on the training thread). Off by default:
      a tensor handed to ``on_log`` by other code is copied, so later in-place changes
      do not alter what was published. ``logs`` given as an
      :class:`eventbus.values.Snapshot` (what the trainer passes on the CPU) are
      handed over, nothing in them looked at: the bus builds the ``Log`` event from
      that very mapping on its own thread (:meth:`EventBus.publish_log
      <eventbus.EventBus.publish_log>`), so the caller must not change it
      afterwards, and ``on_log`` callbacks get a plain-dict copy of it, whose
      changes do not reach the event. (A bus without ``publish_log`` gets a
      ``Log`` with a copy of the mapping, as for any other ``logs``.)
    - ``log_record``: set by the trainer around ``on_log``, the ``state.log_history``
      entry recording those logs: once the bus thread has read a logged tensor, it
      writes the number into that entry in its place (see ``EventBus.publish_log``),
      so ``log_history`` holds no tensor (nor device memory) for long.
    - ``on_log`` callbacks get plain Python numbers in ``logs``, as transformers'
      Trainer gives them (it calls ``.item()`` on each loss): a tensor left in
      ``logs`` is read on the training thread first (for an accelerator tensor, a
      device sync, paid only when such a callback exists). A callback whose class
      sets ``accepts_tensor_logs = True`` takes tensors as they are (ours: the
      progress bar and the printer, which read them off the training thread); when
      every ``on_log`` callback does, nothing is read (:attr:`wants_plain_logs`).

    The loop passes extra keyword arguments that reach callbacks and events alike:
    ``checkpoint_dir`` and ``is_best`` (``on_save``), ``status`` and ``error``
    (``on_train_end``), ``resumed_from`` (``on_train_begin``), ``batch_index``,
    ``num_batches`` and ``phase`` (``on_prediction_step``), ``metric_key_prefix``
    (``on_evaluate``/``on_predict``).
    """

    def __init__(
        self,
        callbacks: Iterable[Any],
        model: Any,
        processing_class: Any,
        optimizer: Any,
        lr_scheduler: Any,
        bus: Any = None,
    ) -> None:
        self._profile = False
        self.logs_are_fresh = False
        self.log_record: dict[str, Any] | None = None
        self._plain_logs = False
        self._objects: dict[str, Any] = dict.fromkeys(_HANDLER_OBJECTS)
        self._timings: dict[tuple[str, str], list[float]] = {}
        self._callbacks = _CallbackList(self)
        self._rebuild()
        for cb in callbacks:
            self.add_callback(cb)
        self.model = model
        self.processing_class = processing_class
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.set_bus(bus)

        from trainer.flow import DefaultFlowCallback  # flow imports this module

        if not any(isinstance(cb, DefaultFlowCallback) for cb in self._callbacks):
            logger.warning(
                "The trainer will not log, evaluate or save on schedule without a DefaultFlowCallback in its "
                "callbacks; add one with add_callback(DefaultFlowCallback). The current callbacks are:\n%s",
                self.callback_list,
            )

    model = _handler_object("model")
    processing_class = _handler_object("processing_class")
    optimizer = _handler_object("optimizer")
    lr_scheduler = _handler_object("lr_scheduler")
    train_dataloader = _handler_object("train_dataloader")
    eval_dataloader = _handler_object("eval_dataloader")

    # -- the callback list ----------------------------------------------------------

    @property
    def callbacks(self) -> list[Any]:
        """The callbacks, in call order. Editing this list updates the dispatch tables."""
        return self._callbacks

    @callbacks.setter
    def callbacks(self, value: Iterable[Any]) -> None:
        self._callbacks = _CallbackList(self, value)
        self._rebuild()

    def add_callback(self, callback: Any) -> None:
        """Append a callback instance, or an instance of a callback class (built with
        no arguments). A second callback of a class already present is added with a
        warning, as in transformers."""
        cb = callback() if isinstance(callback, type) else callback
        cb_class = callback if isinstance(callback, type) else type(callback)
        if any(_same_kind(type(c), cb_class) for c in self._callbacks):
            logger.warning(
                "You are adding a %s to the callbacks of this trainer, but there is already one. The current list of "
                "callbacks is:\n%s",
                cb_class.__name__,
                self.callback_list,
            )
        self._callbacks.append(cb)

    def pop_callback(self, callback: Any) -> Any:
        """Remove and return the first callback of class ``callback`` (or equal to the
        instance ``callback``); ``None`` when there is none. transformers' own
        ``DefaultFlowCallback``, ``ProgressCallback``, ``PrinterCallback`` and
        ``EarlyStoppingCallback`` name ours too (code written for transformers removes
        the printer with ``remove_callback(transformers.PrinterCallback)``)."""
        if isinstance(callback, type):
            for cb in self._callbacks:
                if _is_kind(cb, callback):
                    self._callbacks.remove(cb)
                    return cb
        else:
            for cb in self._callbacks:
                if cb == callback:
                    self._callbacks.remove(cb)
                    return cb
        return None

    def remove_callback(self, callback: Any) -> None:
        """Remove the first callback of class ``callback`` (nothing if there is none;
        transformers' counterparts of ours name ours too, see :meth:`pop_callback`), or
        the instance ``callback`` (a ``ValueError`` if it is not in the list)."""
        if isinstance(callback, type):
            self.pop_callback(callback)
            return
        try:
            self._callbacks.remove(callback)
        except ValueError:
            raise ValueError(
                f"{callback!r} is not one of this trainer's callbacks ({self.callback_list.replace(chr(10), ', ')})"
            ) from None

    @property
    def callback_list(self) -> str:
        """The callbacks' class names, one per line."""
        return "\n".join(type(cb).__name__ for cb in self._callbacks)

    def dispatch_table(self, hook: str) -> tuple[Any, ...]:
        """The callbacks called for ``hook``, in order: those that implement it (for
        :data:`BOUND_HOOKS` as bound at the last rebuild, for the others as of now)."""
        if hook not in _OUR_NOOPS:
            raise ValueError(f"unknown hook {hook!r}; hooks are {', '.join(HOOKS)}")
        if hook in _BOUND:
            return self._tables[hook]
        return tuple(cb for cb in self._callbacks if overrides(cb, hook))

    def _rebuild(self) -> None:
        # One tuple of (callable, ignores kwargs) per per-step hook, stored as an
        # attribute (_d_<hook>) so the hook methods read it with a single attribute
        # lookup. The other hooks are looked up at each call (_call_live).
        tables: dict[str, tuple[Any, ...]] = {}
        for hook in BOUND_HOOKS:
            cbs = tuple(cb for cb in self._callbacks if overrides(cb, hook))
            tables[hook] = cbs
            fns = []
            for cb in cbs:
                method = getattr(cb, hook)
                lean = getattr(method, "__eventbus_ignores_kwargs__", False) is True
                if self._profile:
                    method = _timed(method, self._timings.setdefault((type(cb).__name__, hook), [0, 0.0]))
                fns.append((method, lean))
            setattr(self, "_d_" + hook, tuple(fns))
        self._tables = tables
        # on_step_end's callables when every one takes (args, state, control) alone:
        # called without _call's frame (~0.1 µs a step); None sends it through _call.
        step_end = self._d_on_step_end
        self._l_on_step_end = tuple(fn for fn, _ in step_end) if all(lean for _, lean in step_end) else None
        self._plain_history = any(not _reads_no_history(cb) for cb in self._callbacks)
        self._plain_logs = any(not getattr(cb, "accepts_tensor_logs", False) for cb in tables.get("on_log", ()))

    def refresh(self) -> None:
        """Re-read the per-step hooks (:data:`BOUND_HOOKS`) of every callback.

        Those are bound when a callback is added (or the list is edited); call this
        after replacing one of them on a callback already in the list (assigning a
        method to the instance or its class, ``mock.patch.object(cb, "on_log")``),
        and again after the patch is undone. The other hooks are looked up at every
        call and need no refresh."""
        self._rebuild()

    # -- profiling ------------------------------------------------------------------

    @property
    def profile(self) -> bool:
        """Record time per (callback class, hook). Off by default; when off the
        dispatch tables hold the callbacks' own methods, so it costs nothing."""
        return self._profile

    @profile.setter
    def profile(self, on: bool) -> None:
        self._profile = bool(on)
        self._rebuild()

    def profile_report(self) -> dict[tuple[str, str], dict[str, float]]:
        """``{(callback class name, hook): {"calls", "total_s", "mean_s"}}`` for every
        callback call made while :attr:`profile` was on."""
        out = {}
        for key, (n, total) in self._timings.items():
            if n:
                out[key] = {"calls": int(n), "total_s": total, "mean_s": total / n}
        return out

    # -- the bus ---------------------------------------------------------------------

    @property
    def bus(self) -> Any:
        """The event bus hooks publish to, or ``None``."""
        return self._bus

    def set_bus(self, bus: Any) -> None:
        """Publish hooks to ``bus`` (``None``: publish nothing). Which hooks build an
        event is decided here from ``bus.wants``: attach the bus's sinks first."""
        self._bus = bus
        # EventBus.publish_log, where the bus has it (a stand-in bus may not).
        self._publish_log = getattr(bus, "publish_log", None)
        self._run_id = bus.run.run_id if bus is not None else ""
        self._rank = bus.run.rank if bus is not None else 0
        for hook, event_type in HOOK_EVENTS.items():
            setattr(self, "_p_" + hook, bus is not None and bool(bus.wants(event_type)))
        # When every sink of StepEnd samples it (a progress bar), one per interval.
        sample = getattr(bus, "sample_interval", None) if self._p_on_step_end else None
        self._step_end_every = float(sample(StepEnd)) if sample is not None else 0.0
        self._step_end_due = 0.0

    def publishes(self, hook: str) -> bool:
        """Whether ``hook`` currently builds and publishes its event."""
        return bool(getattr(self, "_p_" + hook))

    @property
    def publishes_log(self) -> bool:
        """``publishes("on_log")``, without building the attribute's name (the trainer
        asks it on every logged step)."""
        return self._p_on_log

    # -- stateful callbacks ------------------------------------------------------------

    def export_callback_states(self, control: Any = None) -> dict[str, Any]:
        """The states of every stateful callback (and of ``control`` when given), in
        the format of ``TrainerState.stateful_callbacks``: class name -> state, or a
        list of states in callback order when several callbacks share a class."""
        states: dict[str, Any] = {}
        for cb in [*self._callbacks, *([control] if control is not None else [])]:
            if is_exportable(cb):
                _add_state(states, type(cb).__name__, cb.state())
        return states

    def restore_callback_states(self, states: Mapping[str, Any] | None, control: Any = None) -> list[str]:
        """Load checkpointed ``states`` into the callbacks already in the list (and into
        ``control`` when given), in place: each keeps its place and keeps receiving
        events. Several callbacks of one class get their states in order; a stateful
        callback the checkpoint has no state for starts fresh; states whose class is
        no longer among the callbacks are ignored with a warning (as transformers).

        Returns the class names whose states were ignored.
        """
        if not states:
            return []
        if not isinstance(states, Mapping):
            raise CallbackStateError(
                f"stateful_callbacks must map callback class names to states, got {type(states).__name__}"
            )
        targets = [cb for cb in [*self._callbacks, *([control] if control is not None else [])] if is_exportable(cb)]
        ignored: list[str] = []
        for name, data in states.items():
            same = [cb for cb in targets if type(cb).__name__ == name]
            if not same:
                ignored.append(name)
                continue
            items = data if isinstance(data, list) else [data]
            for cb, item in zip(same, items):
                if cb is not control:
                    item = _with_current_args(cb, item)
                if hasattr(cb, "load_state"):
                    cb.load_state(item)
                else:
                    load_state_into(cb, item)
            if len(items) > len(same):
                logger.warning(
                    "the checkpoint holds %d states of %s but %d such callbacks are present; the extra states are ignored",
                    len(items), name, len(same),
                )
            elif len(same) > len(items):
                logger.info("%d new %s callback(s) not in the checkpoint start fresh", len(same) - len(items), name)
        if ignored:
            logger.warning(
                "The checkpoint holds states of callbacks that are not in the current configuration; ignoring "
                "them: %s",
                ", ".join(ignored),
            )
        return ignored

    # -- dispatch ---------------------------------------------------------------------

    def _call(
        self, fns: tuple[tuple[Callable[..., Any], bool], ...], args: Any, state: Any, control: Any, kwargs: dict[str, Any]
    ) -> Any:
        objects = self._objects
        for fn, lean in fns:
            if lean:
                result = fn(args, state, control)
            elif kwargs:
                result = fn(args, state, control, **objects, **kwargs)
            else:
                result = fn(args, state, control, **objects)
            # A callback may return None when it did not replace the control.
            if result is not None:
                control = result
        return control

    def _call_live(self, hook: str, args: Any, state: Any, control: Any, kwargs: dict[str, Any]) -> Any:
        # The hooks that run a few times per run: looked up on every callback now,
        # as transformers does, so a hook patched after add_callback is the one called.
        objects = self._objects
        for cb in tuple(self._callbacks):
            fn = _implementation(cb, hook)
            if fn is None:
                continue
            lean = getattr(fn, "__eventbus_ignores_kwargs__", False) is True
            if self._profile:
                fn = _timed(fn, self._timings.setdefault((type(cb).__name__, hook), [0, 0.0]))
            if lean:
                result = fn(args, state, control)
            else:
                result = fn(args, state, control, **objects, **kwargs)
            # A callback may return None when it did not replace the control.
            if result is not None:
                control = result
        return control

    def call_event(self, event: str, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        """Call ``event`` on the callbacks that implement it (no control reset, no
        publishing), as transformers' method of the same name. Any name works: one
        that is not a hook (a custom event) is looked up on every callback, and
        callbacks without it are skipped."""
        if event in _BOUND:
            return self._call(getattr(self, "_d_" + event), args, state, control, kwargs)
        return self._call_live(event, args, state, control, kwargs)

    def _header(self, state: Any) -> dict[str, Any]:
        return {"run_id": self._run_id, "rank": self._rank, "step": state.global_step, "epoch": state.epoch}

    # The per-step hooks are written out: no dict, no getattr by name; nothing at all
    # when no sink subscribes and no callback implements the hook.

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        control.should_log = False
        control.should_evaluate = False
        control.should_save = False
        if self._p_on_step_begin:
            self._bus.publish(StepBegin(run_id=self._run_id, rank=self._rank, step=state.global_step, epoch=state.epoch))
        fns = self._d_on_step_begin
        if fns:
            return self._call(fns, args, state, control, kwargs)
        return control

    def on_substep_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self._p_on_substep_end:
            self._bus.publish(SubstepEnd(run_id=self._run_id, rank=self._rank, step=state.global_step, epoch=state.epoch))
        fns = self._d_on_substep_end
        if fns:
            return self._call(fns, args, state, control, kwargs)
        return control

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self._p_on_pre_optimizer_step:
            self._bus.publish(
                PreOptimizerStep(run_id=self._run_id, rank=self._rank, step=state.global_step, epoch=state.epoch)
            )
        fns = self._d_on_pre_optimizer_step
        if fns:
            return self._call(fns, args, state, control, kwargs)
        return control

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self._p_on_optimizer_step:
            self._bus.publish(
                OptimizerStep(run_id=self._run_id, rank=self._rank, step=state.global_step, epoch=state.epoch)
            )
        fns = self._d_on_optimizer_step
        if fns:
            return self._call(fns, args, state, control, kwargs)
        return control

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self._p_on_step_end:
            # Sampled (every > 0): one StepEnd per interval at most. Not sampled: the
            # clock is not read, due stays 0.0, and every step publishes.
            every = self._step_end_every
            now = _monotonic() if every else 0.0
            if now >= self._step_end_due:
                self._step_end_due = now + every
                self._bus.publish(StepEnd(run_id=self._run_id, rank=self._rank, step=state.global_step, epoch=state.epoch))
        lean = self._l_on_step_end
        if lean is None:
            return self._call(self._d_on_step_end, args, state, control, kwargs)
        # DefaultFlowCallback's hook, every step, in every trainer: called here directly.
        for fn in lean:
            result = fn(args, state, control)
            if result is not None:
                control = result
        return control

    # The other hooks run a few times per run (or per evaluation): clarity first, and
    # looked up on every callback at each call (_call_live), as transformers does.

    def on_init_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self._p_on_init_end:
            self._bus.publish(InitEnd(**self._header(state)))
        return self._call_live("on_init_end", args, state, control, kwargs)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        control.should_training_stop = False
        if self._p_on_train_begin:
            self._bus.publish(self._train_begin_event(args, state, kwargs))
        return self._call_live("on_train_begin", args, state, control, kwargs)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self._p_on_train_end:
            error = kwargs.get("error")
            if isinstance(error, BaseException):
                error = f"{type(error).__name__}: {error}"
            self._bus.publish(
                TrainEnd(
                    **self._header(state),
                    status=kwargs.get("status", "completed"),
                    error=None if error is None else str(error),
                    best_metric=state.best_metric,
                    best_model_checkpoint=state.best_model_checkpoint,
                )
            )
        return self._call_live("on_train_end", args, state, control, kwargs)

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        control.should_epoch_stop = False
        if self._p_on_epoch_begin:
            self._bus.publish(EpochBegin(**self._header(state)))
        return self._call_live("on_epoch_begin", args, state, control, kwargs)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self._p_on_epoch_end:
            self._bus.publish(EpochEnd(**self._header(state)))
        return self._call_live("on_epoch_end", args, state, control, kwargs)

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: Any, **kwargs: Any) -> Any:
        control.should_evaluate = False
        if self._p_on_evaluate:
            # A copy: a callback editing the metrics afterwards must not change (or
            # race with) what the bus thread reads.
            self._bus.publish(
                Evaluate(**self._header(state), metrics=_copy_values(metrics), prefix=kwargs.get("metric_key_prefix") or "eval")
            )
        return self._call_live("on_evaluate", args, state, control, {"metrics": metrics, **kwargs})

    def on_predict(self, args: Any, state: Any, control: Any, metrics: Any, **kwargs: Any) -> Any:
        if self._p_on_predict:
            self._bus.publish(
                Predict(**self._header(state), metrics=_copy_values(metrics), prefix=kwargs.get("metric_key_prefix") or "test")
            )
        return self._call_live("on_predict", args, state, control, {"metrics": metrics, **kwargs})

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        control.should_save = False
        if self._p_on_save:
            self._bus.publish(
                Save(
                    **self._header(state),
                    checkpoint_dir=str(kwargs.get("checkpoint_dir") or ""),
                    is_best=bool(kwargs.get("is_best", False)),
                )
            )
        return self._call_live("on_save", args, state, control, kwargs)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any, **kwargs: Any) -> Any:
        control.should_log = False
        fns = self._d_on_log
        if self._p_on_log:
            # Published before the callbacks run (transformers' reporting callbacks
            # come before user and printing callbacks, and PrinterCallback pops
            # "total_flos" from the dict). No device sync: tensors are handed over
            # or snapshotted, and the bus thread reads them.
            if type(logs) is Snapshot and self._publish_log is not None:
                # Handed over (the trainer's own CPU logs, never changed afterwards):
                # the bus builds the event from this very mapping on its thread, and
                # the callbacks get a copy, so what they change cannot reach it.
                self._publish_log(self._run_id, self._rank, state.global_step, state.epoch, logs, self.log_record)
                if fns:
                    logs = dict(logs)
            else:
                # The header written out, as in the per-step hooks: on_log can run every step.
                values = _copy_values(logs, self.logs_are_fresh)
                if self._publish_log is not None:
                    # A fresh copy, never changed afterwards: handed over as well.
                    self._publish_log(self._run_id, self._rank, state.global_step, state.epoch, values, self.log_record)
                else:
                    self._bus.publish(Log(run_id=self._run_id, rank=self._rank, step=state.global_step, epoch=state.epoch, values=values))
        if fns:
            if self.wants_plain_logs and logs:
                if not self._p_on_log and type(logs) is Snapshot:
                    logs = dict(logs)  # the trainer's: not changed in place
                _read_values(logs)
            return self._call(fns, args, state, control, {"logs": logs, **kwargs})
        return control

    @property
    def wants_plain_history(self) -> bool:
        """True when some callback may read ``state.log_history`` at any hook and expect
        numbers there, as transformers gives: every callback but the library's own
        (defined in the ``trainer`` package) and those whose class sets
        ``accepts_tensor_logs = True``. The trainer then reads its logged CPU tensors
        into the history entry as it records it (no device involved)."""
        return self._plain_history

    @property
    def wants_plain_logs(self) -> bool:
        """True when some ``on_log`` callback expects plain numbers in ``logs`` (every
        callback but those whose class sets ``accepts_tensor_logs = True``): tensors
        in ``logs`` are then read before the callbacks run. The trainer asks it too,
        and reads its logged losses before recording them in ``state.log_history``."""
        return self._plain_logs

    def on_prediction_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self._p_on_prediction_step:
            num_batches = kwargs.get("num_batches")
            self._bus.publish(
                PredictionStep(
                    **self._header(state),
                    batch_index=int(kwargs.get("batch_index", 0)),
                    num_batches=None if num_batches is None else int(num_batches),
                    phase=str(kwargs.get("phase", "eval")),
                )
            )
        return self._call(self._d_on_prediction_step, args, state, control, kwargs)

    def on_push_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self._p_on_push_begin:
            destination = kwargs.get("destination")
            self._bus.publish(PushBegin(**self._header(state), destination=None if destination is None else str(destination)))
        return self._call_live("on_push_begin", args, state, control, kwargs)

    def _train_begin_event(self, args: Any, state: Any, kwargs: Mapping[str, Any]) -> TrainBegin:
        to_dict = getattr(args, "to_dict", None)
        config = _plain(redact(to_dict())) if callable(to_dict) else {}
        sanitized = getattr(args, "to_sanitized_dict", None)
        hparams = _plain(redact(sanitized())) if callable(sanitized) else {}
        resumed_from = kwargs.get("resumed_from")
        return TrainBegin(
            **self._header(state),
            config=config,
            hparams=hparams,
            model_config=_model_config(self.model),
            max_steps=int(state.max_steps),
            num_train_epochs=int(state.num_train_epochs),
            resumed_from=None if resumed_from is None else str(resumed_from),
        )


def is_library_class(cls: type) -> bool:
    """True for a class defined in this package (``trainer`` or a module of it): the
    library's own callbacks (the flow, early stopping, the bar, the printer)."""
    module = getattr(cls, "__module__", "") or ""
    return module == "trainer" or module.startswith("trainer.")


# transformers' callbacks whose counterparts this package defines under the same name.
_COUNTERPARTS = frozenset({"DefaultFlowCallback", "ProgressCallback", "PrinterCallback", "EarlyStoppingCallback"})


def _counterpart(ours: type, theirs: type) -> bool:
    """``theirs`` is transformers' class of a name this package also defines, and
    ``ours`` is (or derives from) the class of that name here."""
    name = theirs.__name__
    return (
        name in _COUNTERPARTS
        and (theirs.__module__ or "").startswith("transformers")
        and any(k.__name__ == name and is_library_class(k) for k in ours.__mro__)
    )


def _is_kind(callback: Any, cls: type) -> bool:
    """``isinstance(callback, cls)``, where transformers' ``DefaultFlowCallback``,
    ``ProgressCallback``, ``PrinterCallback`` or ``EarlyStoppingCallback`` also names
    ours of the same name (code written for transformers passes its classes)."""
    return isinstance(callback, cls) or _counterpart(type(callback), cls)


def _same_kind(a: type, b: type) -> bool:
    """One class, or one of ours and its transformers counterpart (either way)."""
    return a is b or _counterpart(a, b) or _counterpart(b, a)


def _reads_no_history(callback: Any) -> bool:
    """The library's own callbacks never read ``state.log_history``'s numbers; a class
    that sets ``accepts_tensor_logs = True`` takes tensors there too."""
    return is_library_class(type(callback)) or getattr(callback, "accepts_tensor_logs", False) is True


def _with_current_args(callback: Any, item: Any) -> Any:
    """``item`` (a callback's checkpointed ``{"args", "attributes"}``) with the
    constructor arguments ``callback`` was built with now, when they differ: a resume
    given ``EarlyStoppingCallback(early_stopping_patience=10)`` means 10, not the
    checkpoint's 2; its counters are still restored. (transformers, whose
    ``restore_callback_states_from_checkpoint`` defaults to False, rebuilds the
    callback from the checkpoint's arguments when it is set.) One warning says so."""
    state = getattr(callback, "state", None)
    if not isinstance(item, Mapping) or not callable(state):
        return item
    try:
        current = state()
    except Exception:  # a state() that needs a run: the checkpoint's arguments, as before
        return item
    now = current.get("args") if isinstance(current, Mapping) else None
    saved = item.get("args")
    if not isinstance(now, Mapping) or not isinstance(saved, Mapping) or dict(now) == dict(saved):
        return item
    changed = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
    logger.warning(
        "%s: restoring its checkpointed state with the arguments it was given now (%s); the checkpoint had %s",
        type(callback).__name__,
        ", ".join(f"{k}={v!r}" for k, (_, v) in changed.items()),
        ", ".join(f"{k}={old!r}" for k, (old, _) in changed.items()),
    )
    return {**item, "args": dict(now)}


def _read_values(logs: dict[str, Any]) -> None:
    """Replace, in place, each tensor (or numpy scalar) in ``logs`` with its Python
    value (:func:`eventbus.values.resolve`), as transformers' Trainer logs them: for an
    accelerator tensor, a device sync."""
    for k, v in logs.items():
        kind = type(v)
        if kind is float or kind is int or kind is str:
            continue
        plain = resolve(v)
        if plain is not v:
            logs[k] = plain


def _copy_values(mapping: Mapping[str, Any] | None, fresh: bool = False) -> dict[str, Any]:
    """A copy of logged values or metrics for an event. numpy scalars and arrays
    (what ``compute_metrics`` usually returns) become Python numbers and lists, which
    every sink can encode; this is host memory, never a device sync. Tensors are
    snapshotted without a sync (:func:`eventbus.values.snapshot`), or, when ``fresh``
    (the trainer's own new results), handed off without a copy
    (:func:`eventbus.values.handoff`). The result is a :class:`~eventbus.values.Snapshot`."""
    if not mapping:
        return {}
    out = Snapshot()
    torch = sys.modules.get("torch")
    tensor = torch.Tensor if torch is not None else ()
    # This runs on every logged step: the common value types (floats, ints, tensors)
    # are told apart by one type() each, and the result is a Snapshot, which the
    # event keeps without scanning it again.
    for k, v in mapping.items():
        kind = type(v)
        if kind is float or kind is int or kind is str:
            pass
        elif isinstance(v, tensor):
            # A fresh CPU tensor stays as it is (handoff's rule, without its Deferred
            # wrapper): the Snapshot marks it captured, and the bus thread reads it.
            # Anything else is what handoff would give too: a snapshot.
            if not (fresh and v.is_cpu and not v.requires_grad):
                v = snapshot(v)
        elif kind.__module__ == "numpy":
            v = plain_array(v)  # its number (one element) or list, as a tensor's
        out[k] = v
    return out


def _model_config(model: Any) -> dict[str, Any]:
    """The model's own configuration (``model.config``), secrets redacted, as JSON
    values; ``{}`` when the model has none."""
    config = getattr(model, "config", None)
    if config is None:
        return {}
    to_dict = getattr(config, "to_dict", None)
    try:
        if callable(to_dict):
            data = to_dict()
        elif isinstance(config, Mapping):
            data = dict(config)
        elif dataclasses.is_dataclass(config):
            data = dataclasses.asdict(config)
        else:
            data = dict(vars(config))
    except Exception as exc:  # a model's config must never stop training
        logger.warning("could not read the model's config for TrainBegin: %r", exc)
        return {}
    result = _plain(redact(data))
    return result if isinstance(result, dict) else {}


def _plain(value: Any, depth: int = 0) -> Any:
    """``value`` as JSON data: containers recursively, enums as values, anything
    else as its ``str`` (configs may hold dtypes, paths, devices)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if depth > 20:
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v, depth + 1) for v in value]
    if isinstance(value, enum.Enum):
        return _plain(value.value, depth + 1)
    # An object of its own (a dtype, a path, a user's class): its str, with any
    # credential it shows (``api_key='...'`` in a repr, a URL's password) masked.
    return redact_str(str(value))
