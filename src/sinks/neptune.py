"""Neptune sink: the official ``neptune`` client (1.x), on a thread of its own.

neptune.ai's hosted service closed on 2026-03-05. This sink serves self-hosted Neptune
servers (an API token issued by your server, whose address the token carries) and
the client's offline mode (``mode="offline"`` or ``NEPTUNE_MODE=offline``: operations
are stored under ``.neptune/`` and can be sent later with ``neptune sync``). A token
issued by ``app.neptune.ai`` is refused with an error that says so, instead of
retrying against a service that no longer answers.

It takes the parameters of transformers' ``NeptuneCallback`` and logs the same names
under the same namespaces, so dashboards built for it keep working:

- ``<base_namespace>/trainer_parameters``: the training arguments (secrets redacted);
  ``<base_namespace>/model_parameters``: the model config (values Neptune cannot
  store are stringified, as transformers does with ``stringify_unsupported``).
- ``<base_namespace>/train/<name>``, ``eval/<name>``, ``test/<name>``: metric series,
  appended with ``step=<global step>`` and the event's time (one ``extend`` per series
  per batch), ``Evaluate``/``Predict`` metrics named as transformers names them (a
  custom ``metric_key_prefix="val"``'s ``val_loss`` -> ``train/val_loss``, an
  evaluation's ``epoch`` -> ``train/epoch``); ``<base_namespace>/train/epoch`` is a
  single value, overwritten with the last one logged (transformers' ``flat_metrics``).
- ``<base_namespace>/checkpoints`` (``log_checkpoints="same"``),
  ``checkpoints/last`` or ``checkpoints/best``: checkpoint uploads.
- ``source_code/integrations/eventbus-telemetry``: this package's version.

Beyond transformers: the eventbus run id as a tag and as ``<base_namespace>/run_id``
(to find the run of a log directory), the hyperparameters under
``<base_namespace>/hparams``, the end status, best metric and best checkpoint under
``<base_namespace>/train_status``, ``best_metric``, ``best_model_checkpoint``, and
``sys/failed`` set when training failed. Source files are not uploaded unless asked
(``source_files=[...]``). NaN and inf cannot be stored by Neptune: they are skipped
with one warning per metric, as is an int too large for a float (``10**400``). A
metric step that is not above the last one logged for that metric (Neptune's rule)
is skipped too, so the same evaluation arriving both as ``Log`` and as ``Evaluate``
is logged once (another value at a step already logged is skipped with a warning).

Field names: Neptune cannot have a series and a namespace at one path, so a metric
whose name is also the namespace of others (the trainer's ``grad_norm`` and a
callback's ``grad_norm/layer0``), or whose name only differs from another's by what
``clean_path`` tidies (``/lead`` and ``lead``), would break the run's logging. The
sink keeps the fields it has used in this run (and, for a run it continues or is
given, those the client knows) and logs a name that would clash under another,
deterministic one: ``_`` appended to the clashing segment (``train/grad_norm_``,
``train/grad_norm_/layer0``), with one warning naming both. A series the client still
refuses (a type clash with a field it knows) is skipped with one warning; the others
in the batch are sent all the same. An empty metric name is logged as ``train/_``.

One run per bus run where the client allows it: our ``Trainer`` closes its bus at the
end of ``train()``, and ``evaluate()``/``predict()`` open a new bus over the same sink
with the same run id. Opened again for the run id it last logged
(``last_bus_run_id``), the sink continues its Neptune run online with
``neptune.init_run(with_id=<sys/id>)`` (``last_sys_id``, plain strings that survive
process isolation; ``custom_run_id`` is not passed then: the client refuses it with
``with_id``), as transformers' ``NeptuneCallback`` does; a run the server no longer
has gives a new run. The offline mode cannot continue a stopped run (``with_id``
needs the server: the client raises ``RunNotFound``): the evaluation goes to a new
offline run, tagged with the same bus run id, and a warning says so. An open with a
run still open (a failed open, a close that did not run) stops it first. A ``run=``
passed in is used as before. The steps already logged are not known after a reopen:
in a continued run, a value at a step not above a series' last is refused by the
server (the client logs it), not skipped here.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import logging
import math
import os
import re
from typing import Any, Mapping, Sequence
from urllib.parse import urlparse

from eventbus.errors import SinkConfigError
from eventbus.events import BaseEvent, Evaluate, Log, Predict, Save, TrainBegin, TrainEnd
from eventbus.redact import Secret, redact, redact_text
from eventbus.sink import RunInfo, ThreadedSink
from sinks._common import BATCH_SIZE, check_option_types, evaluation_names, flatten, import_sdk, is_number, rewrite_logs

__all__ = ["NeptuneSink", "clean_path"]

logger = logging.getLogger("sinks.neptune")

_MODES = ("async", "sync", "offline", "debug")
_LOCAL_MODES = ("offline", "debug")
_CHECKPOINT_POLICIES = (None, "same", "last", "best")
_FLAT_METRICS = frozenset({"train/epoch"})
INTEGRATION_VERSION_KEY = "source_code/integrations/eventbus-telemetry"
HOSTED_SERVICE_CLOSED = "2026-03-05"


def _token_address(token: str) -> str | None:
    """The server address a Neptune API token carries (tokens are base64 JSON; the
    client sends requests to ``api_url`` when present, else to ``api_address``)."""
    if token.strip() == "ANONYMOUS":  # the client's shortcut for the hosted service's public token
        return "https://app.neptune.ai"
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.b64decode(padded))
    except (ValueError, TypeError):
        return None
    if not isinstance(data, dict):
        return None
    address = data.get("api_url") or data.get("api_address")
    return address if isinstance(address, str) else None


def _field_errors() -> tuple[type[BaseException], ...]:
    """What the client raises for one field it cannot take (a path that is a namespace
    or lies under a series, a value of another type than the field's): that series is
    skipped, the rest of the batch is not."""
    import neptune.exceptions as nexc

    found = getattr(nexc, "MetadataInconsistency", None)
    return (AttributeError, TypeError, ValueError, *((found,) if isinstance(found, type) else ()))


def _config_errors() -> tuple[type[BaseException], ...]:
    """The client's exceptions that mean "configured wrongly", not "server trouble"."""
    import neptune.exceptions as nexc

    names = (
        "NeptuneMissingApiTokenException",
        "NeptuneInvalidApiTokenException",
        "NeptuneMissingProjectNameException",
        "NeptuneWrongInitParametersException",
        "ProjectNotFound",
    )
    return tuple(getattr(nexc, n) for n in names if isinstance(getattr(nexc, n, None), type))


def _not_found_errors() -> tuple[type[BaseException], ...]:
    """The client's exceptions for ``init_run(with_id=...)`` of a run the server does not have."""
    import neptune.exceptions as nexc

    found = getattr(nexc, "RunNotFound", None)
    return (found,) if isinstance(found, type) else ()


def _sys_id(run: Any) -> str | None:
    """The run's ``sys/id`` (e.g. ``"PROJ-12"``): the client keeps it from the server's
    answer at init (no request); else fetched, as transformers' NeptuneCallback does."""
    sys_id = getattr(run, "_sys_id", None)
    if isinstance(sys_id, str) and sys_id:
        return str(sys_id)
    try:
        fetched = run["sys/id"].fetch()
    except Exception as exc:  # a reopen then creates a new run; this one is kept
        logger.warning("neptune sink: could not read the run's sys/id (%s); a reopen creates a new run", type(exc).__name__)
        return None
    return fetched if isinstance(fetched, str) and fetched else None


def _package_version() -> str:
    try:
        import importlib.metadata

        return importlib.metadata.version("eventbus-telemetry")
    except Exception:  # not installed as a distribution (e.g. run from a checkout)
        return "unknown"


class _Pending:
    """Metric values gathered from a batch, not yet sent: per series (values, steps,
    timestamps in seconds) and the single-value metrics' last values. ``before``: when
    the batch is a retry, each series' last step before its first attempt (steps after
    it, up to the series' last, were logged by that attempt: skipped without a word)."""

    __slots__ = ("series", "flat", "before")

    def __init__(self, before: dict[str, float] | None = None) -> None:
        self.series: dict[str, tuple[list[float], list[int], list[float]]] = {}
        self.flat: dict[str, float] = {}
        self.before = before


class NeptuneSink(ThreadedSink):
    """Logs to Neptune (report_to name ``"neptune"``), with transformers'
    ``NeptuneCallback`` parameters.

    Options (all optional; the environment fills the rest, as in transformers):

    - ``api_token``: default ``NEPTUNE_API_TOKEN``. Never written anywhere.
    - ``project``: ``"workspace/project"``; default ``NEPTUNE_PROJECT``.
    - ``name``: the run's name; default the bus run's ``run_name``.
    - ``base_namespace``: the namespace everything is logged under (``"finetuning"``).
    - ``run``: an existing ``neptune.Run`` to log to instead of creating one; the sink
      flushes it at close but does not stop it (it is yours).
    - ``log_parameters``: log training arguments and model config (``True``).
    - ``log_checkpoints``: ``None`` (default), ``"same"`` (upload every checkpoint),
      ``"last"`` (keep only the latest) or ``"best"`` (only checkpoints saved as the
      best so far).
    - ``mode``: ``"async"`` (default), ``"sync"``, ``"offline"`` or ``"debug"``;
      default ``NEPTUNE_MODE``.
    - ``tags``: extra tags for a new run.
    - ``**neptune_run_kwargs``: passed to ``neptune.init_run`` (e.g.
      ``capture_hardware_metrics=False``, ``custom_run_id=...``, ``source_files=[...]``).
      Off unless set here: ``source_files``, ``git_ref`` (it uploads the uncommitted
      diff), ``capture_stdout`` and ``capture_stderr`` (they replace ``sys.stdout``
      and ``sys.stderr`` process-wide from the sink's thread).
    """

    name = "neptune"
    requires = ("neptune", "neptune")
    """The SDK (module, extra): ``create_sink``/``report_to`` check it is installed."""
    events = (TrainBegin, Log, Evaluate, Predict, Save, TrainEnd)
    # The client (its import, its own threads, ~35 µs of CPU per logged step with one
    # extend per series per batch) runs in a child process, off the training
    # process's GIL (eventbus.isolation); POSIX only.
    isolate = os.name == "posix"
    isolate_optional = True  # an instance that cannot be pickled runs here instead
    max_batch_size = BATCH_SIZE

    def __init__(
        self,
        *,
        api_token: str | None = None,
        project: str | None = None,
        name: str | None = None,
        base_namespace: str = "finetuning",
        run: Any = None,
        log_parameters: bool = True,
        log_checkpoints: str | None = None,
        mode: str | None = None,
        tags: Sequence[str] | str | None = None,
        **neptune_run_kwargs: Any,
    ) -> None:
        check_option_types(self.name, NeptuneSink.__init__, locals())
        if not isinstance(base_namespace, str) or not base_namespace.strip("/"):
            raise SinkConfigError(
                f"neptune sink: base_namespace must be a non-empty string such as 'finetuning', got {base_namespace!r}"
            )
        if log_checkpoints not in _CHECKPOINT_POLICIES:
            raise SinkConfigError(
                f"neptune sink: log_checkpoints must be None, 'same', 'last' or 'best', got {log_checkpoints!r}"
            )
        resolved_mode = mode or os.environ.get("NEPTUNE_MODE") or None
        if resolved_mode is not None and resolved_mode not in _MODES:
            where = "mode" if mode else "NEPTUNE_MODE"
            raise SinkConfigError(
                f"neptune sink: {where}={resolved_mode!r} is not a mode that can log; use one of {', '.join(_MODES)}"
            )
        if isinstance(tags, str):
            tags = [tags]
        self._api_token = Secret(api_token or os.environ.get("NEPTUNE_API_TOKEN"))
        self.project = project or os.environ.get("NEPTUNE_PROJECT") or None
        self.run_name = name
        self.base_namespace = base_namespace.strip("/")
        self.log_parameters = log_parameters
        self.log_checkpoints = log_checkpoints
        self.mode = resolved_mode
        self.tags = list(tags or ())
        self.neptune_run_kwargs = neptune_run_kwargs
        self._user_run = run
        if run is not None:
            self.isolate = False  # the user's run object lives in this process
        self.last_sys_id: str | None = None
        """``sys/id`` of the server run a reopen for :attr:`last_bus_run_id` continues
        (``with_id``); never set offline, where a stopped run cannot be continued (a plain
        string, so it survives process isolation's copy-back)."""
        self.last_bus_run_id: str | None = None
        """The eventbus run id of the run this sink last created."""
        self._run: Any = None
        self._last_step: dict[str, float] = {}
        self._last_value: dict[str, float] = {}
        # The batch being written (until it succeeds) and each series' last step before
        # it: the bus retries a failed batch with the very same list.
        self._attempt: tuple[Sequence[BaseEvent], dict[str, float]] | None = None
        self._warned: set[str] = set()
        # Field paths (under base_namespace) of this run, so that two names never meet
        # at one path: per metric key the field it is logged to (None: skipped), per
        # leaf field we use the key logging to it ("" for a field of ours that is not a
        # metric), per namespace a key logged under it ("": ours, or one the client
        # knew); the leaf fields the client knew at open (a metric may continue one).
        self._fields: dict[str, str | None] = {}
        self._leaves: dict[str, str] = {}
        self._namespaces: dict[str, str] = {}
        self._known: set[str] = set()
        self._previous_checkpoint: str | None = None
        if log_checkpoints in ("last", "best"):
            self._checkpoints_namespace = f"checkpoints/{log_checkpoints}"
        else:
            self._checkpoints_namespace = "checkpoints"
        if log_checkpoints is None:
            # Subscribe only to what is used: the bus then need not build Save events for us.
            self.events = tuple(t for t in type(self).events if t is not Save)

    @classmethod
    def available(cls) -> bool:
        """True when ``neptune`` is installed and either a token and project are set
        (``NEPTUNE_API_TOKEN``, ``NEPTUNE_PROJECT``) or ``NEPTUNE_MODE`` is
        ``offline``/``debug``."""
        if importlib.util.find_spec("neptune") is None:
            return False
        if os.environ.get("NEPTUNE_MODE") in _LOCAL_MODES:
            return True
        return bool(os.environ.get("NEPTUNE_API_TOKEN") and os.environ.get("NEPTUNE_PROJECT"))

    @property
    def neptune_run(self) -> Any:
        """The ``neptune.Run`` being logged to (``None`` before open and after close)."""
        return self._run

    def __repr__(self) -> str:
        return (
            f"<NeptuneSink name={self.name!r} project={self.project!r} mode={self.mode or 'async'!r} "
            f"base_namespace={self.base_namespace!r} api_token={self._api_token!r}>"
        )

    # -- lifecycle -----------------------------------------------------------------

    def _check_server(self) -> None:
        """Refuse tokens for the hosted service, which closed on 2026-03-05."""
        token = self._api_token.get()
        if self.mode in _LOCAL_MODES or not token:
            return
        address = _token_address(token)
        host = (urlparse(address).hostname or "") if address else ""
        if host == "neptune.ai" or host.endswith(".neptune.ai"):
            raise SinkConfigError(
                f"neptune sink: the API token points at {host}, but neptune.ai's hosted service closed on "
                f"{HOSTED_SERVICE_CLOSED}. Use a token issued by your self-hosted Neptune server, or log offline "
                "(mode='offline' or NEPTUNE_MODE=offline) and sync later with `neptune sync`."
            )

    def open_sync(self, run: RunInfo) -> None:
        """Create (or adopt) the Neptune run and tag it with the bus run id; opened again
        for the same bus run (``train()`` then ``evaluate()``), continue that run online."""
        neptune = import_sdk("neptune", "neptune", "neptune")
        self._stop_stale()
        self._last_step.clear()
        self._last_value.clear()
        self._fields.clear()
        self._leaves.clear()
        self._namespaces.clear()
        self._known.clear()
        self._attempt = None
        self._previous_checkpoint = None
        if self._user_run is not None:
            self._run = self._user_run
            self._run["sys/tags"].add([run.run_id])
        else:
            self._check_server()
            if self.mode not in _LOCAL_MODES and not self._api_token:
                raise SinkConfigError(
                    "neptune sink: no API token: set NEPTUNE_API_TOKEN (issued by your self-hosted Neptune server) "
                    "or pass api_token=..., or log offline with NEPTUNE_MODE=offline"
                )
            if self.mode not in _LOCAL_MODES and not self.project:
                raise SinkConfigError(
                    "neptune sink: no project: set NEPTUNE_PROJECT='workspace/project' or pass project=..."
                )
            # Our code stays ours unless asked: no source files, and no git tracking,
            # which uploads the working tree's uncommitted diff (secrets included, as a
            # test here found). No stdout/stderr capture either: the SDK replaces
            # sys.stdout and sys.stderr process-wide from this sink's thread and, at
            # stop, puts back whatever it saw at start, a stream the program may have
            # closed since (the benchmark lost its stderr that way). As the Comet
            # sink. neptune_run_kwargs (source_files=..., capture_stdout=True, ...) win.
            kwargs: dict[str, Any] = {"source_files": [], "git_ref": False, "capture_stdout": False, "capture_stderr": False}
            kwargs.update(self.neptune_run_kwargs)
            extra_tags = kwargs.pop("tags", None) or ()
            kwargs["tags"] = [*self.tags, *([extra_tags] if isinstance(extra_tags, str) else extra_tags), run.run_id]
            same_run = self.last_bus_run_id == run.run_id
            with_id = self.last_sys_id if same_run and self.mode not in _LOCAL_MODES else None
            if same_run and self.mode == "offline":
                # The client's offline mode has no server to resume from: init_run(with_id=...)
                # raises RunNotFound there.
                logger.warning(
                    "neptune sink: offline mode cannot continue a stopped run: run %s continues in a new offline "
                    "run (tagged %s as well); `neptune sync` uploads them as separate runs",
                    run.run_id,
                    run.run_id,
                )
            self._run = None
            if with_id is not None:
                # The same bus run opened again (our Trainer closes its bus at the end of
                # train(); evaluate() opens a new one): continue its run, as transformers'
                # NeptuneCallback does. with_id and custom_run_id cannot go together.
                resume = {k: v for k, v in kwargs.items() if k != "custom_run_id"}
                try:
                    self._run = self._init_run(neptune, run, with_id=with_id, **resume)
                except _not_found_errors():
                    logger.warning(
                        "neptune sink: Neptune run %s of run %s was not found on the server (deleted?); creating a "
                        "new one",
                        with_id,
                        run.run_id,
                    )
                else:
                    logger.info("neptune sink: continuing Neptune run %s of run %s", with_id, run.run_id)
            if self._run is None:
                self._run = self._init_run(neptune, run, **kwargs)
            self.last_bus_run_id = run.run_id
            self.last_sys_id = None if self.mode in _LOCAL_MODES else _sys_id(self._run)
        self._learn_structure()
        self._run[INTEGRATION_VERSION_KEY] = _package_version()
        self._claim("run_id")
        self._ns("run_id").assign(run.run_id)

    def _learn_structure(self) -> None:
        """Note the fields the client already knows under our namespace (a run continued
        with ``with_id`` or passed in), so that a metric name is never put where one of
        them is; a run without ``get_structure`` (or that fails it) is taken as empty."""
        get_structure = getattr(self._run, "get_structure", None)
        if not callable(get_structure):
            return
        try:
            tree: Any = get_structure()
        except Exception as exc:
            logger.warning(
                "neptune sink: could not read the run's fields (%s); metric names are checked against ours only",
                type(exc).__name__,
            )
            return
        for part in clean_path(self.base_namespace).split("/"):
            tree = tree.get(part) if isinstance(tree, Mapping) else None
        if not isinstance(tree, Mapping):
            return
        stack: list[tuple[str, Mapping[str, Any]]] = [("", tree)]
        while stack:
            prefix, node = stack.pop()
            for name, child in node.items():
                path = f"{prefix}{name}"
                if isinstance(child, Mapping):
                    self._namespaces.setdefault(path, "")
                    stack.append((path + "/", child))
                else:
                    self._known.add(path)

    def _init_run(self, neptune: Any, run: RunInfo, **kwargs: Any) -> Any:
        try:
            return neptune.init_run(
                project=self.project,
                api_token=self._api_token.get(),
                name=self.run_name or run.run_name or run.run_id,
                mode=self.mode,
                **kwargs,
            )
        except _config_errors() as exc:
            raise SinkConfigError(
                f"neptune sink: could not create a run in project {self.project!r}: "
                f"{redact_text(str(exc), self._api_token.get())}"
            ) from None

    def _stop_stale(self) -> None:
        """Close the run an open that failed after creating it, or a close that did not
        run, left behind (in this process), never failing the open."""
        if self._run is None:
            return
        try:
            self.close_sync()
        except Exception as exc:
            self._run = None
            logger.warning(
                "neptune sink: could not stop the previous run: %s",
                redact_text(f"{type(exc).__name__}: {exc}", self._api_token.get()),
            )

    def write_sync(self, batch: Sequence[BaseEvent]) -> None:
        """Log each event, in order. Metric values are gathered per series and sent with
        one ``extend`` per series (with each value's step and the event's time) instead
        of one ``log`` per value: the client's cost is per call (an operation built,
        serialised and queued), about seven times less per value this way."""
        attempt = self._attempt
        if attempt is not None and attempt[0] is batch:
            pending = _Pending(before=attempt[1])  # a retry: part of it may be logged
        else:
            self._attempt = (batch, dict(self._last_step))
            pending = _Pending()
        for event in batch:
            if isinstance(event, Log):
                self._gather(rewrite_logs(event.values), event, pending)
            elif isinstance(event, (Evaluate, Predict)):
                self._gather(evaluation_names(event.metrics, event.prefix), event, pending)
            else:
                self._send(pending)  # what came before this event is logged before it
                if isinstance(event, TrainBegin):
                    self._train_begin(event)
                elif isinstance(event, Save):
                    self._save(event)
                elif isinstance(event, TrainEnd):
                    self._train_end(event)
        self._send(pending)
        self._attempt = None

    def close_sync(self) -> None:
        """Stop the run (a run passed in by the user is only flushed)."""
        run, self._run = self._run, None
        if run is None:
            return
        if run is self._user_run:
            run.wait()
        else:
            run.stop()

    # -- events --------------------------------------------------------------------

    def _ns(self, path: str) -> Any:
        return self._run[f"{self.base_namespace}/{clean_path(path)}"]

    def _train_begin(self, event: TrainBegin) -> None:
        from neptune.utils import stringify_unsupported

        if self.log_parameters:
            if event.config:
                self._assign_dict("trainer_parameters", stringify_unsupported(_clean(redact(event.config))))
            if event.model_config:
                self._assign_dict("model_parameters", stringify_unsupported(_clean(redact(event.model_config))))
        if event.hparams:
            self._assign_dict("hparams", stringify_unsupported(_clean(redact(event.hparams))))
        if event.resumed_from:
            self._claim("resumed_from")
            self._ns("resumed_from").assign(event.resumed_from)

    def _assign_dict(self, path: str, value: Mapping[str, Any]) -> None:
        for key in flatten(value):
            self._claim(f"{path}/{key}")
        self._ns(path).assign(value)

    def _gather(self, values: Mapping[str, Any], event: BaseEvent, pending: _Pending) -> None:
        step = event.step
        clashes: list[str] = []
        for key, value in values.items():
            if not is_number(value) and not isinstance(value, bool):
                self._warn_once(
                    key, "%r is a %s, not a number; it is not logged (shown once per key)", key, type(value).__name__
                )
                continue
            try:
                value = float(value)
            except OverflowError:  # an int past a float's range (10**400)
                self._warn_once(key, "%r is an int too large for a float; it is not logged (shown once per key)", key)
                continue
            if key in _FLAT_METRICS:
                if self._field(key) is not None:
                    pending.flat[key] = value  # a single value: the last one wins
                continue
            if not math.isfinite(value):
                self._warn_once(
                    key,
                    "%r is %s at step %d: Neptune cannot store NaN or inf, skipped (shown once per key)",
                    key,
                    value,
                    step,
                )
                continue
            if self._field(key) is None:
                continue
            series = pending.series.get(key)
            last = series[1][-1] if series else self._last_step.get(key)
            if last is not None and step <= last:
                # The same metrics arrive as Log and as Evaluate: that is not worth a
                # warning; nor are the steps a failed attempt of this batch logged.
                before = pending.before
                if step < last and (before is None or step <= before.get(key, -math.inf)):
                    self._warn_once(
                        key,
                        "%r: step %d is not after step %d already logged; Neptune needs increasing steps, skipped",
                        key,
                        step,
                        last,
                    )
                elif step == last:
                    logged = series[0][-1] if series else self._last_value.get(key)
                    if logged is not None and logged != value:
                        # E.g. evaluate() on other data after train(), at the step of
                        # the last evaluation (transformers' callback loses it too).
                        clashes.append(key)
                continue
            if series is None:
                series = pending.series[key] = ([], [], [])
            series[0].append(value)
            series[1].append(step)
            series[2].append(event.time_ns / 1e9)
        if clashes:
            self._warn_once(
                f"step {step}",
                "%s: other values at step %d, which already has them logged; Neptune keeps one value per step "
                "(an evaluate() after train() at the step of the last evaluation?), not logged",
                ", ".join(clashes),
                step,
            )

    def _field(self, key: str) -> str | None:
        """The field (under ``base_namespace``) metric ``key`` is logged to; ``None``
        when it is not logged (the client refused it)."""
        try:
            return self._fields[key]
        except KeyError:
            return self._place(key)

    def _place(self, key: str) -> str:
        """Give metric ``key`` a field no other name of this run uses and Neptune can
        take: not a namespace, not under a series. Where its own path clashes, ``_``
        is appended to the clashing segment until it does not (the same names in the
        same order give the same fields), with one warning naming both."""
        wanted = path = clean_path(key)
        clash: str | None = None
        while True:
            other = self._leaves.get(path)
            if other is not None:
                clash = clash or (f"which {other!r} is logged to" if other else "a field of the run")
                path += "_"
                continue
            inside = self._namespaces.get(path)
            if inside is not None:
                clash = clash or (
                    f"which is a namespace ({inside!r} is logged under it)" if inside else "which is a namespace of the run"
                )
                path += "_"
                continue
            parent = self._leaf_above(path)
            if parent is None:
                break
            owner = self._leaves.get(parent)
            clash = clash or (
                f"under {self.base_namespace}/{parent}, which {owner!r} is logged to"
                if owner
                else f"under {self.base_namespace}/{parent}, a field of the run"
            )
            path = parent + "_" + path[len(parent) :]
        if clash is not None:
            self._warn_once(
                f"field {key}",
                "%r would be logged to %s/%s, %s (Neptune cannot hold both); logged to %s/%s instead",
                key,
                self.base_namespace,
                wanted,
                clash,
                self.base_namespace,
                path,
            )
        self._claim(path, key)
        self._fields[key] = path
        return path

    def _leaf_above(self, path: str) -> str | None:
        """The first of ``path``'s parent namespaces that is a leaf field, if any."""
        end = path.find("/")
        while end != -1:
            if path[:end] in self._leaves or path[:end] in self._known:
                return path[:end]
            end = path.find("/", end + 1)
        return None

    def _claim(self, path: str, key: str = "") -> None:
        """Note a field path (under ``base_namespace``) as used, by metric ``key``."""
        self._leaves.setdefault(path, key)
        end = path.find("/")
        while end != -1:
            self._namespaces.setdefault(path[:end], key)
            end = path.find("/", end + 1)

    def _send(self, pending: _Pending) -> None:
        """Send what ``pending`` gathered, and empty it. A series' last step is noted
        only once the client took it: a batch retried after an error logs it again.
        Each series goes on its own: one the client refuses (a field it holds with
        another type) is skipped from then on, with one warning, and the others are
        sent; any other error is raised once every series was tried (the bus retries
        a transient one, and the retry sends only what did not go)."""
        failure: BaseException | None = None
        refused = _field_errors()
        for key, value in pending.flat.items():
            try:
                self._ns(self._fields[key]).assign(value)
            except refused as exc:
                self._refuse(key, exc)
            except Exception as exc:
                failure = failure or exc
        pending.flat.clear()
        for key, (values, steps, timestamps) in pending.series.items():
            try:
                self._ns(self._fields[key]).extend(values, steps=steps, timestamps=timestamps)
            except refused as exc:
                self._refuse(key, exc)
                continue
            except Exception as exc:
                failure = failure or exc
                continue
            self._last_step[key] = steps[-1]
            self._last_value[key] = values[-1]
        pending.series.clear()
        if failure is not None:
            raise failure

    def _refuse(self, key: str, exc: BaseException) -> None:
        """The client would not take ``key``'s values: not logged from now on."""
        field = self._fields.get(key)
        self._fields[key] = None
        self._warn_once(
            f"refused {key}",
            "%r: the client refused field %s/%s (%s); it is not logged from now on, the other metrics are",
            key,
            self.base_namespace,
            field,
            redact_text(_one_line(exc), self._api_token.get()),
        )

    def _save(self, event: Save) -> None:
        if self.log_checkpoints is None:
            return
        if self.log_checkpoints == "best" and not event.is_best:
            return
        path = event.checkpoint_dir
        if not path or not os.path.exists(path):
            self._warn_once(
                "checkpoint", "checkpoint %r no longer exists (rotated away before upload?); not uploaded", path
            )
            return
        self._namespaces.setdefault(self._checkpoints_namespace, "")
        target = self._ns(self._checkpoints_namespace)
        target.upload_files(path)
        if self.log_checkpoints in ("last", "best") and self._previous_checkpoint not in (None, path):
            target.delete_files(self._previous_checkpoint)
        self._previous_checkpoint = path

    def _train_end(self, event: TrainEnd) -> None:
        for path in ("train_status", "best_metric", "best_model_checkpoint", "error"):
            self._claim(path)
        self._ns("train_status").assign(event.status)
        if event.best_metric is not None and math.isfinite(event.best_metric):
            self._ns("best_metric").assign(float(event.best_metric))
        if event.best_model_checkpoint:
            self._ns("best_model_checkpoint").assign(event.best_model_checkpoint)
        if event.status == "failed":
            self._run["sys/failed"] = True
            if event.error:
                self._ns("error").assign(redact_text(event.error, self._api_token.get()))

    def _warn_once(self, key: str, msg: str, *args: Any) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        logger.warning("neptune sink: " + msg, *args)


def clean_path(name: str) -> str:
    """A field path Neptune takes as meant: the client silently drops empty segments
    (``a//b`` would land on ``a/b``) and ``.``/``..`` read as relative paths, so those
    segments become ``_``/``__``; a name ending in ``/`` (``train/`` for an empty
    metric name) ends in a ``_`` leaf, not on its namespace. The JSONL sink keeps the
    original name."""
    name = str(name)
    parts = [("_" * len(p)) if p in (".", "..") else p for p in name.split("/") if p]
    if name.endswith("/"):
        parts.append("_")
    return "/".join(parts) or "_"


_STYLE = re.compile(r"\x1b\[[0-9;]*m")


def _one_line(exc: BaseException) -> str:
    """The client's exception as one line for a warning: its messages are framed
    banners with terminal colours and a help link."""
    text = _STYLE.sub("", str(exc))
    lines = [ln.strip() for ln in text.splitlines()]
    kept = " ".join(ln for ln in lines if ln and not ln.startswith(("---", "Need help")))
    if len(kept) > 200:
        kept = kept[:197] + "..."
    return f"{type(exc).__name__}: {kept}" if kept else type(exc).__name__


def _clean(value: Any) -> Any:
    """Neptune rejects empty namespaces and non-string keys, and stores NaN poorly:
    drop empty dicts, stringify keys, and turn non-finite floats into strings."""
    if isinstance(value, Mapping):
        out = {str(k): _clean(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if not (isinstance(v, dict) and not v)}
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
