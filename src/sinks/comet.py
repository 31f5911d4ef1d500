"""Comet sink: the official ``comet_ml`` SDK, driven from the sink's own thread.

Comet's REST API has no batch endpoint for metrics and rate-limits per-step logging,
so the SDK's own streamer (which batches and throttles) does the sending; every SDK
call, including the ``import comet_ml`` that takes seconds and patches the process,
happens on this sink's thread, never on the training thread or the bus loop.

What it logs, as transformers' ``CometCallback`` does:

- parameters ``args/<name>`` (the training arguments, secrets redacted) and
  ``config/<name>`` (the model config); beyond transformers, ``hparams/<name>``;
- metrics from ``Log`` (``loss`` -> ``train/loss``, ``eval_loss`` -> ``eval/loss``),
  ``Evaluate`` and ``Predict`` (``test/<name>``), named as transformers names them
  (a custom ``metric_key_prefix="val"``'s ``val_loss`` -> ``train/val_loss``, an
  evaluation's ``epoch`` -> ``train/epoch``), each with ``step`` (the global step)
  and ``epoch``; NaN and inf are logged as such (Comet stores them); the same
  evaluation arriving as ``Log`` and as ``Evaluate`` is logged once; a name over
  Comet's 100-character limit (which the SDK would cut, merging names that differ only
  past it: a PEFT model's ``grad_norm/...lora_magnitude_vector.default.weight`` and
  ``...bias``) is logged as its first characters, ``~`` and a hash of the whole name,
  with one warning per name;
- at the end, the output directory as assets when ``COMET_LOG_ASSETS`` is true.

Beyond transformers: the eventbus run id as a tag and as the ``eventbus_run_id``
other, the end status (``train_status``, ``best_metric``, ``best_model_checkpoint``)
as others, and a failed run reported to Comet as crashed.

Environment (as transformers documents): ``COMET_API_KEY``, ``COMET_PROJECT_NAME``,
``COMET_WORKSPACE``, ``COMET_MODE`` (``get``, ``get_or_create``, ``create``; and the
older ``ONLINE``/``OFFLINE``/``DISABLED``), ``COMET_START_ONLINE``,
``COMET_OFFLINE_DIRECTORY``, ``COMET_LOG_ASSETS``, ``COMET_EXPERIMENT_KEY``. The
experiment is offline (a ``.zip`` under the offline directory, to send later with
``comet upload``) when ``COMET_START_ONLINE`` is false or no API key is configured.

One experiment per bus run: our ``Trainer`` closes its bus at the end of ``train()``,
and ``evaluate()``/``predict()`` open a new bus over the same sink with the same run
id. Opened again for the run id it last logged (``last_bus_run_id``), the sink
continues that experiment (``last_experiment_key``, plain strings that survive
process isolation): ``comet_ml.start(experiment_key=..., mode="get")``, an
``ExistingExperiment`` online; offline, another archive ``<key>-<suffix>.zip`` with
resume strategy ``get`` that ``comet upload`` appends to the experiment, once the
experiment's first archive is uploaded (upload them oldest first; ``archive_path`` is
the latest). Parameters come with ``TrainBegin`` and are logged once. An offline
experiment is continued only once its archive is written (a continuation of an
archive never written could not be uploaded): a reopen before that, or for another
run id, starts a new experiment, as does one online whose experiment is not on the
server. An open with an experiment still open (a failed open, a close that did not
run) closes it first.

The SDK's own error reporting (Sentry, ``COMET_ERROR_TRACKING_ENABLE``), its usage
reporting (``COMET_INTERNAL_REPORTING``) and its framework auto-logging import hooks
(``COMET_DISABLE_AUTO_LOGGING``) are off unless those variables say otherwise; source
code, the command line (which may hold tokens) and environment details are not
logged unless asked (``log_code``, ``parse_args``, ``log_env_details``).

An experiment the SDK could not start (``COMET ERROR: Failed to create experiment``:
the server refused the key, answered 5xx, or could not be reached) is not alive: the
SDK would drop everything logged to it without a word. The open then fails with a
:class:`~eventbus.errors.SinkError` (the bus counts or spools the events, and tries
the open again with the next batch), as does a write once the experiment is no longer
alive (ended by something else in the process).
"""

from __future__ import annotations

import configparser
import glob
import hashlib
import importlib.util
import logging
import math
import os
from typing import Any, Mapping, Sequence

from eventbus.errors import SinkConfigError, SinkError
from eventbus.events import BaseEvent, Evaluate, Log, Predict, TrainBegin, TrainEnd
from eventbus.redact import Secret, redact, redact_text
from eventbus.sink import RunInfo, ThreadedSink
from sinks._common import BATCH_SIZE, ScalarFilter, check_option_types, evaluation_names, import_sdk, rewrite_logs

__all__ = ["CometSink"]

logger = logging.getLogger("sinks.comet")

_TRUE = ("1", "true", "yes", "on", "y", "t")
_FALSE = ("0", "false", "no", "off", "n", "f", "")
_START_MODES = ("get", "get_or_create", "create")
_LEGACY_MODES = ("online", "offline", "disabled")
_NAME_LIMIT = 100
"""Comet's longest metric name (the SDK's ``MAXIMAL_KEY_LENGTH``, read at open)."""

# Set (unless the user set them) before comet_ml is imported: the SDK reads them at import.
_SDK_DEFAULTS = {
    "COMET_ERROR_TRACKING_ENABLE": "false",
    "COMET_INTERNAL_REPORTING": "false",
    "COMET_DISABLE_AUTO_LOGGING": "1",
}


_START_LOGGERS = tuple(
    f"comet_ml.comet_start.{m}" for m in ("comet_start", "config_manager", "experiment_factory", "experiment_status")
)


class _RedactFilter(logging.Filter):
    """Replaces the API key in the records of the logger it is added to."""

    def __init__(self, secret: str | None) -> None:
        super().__init__()
        self._secret = Secret(secret)

    def filter(self, record: logging.LogRecord) -> bool:
        secret = self._secret.get()
        if secret:
            message = record.getMessage()
            if secret in message:
                record.msg, record.args = redact_text(message, secret), None
        return True


def _env_bool(name: str, default: bool | None = None) -> bool | None:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise SinkConfigError(f"comet_ml sink: {name}={raw!r} is not a boolean; use 1/0, true/false or yes/no")


def _config_file_has_key() -> bool:
    """Whether Comet's config file (``COMET_CONFIG`` or ``~/.comet.config``) sets an API key."""
    path = os.path.expanduser(os.environ.get("COMET_CONFIG") or "~/.comet.config")
    if not os.path.isfile(path):
        return False
    parser = configparser.ConfigParser()
    try:
        parser.read(path)
    except configparser.Error:
        return False
    return bool(parser.get("comet", "api_key", fallback=None))


class CometSink(ThreadedSink):
    """Logs to Comet (report_to name ``"comet_ml"``).

    Options (all optional; the ``COMET_*`` environment fills the rest):

    - ``api_key``: default ``COMET_API_KEY`` (or Comet's config file). Never written.
    - ``project_name``, ``workspace``: default ``COMET_PROJECT_NAME``, ``COMET_WORKSPACE``.
    - ``experiment_name``: default the bus run's ``run_name``, else its run id.
    - ``experiment_key``: continue an experiment (default ``COMET_EXPERIMENT_KEY``).
    - ``mode``: ``"get_or_create"``, ``"get"`` or ``"create"``; default ``COMET_MODE``.
    - ``online``: ``False`` for an offline experiment; default ``COMET_START_ONLINE``,
      else online exactly when an API key is configured.
    - ``offline_directory``: where offline archives go; default
      ``COMET_OFFLINE_DIRECTORY``, else ``<output_dir>/comet`` of the run, else the SDK's.
    - ``log_assets``: upload the run's output directory at the end; default
      ``COMET_LOG_ASSETS`` (false).
    - ``tags``: extra tags.
    - ``log_code``, ``parse_args``, ``log_env_details``, ``display_summary_level``:
      passed to ``comet_ml.ExperimentConfig`` (default off / 0).
    """

    name = "comet_ml"
    requires = ("comet_ml", "comet")
    """The SDK (module, extra): ``create_sink``/``report_to`` check it is installed."""
    events = (TrainBegin, Log, Evaluate, Predict, TrainEnd)
    # The SDK's per-metric bookkeeping (~350 µs of CPU per logged step) runs in a
    # child process, off the training process's GIL (eventbus.isolation); POSIX only.
    isolate = os.name == "posix"
    isolate_optional = True  # an instance that cannot be pickled runs here instead
    max_batch_size = BATCH_SIZE

    def __init__(
        self,
        *,
        api_key: str | None = None,
        project_name: str | None = None,
        workspace: str | None = None,
        experiment_name: str | None = None,
        experiment_key: str | None = None,
        mode: str | None = None,
        online: bool | None = None,
        offline_directory: str | os.PathLike[str] | None = None,
        log_assets: bool | None = None,
        tags: Sequence[str] | str | None = None,
        log_code: bool = False,
        parse_args: bool = False,
        log_env_details: bool = False,
        display_summary_level: int = 0,
    ) -> None:
        check_option_types(self.name, CometSink.__init__, locals())
        start_mode, legacy_online, disabled = self._parse_mode(mode)
        self.disabled = disabled and online is None
        """``COMET_MODE=DISABLED`` (transformers' older switch): nothing is logged."""
        if online is None:
            online = legacy_online
        if online is None:
            online = _env_bool("COMET_START_ONLINE")
        self._api_key = Secret(api_key or os.environ.get("COMET_API_KEY"))
        self.project_name = project_name or os.environ.get("COMET_PROJECT_NAME") or None
        self.workspace = workspace or os.environ.get("COMET_WORKSPACE") or None
        self.experiment_name = experiment_name
        self.experiment_key = experiment_key or os.environ.get("COMET_EXPERIMENT_KEY") or None
        self.mode = start_mode
        self.online = online
        env_dir = os.environ.get("COMET_OFFLINE_DIRECTORY")
        self.offline_directory = os.fspath(offline_directory) if offline_directory else env_dir or None
        self.log_assets = log_assets if log_assets is not None else bool(_env_bool("COMET_LOG_ASSETS", False))
        self.tags = [tags] if isinstance(tags, str) else list(tags or ())
        self.log_code = log_code
        self.parse_args = parse_args
        self.log_env_details = log_env_details
        self.display_summary_level = display_summary_level
        self.archive_path: str | None = None
        """The offline archive (``.zip``) the last offline end wrote: after a reopen for
        the same run (``train()`` then ``evaluate()``), the continuation's archive."""
        self.last_experiment_key: str | None = None
        """The key of the experiment a reopen for :attr:`last_bus_run_id` continues: set
        when an online experiment starts, and when an offline one's archive is written
        (a plain string, so it survives process isolation's copy-back)."""
        self.last_bus_run_id: str | None = None
        """The eventbus run id :attr:`last_experiment_key` belongs to."""
        self._experiment: Any = None
        self._online = False
        self._continued = False  # the experiment continues one an earlier open started
        self._run: RunInfo | None = None
        self._scalars = ScalarFilter(self.name)
        self._last_step: dict[str, tuple[int, float]] = {}
        """Per metric name, the step and value last logged."""
        self._name_limit = _NAME_LIMIT
        self._short_names: dict[str, str] = {}
        self._short_taken: set[str] = set()  # the values of _short_names (a lookup per new long name)
        """Per metric name over Comet's limit, the name it is logged under."""
        self._warned: set[str] = set()

    @staticmethod
    def _parse_mode(mode: str | None) -> tuple[str | None, bool | None, bool]:
        """``mode`` or ``COMET_MODE`` -> (comet_ml.start mode, online override, disabled)."""
        raw = mode if mode is not None else os.environ.get("COMET_MODE")
        if raw is None or raw == "":
            return None, None, False
        value = raw.strip().lower()
        if value in _START_MODES:
            return value, None, False
        if value in _LEGACY_MODES:
            # transformers' older COMET_MODE values: ONLINE, OFFLINE, DISABLED.
            return None, {"online": True, "offline": False, "disabled": None}[value], value == "disabled"
        where = "mode" if mode is not None else "COMET_MODE"
        raise SinkConfigError(
            f"comet_ml sink: {where}={raw!r} is not a Comet mode; use one of {', '.join(_START_MODES + _LEGACY_MODES)}"
        )

    @classmethod
    def available(cls) -> bool:
        """True when ``comet_ml`` is installed and an API key is configured
        (``COMET_API_KEY`` or Comet's config file) or offline mode is asked for
        (``COMET_START_ONLINE=0`` or ``COMET_MODE=OFFLINE``); false for
        ``COMET_MODE=DISABLED``."""
        if importlib.util.find_spec("comet_ml") is None:
            return False
        mode = (os.environ.get("COMET_MODE") or "").strip().lower()
        if mode == "disabled":
            return False
        if os.environ.get("COMET_API_KEY") or _config_file_has_key():
            return True
        try:
            return mode == "offline" or _env_bool("COMET_START_ONLINE") is False
        except SinkConfigError:
            return False

    @property
    def experiment(self) -> Any:
        """The ``comet_ml`` experiment being logged to (``None`` before open and after close)."""
        return self._experiment

    def __repr__(self) -> str:
        online = "auto" if self.online is None else ("online" if self.online else "offline")
        return (
            f"<CometSink name={self.name!r} project_name={self.project_name!r} workspace={self.workspace!r} "
            f"{online} api_key={self._api_key!r}>"
        )

    # -- lifecycle -----------------------------------------------------------------

    def open_sync(self, run: RunInfo) -> None:
        """Import the SDK and start the experiment, on this sink's thread; opened again
        for the same bus run (``train()`` then ``evaluate()``), continue its experiment."""
        self._end_stale()
        self._run = run
        self._last_step.clear()
        self._short_names.clear()
        self._short_taken.clear()
        if self.disabled:
            logger.info("comet_ml sink: COMET_MODE=DISABLED, nothing is logged to Comet")
            return
        comet_ml = self._import()
        api_key = self._api_key.get() or comet_ml.get_config()["comet.api_key"]
        online = self.online
        if online is None:
            online = bool(api_key)
        elif online and not api_key:
            logger.warning(
                "comet_ml sink: online logging was asked for but no Comet API key is configured "
                "(COMET_API_KEY); logging offline instead"
            )
            online = False
        offline_directory = self.offline_directory
        if not online and offline_directory is None and run.output_dir:
            offline_directory = os.path.join(run.output_dir, "comet")
        if offline_directory:
            os.makedirs(offline_directory, exist_ok=True)
        config = comet_ml.ExperimentConfig(
            name=self.experiment_name or run.run_name or run.run_id,
            tags=[*self.tags, run.run_id],
            offline_directory=offline_directory,
            log_code=self.log_code,
            log_graph=False,
            parse_args=self.parse_args,
            log_env_details=self.log_env_details,
            # System-metric samplers (cpu, gpu, network, disk) are threads in the
            # training process that take the GIL every few seconds; they stay off
            # unless log_env_details asks for them.
            log_env_cpu=self.log_env_details,
            log_env_gpu=self.log_env_details,
            log_env_network=self.log_env_details,
            log_env_disk=self.log_env_details,
            log_env_host=self.log_env_details,
            auto_log_co2=False,
            # Comet would otherwise swap sys.stdout/sys.stderr process-wide, from this
            # sink's thread, for the experiment's lifetime.
            auto_output_logging=None,
            log_git_metadata=self.log_code,
            log_git_patch=self.log_code,
            auto_param_logging=False,
            auto_metric_logging=False,
            display_summary_level=self.display_summary_level,
        )
        continued = self.last_experiment_key if self.last_bus_run_id == run.run_id else None
        if continued is None:
            self.last_experiment_key = self.last_bus_run_id = None

        def start(key: str | None, mode: str | None) -> Any:
            # comet_ml.start logs its init parameters, API key included, at ERROR when
            # it cannot get or create the experiment (a key not found with "get").
            loggers = [logging.getLogger(n) for n in _START_LOGGERS]
            redacting = _RedactFilter(api_key)
            for lg in loggers:
                lg.addFilter(redacting)
            try:
                return comet_ml.start(
                    api_key=api_key if online else None,
                    workspace=self.workspace,
                    project_name=self.project_name,
                    experiment_key=key,
                    mode=mode,
                    online=online,
                    experiment_config=config,
                )
            finally:
                for lg in loggers:
                    lg.removeFilter(redacting)

        try:
            if continued is None:
                self._experiment = start(self.experiment_key, self.mode)
            else:
                # The same bus run opened again (our Trainer closes its bus at the end of
                # train(); evaluate() opens a new one): continue its experiment. "get"
                # online is an ExistingExperiment; offline, an archive that `comet upload`
                # appends to that experiment (once the first archive is uploaded).
                try:
                    self._experiment = start(continued, "get")
                except comet_ml.exceptions.ExperimentNotFound:
                    # E.g. started offline, now online: that experiment is not on the server.
                    logger.warning(
                        "comet_ml sink: experiment %s of run %s is not on the server (logged offline and not "
                        "uploaded?); starting a new experiment",
                        continued,
                        run.run_id,
                    )
                    continued = None
                    self._experiment = start(self.experiment_key, self.mode)
                else:
                    logger.info("comet_ml sink: continuing experiment %s of run %s", continued, run.run_id)
        except (ValueError, comet_ml.exceptions.InvalidExperimentMode, comet_ml.exceptions.InvalidAPIKey) as exc:
            # Configuration mistakes; anything else (a server error) goes to the bus's retry logic.
            raise SinkConfigError(f"comet_ml sink: could not start the experiment: {self._redact(str(exc))}") from None
        if not getattr(self._experiment, "alive", True):
            # The SDK logs "Failed to create experiment" (a 401, a 5xx, no connection)
            # and returns an experiment that is not alive: it drops whatever is logged
            # to it. Failing the open makes the bus count (or spool) the events and try
            # the open again with its next batch.
            dead, self._experiment = self._experiment, None
            try:
                dead.end()
            except Exception:  # nothing was started: nothing to lose
                pass
            where = "online" if online else "offline"
            raise SinkError(
                f"comet_ml sink: Comet did not start the {where} experiment (the SDK's 'COMET ERROR' log above says "
                "why: an API key the server refused, a server error, or no connection); nothing can be logged to it"
            )
        self._online = online
        self._continued = continued is not None
        if online:
            # On the server from now on: a reopen continues it even if this close fails.
            self.last_experiment_key, self.last_bus_run_id = self._experiment.get_key(), run.run_id
        if continued is None:
            self._experiment.log_other("eventbus_run_id", run.run_id)

    def _import(self) -> Any:
        for name, value in _SDK_DEFAULTS.items():
            os.environ.setdefault(name, value)
        # The SDK logs its init parameters, API key included, at DEBUG when an
        # experiment starts: those loggers never go below INFO while the sink uses them.
        start_logger = logging.getLogger("comet_ml.comet_start")
        if start_logger.getEffectiveLevel() < logging.INFO:
            start_logger.setLevel(logging.INFO)
        comet_ml = import_sdk("comet_ml", "comet", "comet_ml")
        import comet_ml.exceptions  # noqa: F401  (the error types open_sync catches)

        try:
            from comet_ml.config.config_constants import MAXIMAL_KEY_LENGTH
        except ImportError:  # moved in another version: the documented limit
            MAXIMAL_KEY_LENGTH = _NAME_LIMIT
        if isinstance(MAXIMAL_KEY_LENGTH, int) and MAXIMAL_KEY_LENGTH >= 50:
            self._name_limit = MAXIMAL_KEY_LENGTH
        return comet_ml

    def write_sync(self, batch: Sequence[BaseEvent]) -> None:
        """Log each event, in order."""
        if self._experiment is None:
            return
        if not getattr(self._experiment, "alive", True):
            # Ended by something else in this process (another experiment started,
            # comet_ml's own end): the SDK would drop these without a word.
            raise SinkError(
                "comet_ml sink: the Comet experiment is no longer alive (ended outside this sink?); not logged"
            )
        for event in batch:
            if isinstance(event, Log):
                self._log_metrics(rewrite_logs(event.values), event)
            elif isinstance(event, (Evaluate, Predict)):
                self._log_metrics(evaluation_names(event.metrics, event.prefix), event)
            elif isinstance(event, TrainBegin):
                self._train_begin(event)
            elif isinstance(event, TrainEnd):
                self._train_end(event)

    def close_sync(self) -> None:
        """End the experiment: online, wait for the upload; offline, write the archive."""
        experiment, self._experiment = self._experiment, None
        if experiment is not None:
            experiment.end()
            if not self._online:
                self.archive_path = _find_archive(experiment)
                if self.archive_path and self._run is not None:
                    # Written: a reopen for this run continues the experiment.
                    self.last_experiment_key, self.last_bus_run_id = experiment.get_key(), self._run.run_id
            if self.archive_path:
                logger.info(
                    "comet_ml sink: offline experiment saved to %s (send it with `comet upload`%s)",
                    self.archive_path,
                    ", after the archives written before it for this experiment" if self._continued else "",
                )

    def _end_stale(self) -> None:
        """End the experiment an open that failed after starting it, or a close that did
        not run, left behind (in this process): as a close would (an offline archive
        written is then continued), never failing the open."""
        if self._experiment is None:
            return
        try:
            self.close_sync()
        except Exception as exc:
            self._experiment = None
            logger.warning(
                "comet_ml sink: could not end the previous experiment: %s: %s", type(exc).__name__, self._redact(str(exc))
            )

    # -- events --------------------------------------------------------------------

    def _train_begin(self, event: TrainBegin) -> None:
        params: dict[str, Any] = {}
        if event.config:
            params["args"] = _clean(redact(event.config))
        if event.model_config:
            params["config"] = _clean(redact(event.model_config))
        if event.hparams:
            params["hparams"] = _clean(redact(event.hparams))
        if params:
            # Nested as transformers logs them: "args|learning_rate", "config|hidden_size".
            self._experiment.log_parameters(params, nested_support=True)
        if event.resumed_from:
            self._experiment.log_other("resumed_from", event.resumed_from)

    def _log_metrics(self, values: Mapping[str, Any], event: BaseEvent) -> None:
        metrics: dict[str, float] = {}
        limit = self._name_limit
        for key, value in self._scalars.scalars(values):
            last = self._last_step.get(key)
            if last is not None and last[0] == event.step and _same(last[1], value):
                # Already logged at this step (an evaluation arrives as Log and as
                # Evaluate). Another value at the same step is logged: an evaluate()
                # after train() on other data, at the step of the last evaluation.
                continue
            self._last_step[key] = (event.step, value)
            metrics[key if len(key) <= limit else self._short_name(key)] = value
        if metrics:
            self._experiment.log_metrics(metrics, step=event.step, epoch=event.epoch)

    def _short_name(self, key: str) -> str:
        """The name ``key``, longer than Comet's limit, is logged under: its first
        characters, ``~`` and the start of a hash of the whole name, within the limit.
        The SDK would cut it at the limit instead, so that names differing only past it
        (a PEFT model's ``...default.weight`` and ``...default.bias``) became one
        series, and warn at every step."""
        name = self._short_names.get(key)
        if name is not None:
            return name
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
        taken = self._short_taken
        for width in (8, 16, 32):  # a longer hash in the unlikely case of a clash
            name = f"{key[: self._name_limit - width - 1]}~{digest[:width]}"
            if name not in taken and name not in self._last_step:
                break
        self._short_names[key] = name
        taken.add(name)
        if f"long {key}" not in self._warned:
            self._warned.add(f"long {key}")
            logger.warning(
                "comet_ml sink: metric name %r has %d characters, over Comet's limit of %d (the SDK would cut it, "
                "merging it with names that differ only past the limit); logged as %r (shown once per key)",
                key,
                len(key),
                self._name_limit,
                name,
            )
        return name

    def _train_end(self, event: TrainEnd) -> None:
        exp = self._experiment
        exp.log_other("train_status", event.status)
        if event.best_metric is not None:
            exp.log_other("best_metric", event.best_metric)
        if event.best_model_checkpoint:
            exp.log_other("best_model_checkpoint", event.best_model_checkpoint)
        if event.status == "failed":
            message = self._redact(event.error or "training failed")
            exp.log_other("train_error", message)
            # Private in the SDK, but it is how Comet marks an experiment as crashed.
            report = getattr(exp, "_report_experiment_error", None)
            if callable(report):
                try:
                    report(message, has_crashed=True)
                except TypeError:
                    report(message)
        output_dir = self._run.output_dir if self._run else None
        if self.log_assets and output_dir and os.path.isdir(output_dir):
            logger.info("comet_ml sink: logging %s as assets; this may take time", output_dir)
            exp.log_asset_folder(output_dir, recursive=True, log_file_name=True, step=event.step)

    def _redact(self, text: str) -> str:
        return redact_text(text, self._api_key.get())


def _find_archive(experiment: Any) -> str | None:
    """The ``.zip`` an ended offline experiment wrote (named ``<id>[-<suffix>].zip``)."""
    directory = getattr(experiment, "offline_directory", None)
    key = getattr(experiment, "id", None)
    if not directory or not key:
        return None
    # Its exact name when the SDK says it (a continued experiment's archives share the key).
    suffix = getattr(experiment, "offline_archive_name_suffix", None)
    exact = os.path.join(directory, f"{key}-{suffix}.zip" if isinstance(suffix, str) and suffix else f"{key}.zip")
    if os.path.isfile(exact):
        return exact
    found = glob.glob(os.path.join(glob.escape(directory), f"{glob.escape(key)}*.zip"))
    return max(found, key=os.path.getmtime) if found else None


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def _clean(value: Any) -> Any:
    """Parameters as JSON-safe values: string keys, non-finite floats as strings."""
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
