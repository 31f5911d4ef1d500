"""MLflowSink: runs, params, tags and metric histories over MLflow's REST API.

One asynchronous client on the bus loop (``sinks._http``), no ``mlflow`` package
needed: ``experiments/get-by-name`` and ``create``, ``runs/create`` (or resume
``MLFLOW_RUN_ID``), ``runs/log-batch`` within MLflow's limits, ``runs/update`` at the
end.

It logs what transformers' ``MLflowCallback`` logs, under the same names: the training
arguments merged over the model config as params (once, ``MLFLOW_FLATTEN_PARAMS``,
``MLFLOW_MAX_LOG_PARAMS``), ``MLFLOW_TAGS`` as tags, each ``on_log`` value as a metric
at the global step, with names sanitised the way it does. Plus: evaluation and
prediction metrics even when the trainer did not also log them, NaN and infinity sent
as MLflow's JSON spells them, each checkpoint's path as a tag (no large upload), and
the run ended ``FINISHED``, ``FAILED`` or ``KILLED`` from ``TrainEnd.status``.

Names: transformers' character rule, then MLflow's own path and length rules
(:func:`sanitize_name`), reported in one warning line per batch. Two names that become
one (``acc@1`` and ``acc_1``) stay two series: the one MLflow takes as it is keeps the
name, the renamed one gets a short suffix of its own (from the first log holding
both; one logged alone before its twin appears had the plain name until then). A key the server refuses anyway (a rule this sink does not know, a param whose
value it will not change) costs that key, dropped for the rest of the run with one
warning, not the batch of metrics it came in.

Environment (as transformers documents it; explicit arguments win):
``MLFLOW_TRACKING_URI``, ``MLFLOW_EXPERIMENT_NAME`` (or ``MLFLOW_EXPERIMENT_ID``),
``MLFLOW_RUN_ID``, ``MLFLOW_TAGS`` (JSON), ``MLFLOW_NESTED_RUN``,
``MLFLOW_FLATTEN_PARAMS``, ``MLFLOW_MAX_LOG_PARAMS``; credentials from
``MLFLOW_TRACKING_TOKEN`` or ``MLFLOW_TRACKING_USERNAME`` + ``MLFLOW_TRACKING_PASSWORD``;
TLS from ``MLFLOW_TRACKING_INSECURE_TLS`` / ``MLFLOW_TRACKING_SERVER_CERT_PATH``.

Retries: each request gets a few fast attempts in ``sinks._http``; after that the
failure goes to the bus as a transient error and the bus retries the write. A retried
write resumes with the first request that did not get through, so nothing is logged
twice. When that resume state is lost (an isolated sink's child process killed in the
middle of a batch: the next child sends the whole batch again), each metric carries
its event's own timestamp, so a resent one is identical to the one stored, and
MLflow's SQL store keeps one of them.

Resuming: each run the sink creates is tagged ``eventbus.run_id`` with the bus's run
id. A resumed bus run (``RunInfo.resumed``, same run id: ``trainer.train(
resume_from_checkpoint=...)``, ``eventbus train --resume``) continues the MLflow run
so tagged (``runs/search`` in the experiment, the latest started that is not
deleted, whatever its status) instead of starting another; ``MLFLOW_RUN_ID`` still
wins, and a run that is not resumed starts a new one. The tag is on the server, so
this works from any machine and output directory, and one can find the MLflow run
of an eventbus run in the UI. A run continued by a resumed bus run (either way) is
asked what it already holds (``runs/get``: the latest step of each metric): a metric
at a step at or below that, for its key, is not sent again. ``MLFLOW_RUN_ID`` given
to a run that is not a resume (another phase of training logged into the same run)
gets every metric, as with transformers' callback. After a SIGKILL the checkpoint's high-water
mark is all the trainer has, so the resumed process publishes the steps between the
checkpoint and the kill again; MLflow would store them twice (new timestamps).
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import re
import time
from typing import Any, Mapping, Sequence
from urllib.parse import unquote, urlsplit, urlunsplit

import httpx

from eventbus.errors import SinkConfigError, SinkError, TransientSinkError
from eventbus.events import BaseEvent, Evaluate, Log, Predict, Save, TrainBegin, TrainEnd
from eventbus.redact import redact
from eventbus.sink import RunInfo, Sink
from sinks._common import ScalarFilter, check_option_types, distinct_name, flatten
from sinks._http import HttpClient, TokenProvider

__all__ = [
    "MLflowSink",
    "sanitize_name",
    "refused_name",
    "MAX_METRICS_PER_BATCH",
    "MAX_PARAMS_TAGS_PER_BATCH",
    "MAX_ENTITIES_PER_BATCH",
    "MAX_PARAM_VAL_LENGTH",
    "RUN_ID_TAG",
]

logger = logging.getLogger("sinks.mlflow")

# MLflow's own limits (mlflow/utils/validation.py).
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_ENTITIES_PER_BATCH = 1000
MAX_BATCH_LOG_REQUEST_SIZE = 1_000_000
MAX_PARAM_VAL_LENGTH = 6000
"""MLflow >= 2.? accepts 6000 characters per param value (older servers: 500; pass
``max_param_length`` to match yours)."""
MAX_TAG_VAL_LENGTH = 8000
MAX_ENTITY_KEY_LENGTH = 250

RUN_ID_TAG = "eventbus.run_id"
"""The tag holding the bus's run id on each MLflow run the sink creates; a resumed bus
run continues the run so tagged."""

_TRUE = {"1", "TRUE", "YES", "ON", "Y"}
_API = "/api/2.0/mlflow"

_STATUS = {"completed": "FINISHED", "stopped": "FINISHED", "interrupted": "KILLED", "failed": "FAILED"}
"""TrainEnd.status -> MLflow RunStatus. Early stopping is a normal end: FINISHED."""

_BAD_CHARS = re.compile(r"[^0-9A-Za-z_\-. :/]")
_ENTRY = re.compile(r"'(metrics|params|tags)\[(\d+)\](?:\.(\w+))?'")
"""Where MLflow's 400 names the entry of a log-batch it refused: ``'metrics[3].name'``."""
_SHOWN = 5  # names listed in a summary warning


def refused_name(name: str) -> bool:
    """Whether MLflow's server refuses ``name`` (of the characters it accepts) as a
    metric, param or tag key: its ``path_not_unique`` (mlflow/utils/validation.py: a
    name must be its own ``posixpath.normpath``, not ``.``, not start with ``..`` or
    ``/``) and its 250-character limit."""
    norm = posixpath.normpath(name)
    return (
        norm != name or norm == "." or norm.startswith("..") or norm.startswith("/") or len(name) > MAX_ENTITY_KEY_LENGTH
    )


def sanitize_name(name: str) -> str:
    """A metric/param/tag key MLflow accepts: transformers' character rule (anything but
    letters, digits, ``_-. :/`` becomes ``_``), at most 250 characters, then no empty,
    ``.`` or ``..`` path segments, no leading slash and no leading ``..`` (MLflow refuses
    names that would resolve to another path, and ``..dots``). Cut first, then
    repaired until MLflow's own rule (:func:`refused_name`) passes: a cut can leave a
    trailing ``/`` or ``/.``, which the server refuses, and one refused key loses the
    whole log-batch it is in."""
    out = _BAD_CHARS.sub("_", str(name))[:MAX_ENTITY_KEY_LENGTH]
    while refused_name(out):
        parts = ["__" if p == ".." else p for p in out.split("/") if p not in ("", ".")]
        if parts and parts[0].startswith(".."):
            head = parts[0].lstrip(".")
            parts[0] = "_" * (len(parts[0]) - len(head)) + head
        # Each pass only drops characters or replaces them one for one: it ends.
        out = "/".join(parts)[:MAX_ENTITY_KEY_LENGTH] or "_"
    return out


def _env_bool(name: str) -> bool | None:
    value = os.environ.get(name)
    return None if value is None else value.strip().upper() in _TRUE


def _metric_value(v: float) -> float | str:
    # MLflow's JSON (protobuf's mapping) spells non-finite doubles as strings; a bare
    # NaN token would make the whole request invalid JSON.
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "Infinity" if v > 0 else "-Infinity"
    return v


def _ms(time_ns: int) -> int:
    return time_ns // 1_000_000


class MLflowSink(Sink):
    """Log to an MLflow tracking server over its REST API.

    Arguments default to the ``MLFLOW_*`` environment variables (see the module
    docstring). ``tracking_uri`` is ``http(s)://host[:port][/prefix]`` (or an Azure ML
    ``azureml://`` URI, see :class:`sinks.azureml.AzureMLSink`). ``run_id`` resumes that
    run (params already set on it are not sent again, nor metrics at a step it already
    has); without it, a resumed bus run (``RunInfo.resumed``) continues the run tagged
    with its run id (:data:`RUN_ID_TAG`), if there is one. ``nested`` creates a child run of
    ``parent_run_id``, or of ``run_id`` when only that is given (as
    ``mlflow.start_run(nested=True)`` inside that run would). ``token`` / ``token_provider`` / ``username``
    + ``password`` authenticate; ``allow_insecure_token`` permits a credential over
    plain http to a non-loopback host. ``timeout`` bounds each HTTP attempt and
    ``max_attempts`` the fast attempts per request before the bus takes over.
    """

    name = "mlflow"
    events = (TrainBegin, Log, Evaluate, Predict, Save, TrainEnd)
    # The HTTP client's Python (httpx, JSON, retries) runs in a child process, off
    # the training process's GIL (eventbus.isolation); POSIX only. Set
    # isolate = False to keep it here.
    isolate = os.name == "posix"
    isolate_optional = True  # an instance that cannot be pickled runs here instead
    max_batch_size = 1024

    def __init__(
        self,
        tracking_uri: str | None = None,
        *,
        experiment_name: str | None = None,
        experiment_id: str | None = None,
        run_id: str | None = None,
        run_name: str | None = None,
        tags: Mapping[str, Any] | str | None = None,
        nested: bool | None = None,
        parent_run_id: str | None = None,
        flatten_params: bool | None = None,
        max_log_params: int | str | None = None,
        log_params: bool = True,
        max_param_length: int = MAX_PARAM_VAL_LENGTH,
        token: str | None = None,
        token_provider: TokenProvider | None = None,
        username: str | None = None,
        password: str | None = None,
        allow_insecure_token: bool = False,
        verify: bool | str | None = None,
        timeout: float = 30.0,
        max_attempts: int = 3,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        check_option_types(self.name, MLflowSink.__init__, locals())
        env = os.environ
        self.tracking_uri = tracking_uri or env.get("MLFLOW_TRACKING_URI") or None
        if not self.tracking_uri:
            raise SinkConfigError(
                f"{self.name} sink: no tracking server: pass tracking_uri='http://host:5000' or set MLFLOW_TRACKING_URI"
            )
        self.base_url, url_auth = _split_userinfo(self._base_url(self.tracking_uri))
        self.experiment_name = experiment_name or env.get("MLFLOW_EXPERIMENT_NAME") or None
        self.experiment_id = experiment_id or env.get("MLFLOW_EXPERIMENT_ID") or None
        self.run_id: str | None = None
        self.resume_run_id = run_id or env.get("MLFLOW_RUN_ID") or None
        self.run_name = run_name
        self.nested = bool(nested if nested is not None else _env_bool("MLFLOW_NESTED_RUN"))
        self.parent_run_id = parent_run_id
        if self.nested and self.parent_run_id is None and self.resume_run_id:
            # As with mlflow.start_run(nested=True) inside the run MLFLOW_RUN_ID names:
            # a child of that run, not that run itself.
            self.parent_run_id, self.resume_run_id = self.resume_run_id, None
        self.tags = self._parse_tags(tags if tags is not None else env.get("MLFLOW_TAGS"))
        self.flatten_params = bool(flatten_params if flatten_params is not None else _env_bool("MLFLOW_FLATTEN_PARAMS"))
        self.max_log_params = self._parse_max_params(
            max_log_params if max_log_params is not None else env.get("MLFLOW_MAX_LOG_PARAMS")
        )
        self.log_params = log_params
        if not isinstance(max_param_length, int) or max_param_length < 1:
            raise SinkConfigError(f"{self.name} sink: max_param_length must be a positive int, got {max_param_length!r}")
        self.max_param_length = max_param_length
        token = token or None
        # A credential given as an argument wins over the environment's (whose basic
        # auth would otherwise take precedence over it, as in MLflow's own client).
        explicit = token is not None or token_provider is not None
        if not explicit:
            token = env.get("MLFLOW_TRACKING_TOKEN") or None
        if not explicit or username or password:
            username = username or env.get("MLFLOW_TRACKING_USERNAME") or (url_auth[0] if url_auth else None)
            password = password or env.get("MLFLOW_TRACKING_PASSWORD") or (url_auth[1] if url_auth else None)
        if (username is None) != (password is None):
            raise SinkConfigError(
                f"{self.name} sink: basic auth needs both a username and a password "
                f"(MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)"
            )
        if verify is None:
            cert = env.get("MLFLOW_TRACKING_SERVER_CERT_PATH")
            verify = cert if cert else not _env_bool("MLFLOW_TRACKING_INSECURE_TLS")
        self._client_options: dict[str, Any] = dict(
            name=f"{self.name} sink",
            token=token,
            token_provider=token_provider,
            basic_auth=(username, password) if username and password else None,
            allow_insecure_token=allow_insecure_token,
            verify=verify,
            timeout=timeout,
            max_attempts=max_attempts,
            transport=transport,
        )
        # Validate the URL and the credential rules now, so a bad configuration is an
        # error when the sink is built, not a counted failure later.
        self._client: HttpClient | None = HttpClient(self.base_url, **self._client_options)
        self._filter = ScalarFilter(self.name)
        self._names: dict[str, str] = {}
        """original metric name -> the name MLflow got (only those that changed)."""
        self._name_cache: dict[str, str] = {}
        """original metric name -> the name MLflow gets; ``""`` for one MLflow refused."""
        self._owners: dict[str, str] = {}
        """The name MLflow gets -> the original it stands for: two originals that
        sanitise to one name are kept apart, never one series with two metrics in it."""
        self._renamed: list[tuple[str, str]] = []
        self._collided: list[tuple[str, str, str, str]] = []
        self._refused: set[tuple[str, str]] = set()
        """(``metrics``/``params``/``tags``, key) the server refused with a 400: not
        sent again for the rest of the run."""
        self._last: dict[str, tuple[int, float]] = {}
        self._params_set: set[str] = set()
        self.continued = False
        """Whether the run existed before this sink opened it (``MLFLOW_RUN_ID`` or a
        resumed bus run)."""
        self._floor: dict[str, int] | None = None
        """For a continued run: metric name -> the latest step the run held when opened
        (None until read; an entry goes once a later step of that metric is sent)."""
        self._skipped = 0
        self._pending: list[tuple[str, dict[str, Any]]] = []
        self._pending_for: Sequence[BaseEvent] | None = None
        self._ended = False
        self._final_status = "FINISHED"

    def __getstate__(self) -> dict[str, Any]:
        # For process isolation (sink.isolate): the HTTP client (a connection pool and
        # its locks) is rebuilt on first use in the child from the same options.
        state = self.__dict__.copy()
        state["_client"] = None
        return state

    # -- configuration ------------------------------------------------------------------

    @classmethod
    def available(cls) -> bool:
        """Configured when ``MLFLOW_TRACKING_URI`` is an http(s) server (an
        ``azureml://`` URI belongs to the ``azure_ml`` sink)."""
        uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        return uri.startswith(("http://", "https://"))

    def _base_url(self, uri: str) -> str:
        if uri.startswith("azureml://"):
            from sinks.azureml import azureml_to_https

            return azureml_to_https(uri)
        if uri.startswith(("http://", "https://")):
            return uri.rstrip("/")
        shown = _split_userinfo(uri)[0] if "@" in uri else uri
        raise SinkConfigError(
            f"{self.name} sink: tracking URI {shown!r} is not supported; this sink talks to a tracking server over "
            f"REST: use http(s)://host:port (start one with `mlflow server`), or azureml://... for Azure ML"
        )

    def _parse_tags(self, tags: Mapping[str, Any] | str | None) -> dict[str, str]:
        if tags is None or tags == "":
            return {}
        if isinstance(tags, str):
            try:
                tags = json.loads(tags)
            except ValueError as exc:
                raise SinkConfigError(
                    f"{self.name} sink: MLFLOW_TAGS must be a JSON object such as '{{\"team\": \"nlp\"}}': {exc}"
                ) from None
        if not isinstance(tags, Mapping):
            raise SinkConfigError(f"{self.name} sink: tags must be a mapping (MLFLOW_TAGS a JSON object), got {type(tags).__name__}")
        return {sanitize_name(k): str(v)[:MAX_TAG_VAL_LENGTH] for k, v in redact(dict(tags)).items()}

    def _parse_max_params(self, value: int | str | None) -> int | None:
        if value is None or value == "":
            return None
        try:
            n = int(value)
        except (TypeError, ValueError):
            n = -1
        if n < 0:
            raise SinkConfigError(f"{self.name} sink: MLFLOW_MAX_LOG_PARAMS must be a non-negative integer, got {value!r}")
        return n

    def __repr__(self) -> str:
        return f"<{type(self).__name__} name={self.name!r} url={self.base_url!r} run_id={self.run_id!r}>"

    @property
    def metric_names(self) -> dict[str, str]:
        """The metric names that were changed to satisfy MLflow: original -> logged,
        as known to the process that runs the sink (empty here when it runs in a child
        process, the default on POSIX; each change is also logged as a warning, which
        the child forwards to this process's loggers)."""
        return dict(self._names)

    @property
    def http(self) -> HttpClient:
        """The sink's HTTP client (counters ``requests``, ``retries``...)."""
        if self._client is None:
            self._client = HttpClient(self.base_url, **self._client_options)
        return self._client

    # -- lifecycle ------------------------------------------------------------------------

    async def open(self, run: RunInfo) -> None:
        """Find or create the experiment, then create the run, or continue one:
        ``MLFLOW_RUN_ID``'s, else for a resumed bus run the one tagged with its run id."""
        if self.run_id is not None:
            if self.continued and self._floor is None:
                # A new child process of an isolated sink (the last one died): what the
                # run holds, now including what the last child sent, is read again
                # (for a resumed bus run; otherwise only its params).
                await self._read_run(self.run_id, "continued")
                if not run.resumed:
                    self._floor = {}
            return
        http = self.http
        resume, source = self.resume_run_id, "MLFLOW_RUN_ID"
        experiment_id: str | None = None
        if not resume and run.resumed and run.run_id:
            experiment_id = self.experiment_id or await self._experiment_id()
            resume, source = await self._find_run(experiment_id, run.run_id), f"{RUN_ID_TAG}={run.run_id}"
        if resume:
            data = await self._read_run(resume, source)
            if not run.resumed:
                # MLFLOW_RUN_ID for a run that is not a resume (another phase of
                # training logged into the same run, its steps counted anew): every
                # metric is sent, as transformers' callback does.
                self._floor = {}
            self.run_id = resume
            self.continued = True
            await http.json("POST", f"{_API}/runs/update", json={"run_id": self.run_id, "status": "RUNNING"})
            tags = dict(self.tags)
            held = {t.get("key") for t in data.get("tags") or []}
            if run.run_id and RUN_ID_TAG not in held:
                tags[RUN_ID_TAG] = run.run_id  # so that a resume without MLFLOW_RUN_ID finds it too
            if tags:
                await http.json("POST", f"{_API}/runs/log-batch", json={"run_id": self.run_id, "tags": _kv(tags)})
            logger.info(
                "%s sink: continuing MLflow run %s (%s); metrics at a step it already has are not sent again",
                self.name,
                self.run_id,
                source,
            )
            return
        experiment_id = experiment_id or self.experiment_id or await self._experiment_id()
        tags = dict(self.tags)
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        tags.setdefault("mlflow.source.name", "eventbus-telemetry")
        if run.run_id:
            tags[RUN_ID_TAG] = run.run_id
        name = self.run_name or run.run_name
        body: dict[str, Any] = {"experiment_id": experiment_id, "start_time": _ms(time.time_ns()), "tags": _kv(tags)}
        if name:
            body["run_name"] = name
        data = await http.json("POST", f"{_API}/runs/create", json=body)
        try:
            self.run_id = data["run"]["info"]["run_id"]
        except (KeyError, TypeError):
            # A server may echo the request's Authorization header: scrubbed, then cut.
            shown = http.scrub(str(data))[:200]
            raise SinkError(f"{self.name} sink: runs/create answered without a run id: {shown}") from None
        logger.info("%s sink: MLflow run %s in experiment %s", self.name, self.run_id, experiment_id)

    async def _find_run(self, experiment_id: str, bus_run_id: str) -> str | None:
        """The latest started run of the experiment tagged with ``bus_run_id`` that is
        not deleted, whatever its status (an interrupted run ended KILLED, a killed
        one is still RUNNING); ``None`` when there is none or the server cannot say."""
        if "'" in bus_run_id or "\\" in bus_run_id:
            # MLflow's filter syntax has no escape for a quote inside a value.
            logger.warning(
                "%s sink: cannot search for the run tagged %s=%r (quote or backslash): starting a new run",
                self.name,
                RUN_ID_TAG,
                bus_run_id,
            )
            return None
        body = {
            "experiment_ids": [experiment_id],
            "filter": f"tags.`{RUN_ID_TAG}` = '{bus_run_id}'",
            "run_view_type": "ACTIVE_ONLY",
            "max_results": 1,
            "order_by": ["attributes.start_time DESC"],
        }
        try:
            data = await self.http.json("POST", f"{_API}/runs/search", json=body)
        except TransientSinkError:
            raise
        except SinkError as exc:
            # A server without tag search: what this sink did before it tagged runs.
            logger.warning(
                "%s sink: could not search for the run of resumed run %s, starting a new run: %s", self.name, bus_run_id, exc
            )
            return None
        for found in data.get("runs") or []:
            run_id = (found.get("info") or {}).get("run_id")
            if run_id:
                return str(run_id)
        logger.info(
            "%s sink: no MLflow run tagged %s=%s in experiment %s: starting one", self.name, RUN_ID_TAG, bus_run_id, experiment_id
        )
        return None

    async def _read_run(self, run_id: str, source: str) -> dict[str, Any]:
        """``runs/get``: note the params the run has (they cannot change) and the latest
        step of each of its metrics (nothing at or below it is sent again); returns
        the run's ``data``."""
        try:
            data = await self.http.json("GET", f"{_API}/runs/get", params={"run_id": run_id})
        except SinkError as exc:
            if isinstance(exc, TransientSinkError) or "RESOURCE_DOES_NOT_EXIST" not in str(exc):
                raise
            raise SinkConfigError(
                f"{self.name} sink: run {run_id!r} ({source}) does not exist on {self.base_url}"
                + ("; unset MLFLOW_RUN_ID to start a new run" if source == "MLFLOW_RUN_ID" else "")
            ) from None
        held = ((data.get("run") or {}).get("data") or {}) if isinstance(data, dict) else {}
        self._params_set = {p["key"] for p in held.get("params") or [] if "key" in p}
        floor: dict[str, int] = {}
        for m in held.get("metrics") or []:
            try:
                key, step = m["key"], int(m.get("step") or 0)  # a step of 0 may be left out of the JSON
            except (KeyError, TypeError, ValueError):
                continue
            if step >= floor.get(key, step):
                floor[key] = step
        self._floor = floor
        return held

    async def _experiment_id(self) -> str:
        if not self.experiment_name:
            return "0"  # MLflow's "Default" experiment
        http = self.http
        for _ in range(2):
            r = await http.request(
                "GET", f"{_API}/experiments/get-by-name", params={"experiment_name": self.experiment_name}, ok_statuses=(404,)
            )
            if r.status_code != 404:
                return str(r.json()["experiment"]["experiment_id"])
            r = await http.request("POST", f"{_API}/experiments/create", json={"name": self.experiment_name}, ok_statuses=(400,))
            if r.status_code != 400:
                return str(r.json()["experiment_id"])
            # 400 RESOURCE_ALREADY_EXISTS: another process created it in between.
            if "ALREADY_EXISTS" not in r.text:
                # A server may echo the request's Authorization header: scrubbed, then cut.
                raise SinkError(
                    f"{self.name} sink: could not create experiment {self.experiment_name!r}: {http.scrub(r.text)[:300]}"
                )
        raise SinkError(f"{self.name} sink: experiment {self.experiment_name!r} could neither be found nor created")

    async def write(self, batch: Sequence[BaseEvent]) -> None:
        """Turn the batch into log-batch requests and send them in order.

        When the bus retries the same batch after a failure, sending resumes at the
        first request that did not get through.
        """
        if self.run_id is None:
            raise SinkError(f"{self.name} sink: write before open")
        if batch is not self._pending_for:
            if self._pending:
                logger.debug("%s sink: discarding %d requests of a batch the bus gave up on", self.name, len(self._pending))
            self._pending = self._requests(batch)
            self._pending_for = batch
        http = self.http
        while self._pending:
            path, body = self._pending[0]
            try:
                await http.json("POST", path, json=body)
            except TransientSinkError:
                raise
            except SinkError as exc:
                if not path.endswith("/runs/log-batch") or " answered 400" not in str(exc):
                    raise
                # What replaces it (the rest of it, or its two halves) is sent next.
                self._pending[0:1] = [(path, b) for b in self._refused_batch(body, exc)]
                continue
            self._pending.pop(0)
            if path.endswith("/runs/update"):
                self._ended = True
        self._pending_for = None

    def _refused_batch(self, body: dict[str, Any], exc: SinkError) -> list[dict[str, Any]]:
        """A log-batch the server answered 400 (``exc``, which holds the start of its
        answer): what to send instead.

        One key MLflow refuses (a name it does not take, a param whose value it will
        not change) fails the whole request, up to a thousand metrics of many steps,
        every time it is sent: retrying or spooling it can never succeed. The key the
        server names (``metrics[3].name``) is dropped for the rest of the run, with one
        warning, and the rest of the batch is sent again; when the answer does not say
        which entry it is, the batch is sent in halves until the one refused alone is
        found. A 400 that is not about an entry (another error code, the run) is the
        error it was.
        """
        message = str(exc).split(" answered 400", 1)[-1].lstrip(": ")
        entries = [(kind, e) for kind in ("metrics", "params", "tags") for e in body.get(kind) or []]
        # About the run (a deleted run "must be in the 'active' state"), not an entry:
        # dropping keys would not help.
        words = message.replace("INVALID_PARAMETER_VALUE", "").lower()
        about_run = "'run_id'" in words or (bool(self.run_id) and str(self.run_id) in words and "param" not in words)
        if "INVALID_PARAMETER_VALUE" not in message or about_run or not entries:
            raise exc
        m = _ENTRY.search(message)
        found = None
        if m is not None and int(m.group(2)) < len(body.get(m.group(1)) or []):
            found = (m.group(1), body[m.group(1)][int(m.group(2))], m.group(3) or "")
        elif len(entries) == 1:
            found = (entries[0][0], entries[0][1], "")
        if found is None:
            half = len(entries) // 2
            return [_body(self.run_id, entries[:half]), _body(self.run_id, entries[half:])]
        kind, entry, field = found
        reason = self.http.scrub(message)[:300]
        if kind == "metrics" and field in ("value", "timestamp", "step"):
            # This value, not the name: the metric's other points still go.
            logger.warning(
                "%s sink: MLflow refused a value of metric %r at step %s, which is not sent: %s",
                self.name,
                entry.get("key"),
                entry.get("step"),
                reason,
            )
            rest = [(k, e) for k, e in entries if e is not entry]
        else:
            self._refuse(kind, str(entry.get("key")), reason)
            rest = [(k, e) for k, e in entries if not (k == kind and e.get("key") == entry.get("key"))]
            # The key is in the requests of this batch still to go, too.
            self._pending[1:] = [
                (p, _without(b, kind, str(entry.get("key")))) if p.endswith("/runs/log-batch") else (p, b)
                for p, b in self._pending[1:]
            ]
            self._pending[1:] = [(p, b) for p, b in self._pending[1:] if not p.endswith("/runs/log-batch") or _has_entries(b)]
        return [_body(self.run_id, rest)] if rest else []

    def _refuse(self, kind: str, key: str, reason: str) -> None:
        """Drop ``key`` (of ``kind``) for the rest of the run, with one warning."""
        if (kind, key) in self._refused:
            return
        self._refused.add((kind, key))
        if kind == "metrics":
            originals = [k for k, v in self._name_cache.items() if v == key]
            for k in originals:
                self._name_cache[k] = ""
            named = [k for k in originals if k != key]
            shown = f"metric {key!r}" + (f" (the name given for {named[0]!r})" if named else "")
        else:
            shown = f"{kind[:-1]} {key!r}"
        logger.warning(
            "%s sink: MLflow refused %s; it is not sent for the rest of this run (the rest of each batch is): %s",
            self.name,
            shown,
            reason,
        )

    async def close(self) -> None:
        """End the run, if a ``TrainEnd`` did not get through, with the status it
        carried (``FINISHED`` without one), and close the connection pool."""
        if self._skipped:
            logger.info(
                "%s sink: %d metric values were not sent: MLflow run %s already had their steps",
                self.name,
                self._skipped,
                self.run_id,
            )
        try:
            if self.run_id is not None and not self._ended:
                body = {"run_id": self.run_id, "status": self._final_status, "end_time": _ms(time.time_ns())}
                await self.http.json("POST", f"{_API}/runs/update", json=body)
                self._ended = True
        finally:
            if self._client is not None:
                await self._client.aclose()
                self._client = None

    # -- events -> requests -------------------------------------------------------------

    def _requests(self, batch: Sequence[BaseEvent]) -> list[tuple[str, dict[str, Any]]]:
        metrics: list[dict[str, Any]] = []
        params: list[dict[str, str]] = []
        tags: dict[str, str] = {}
        end: dict[str, Any] | None = None
        for ev in batch:
            if isinstance(ev, Log):
                metrics.extend(self._metrics(ev.values, ev))
            elif isinstance(ev, (Evaluate, Predict)):
                metrics.extend(self._metrics(ev.metrics, ev))
            elif isinstance(ev, TrainBegin):
                params.extend(self._params(ev))
            elif isinstance(ev, Save):
                if ev.checkpoint_dir:
                    tags["checkpoint.last"] = ev.checkpoint_dir
                    tags["checkpoint.last_step"] = str(ev.step)
                    if ev.is_best:
                        tags["checkpoint.best"] = ev.checkpoint_dir
            elif isinstance(ev, TrainEnd):
                if ev.best_model_checkpoint:
                    tags["checkpoint.best"] = ev.best_model_checkpoint
                if ev.best_metric is not None:
                    tags["best_metric"] = repr(ev.best_metric)
                if ev.status != "completed":
                    tags["eventbus.train_status"] = ev.status
                self._final_status = _STATUS.get(ev.status, "FINISHED")
                end = {
                    "run_id": self.run_id,
                    "status": self._final_status,
                    "end_time": _ms(ev.time_ns),
                }
        if self._renamed or self._collided:
            self._warn_names()
        kv = _kv(tags)
        if self._refused:
            params = [p for p in params if ("params", p["key"]) not in self._refused]
            kv = [t for t in kv if ("tags", t["key"]) not in self._refused]
        out = [(f"{_API}/runs/log-batch", body) for body in self._pack(metrics, params, kv)]
        if end is not None:
            out.append((f"{_API}/runs/update", end))
        return out

    def _metric_name(self, key: str) -> str:
        """The name MLflow gets for ``key``, worked out once per key (``""``: one the
        server refused, not sent). A name that needs no change keeps it when one
        renamed in the same log would take it (``acc_1`` beside ``acc@1``): the caller
        names those first (see :meth:`_metrics`)."""
        name = self._name_cache.get(key)
        if name is not None:
            return name
        clean = sanitize_name(key)
        owner = self._owners.get(clean)
        if clean == key and owner is not None and owner != key:
            # A name MLflow takes as it is owns it, whichever came first: the renamed
            # one that had it moves to a suffix of its own from now on (so a new
            # process, which may see them in another order, names them alike).
            moved = self._distinct(clean, owner)
            self._owners[moved] = owner
            self._names[owner] = self._name_cache[owner] = moved
            self._collided.append((owner, key, clean, moved))
        elif owner is not None and owner != key:
            # Two metrics, one name: never one series holding both. The renamed one
            # gets a suffix of its own (a hash of its name: the same in every process).
            shared, clean = clean, self._distinct(clean, key)
            self._collided.append((key, owner, shared, clean))
        self._owners[clean] = key
        if clean != key:
            self._names[key] = clean
            self._renamed.append((key, clean))
        if ("metrics", clean) in self._refused:
            clean = ""
        self._name_cache[key] = clean
        return clean

    def _distinct(self, clean: str, key: str) -> str:
        return distinct_name(clean, key, self._owners.__contains__, MAX_ENTITY_KEY_LENGTH, sanitize_name)

    def _warn_names(self) -> None:
        """One warning line for the names renamed in a batch (a model's per-layer names
        can be thousands on the first step), one for the collisions."""
        if self._renamed:
            renamed, self._renamed = self._renamed, []
            shown = ", ".join(f"{_short(k)} -> {_short(v)}" for k, v in renamed[:_SHOWN])
            more = f" and {len(renamed) - _SHOWN} more" if len(renamed) > _SHOWN else ""
            logger.warning(
                "%s sink: %d metric name%s MLflow does not accept %s logged under another: %s%s "
                "(each name is reported once)",
                self.name,
                len(renamed),
                "" if len(renamed) == 1 else "s",
                "is" if len(renamed) == 1 else "are",
                shown,
                more,
            )
        if self._collided:
            collided, self._collided = self._collided, []
            shown = "; ".join(
                f"{_short(k)} and {_short(o)} would both be {_short(n)}: {_short(k)} is logged as {_short(c)}"
                for k, o, n, c in collided[:_SHOWN]
            )
            more = f"; and {len(collided) - _SHOWN} more" if len(collided) > _SHOWN else ""
            logger.warning(
                "%s sink: %d metric name%s would be logged as another metric's name in MLflow, kept apart: %s%s",
                self.name,
                len(collided),
                "" if len(collided) == 1 else "s",
                shown,
                more,
            )

    def _metrics(self, values: Mapping[str, Any], ev: BaseEvent) -> list[dict[str, Any]]:
        # Runs for every logged value, on the bus thread: lookups bound once.
        out = []
        ts = _ms(ev.time_ns)
        step = ev.step
        names = self._name_cache
        last_of = self._last
        floor = self._floor
        if not values.keys() <= names.keys():
            # New names: those MLflow takes as they are claim their name first, so that
            # a renamed twin in this very log (or cached from an earlier one) moves
            # aside before any of its points is put under that name.
            for key in values:
                if key not in names and sanitize_name(key) == key:
                    self._metric_name(key)
        for key, value in self._filter.scalars(values):
            name = names.get(key)
            if name is None:
                name = self._metric_name(key)
            if not name:
                continue  # the server refused this name: not sent for the rest of the run
            if floor:
                # A continued run: a step it already holds for this metric was sent by
                # an earlier process (resent after a SIGKILL, say): not again. Per key,
                # so an evaluation at a step the training metrics reached still goes.
                held = floor.get(name)
                if held is not None:
                    if step <= held:
                        if not self._skipped:
                            logger.info(
                                "%s sink: MLflow run %s already has %r up to step %d: not sending it again "
                                "at the steps it has (for each metric)",
                                self.name,
                                self.run_id,
                                name,
                                held,
                            )
                        self._skipped += 1
                        continue
                    del floor[name]  # past it: what follows is new
            last = last_of.get(name)
            # The trainer may publish eval metrics both as a Log and as an Evaluate at
            # the same step (transformers does): log them once.
            if last is not None and last[0] == step and (last[1] == value or (math.isnan(last[1]) and math.isnan(value))):
                continue
            last_of[name] = (step, value)
            # value - value is 0.0 for a finite float only (NaN and inf give NaN).
            out.append({"key": name, "value": value if value - value == 0.0 else _metric_value(value), "timestamp": ts, "step": step})
        return out

    def _params(self, ev: TrainBegin) -> list[dict[str, str]]:
        if not self.log_params:
            return []
        merged: dict[str, Any] = {**ev.model_config, **ev.config, **ev.hparams}
        merged = redact(merged)  # the trainer redacts too; a second pass costs nothing
        if self.flatten_params:
            merged = flatten(merged, sep=".")
        items = list(merged.items())
        if self.max_log_params is not None and len(items) > self.max_log_params:
            logger.debug("%s sink: logging %d of %d params (MLFLOW_MAX_LOG_PARAMS)", self.name, self.max_log_params, len(items))
            items = items[: self.max_log_params]
        out = []
        truncated = []
        for key, value in items:
            name = sanitize_name(key)
            if name in self._params_set:
                continue  # params are immutable in MLflow: set once (a resumed run has them)
            text = str(value)
            if len(text) > self.max_param_length:
                truncated.append(name)
                text = text[: self.max_param_length]
            self._params_set.add(name)
            out.append({"key": name, "value": text})
        if truncated:
            logger.warning(
                "%s sink: params %s are longer than %d characters and were truncated (MLFLOW_FLATTEN_PARAMS=1 "
                "logs nested values separately)",
                self.name,
                truncated,
                self.max_param_length,
            )
        return out

    def _pack(
        self, metrics: list[dict[str, Any]], params: list[dict[str, str]], tags: list[dict[str, str]]
    ) -> list[dict[str, Any]]:
        """Split into log-batch bodies within MLflow's per-request limits."""
        bodies: list[dict[str, Any]] = []
        m = p = t = 0
        while m < len(metrics) or p < len(params) or t < len(tags):
            # Params and tags first (each at most 100, well under the 1 MB body limit),
            # then fill the rest of the 1000 entities with metrics.
            np_ = min(MAX_PARAMS_TAGS_PER_BATCH, len(params) - p)
            nt = min(MAX_PARAMS_TAGS_PER_BATCH, len(tags) - t)
            size = sum(len(x["value"]) + len(x["key"]) for x in params[p : p + np_]) + sum(
                len(x["value"]) + len(x["key"]) for x in tags[t : t + nt]
            )
            if size > MAX_BATCH_LOG_REQUEST_SIZE // 2:
                nt = 0  # long params and long tags: one kind per request
            nm = min(MAX_METRICS_PER_BATCH, MAX_ENTITIES_PER_BATCH - np_ - nt, len(metrics) - m)
            body: dict[str, Any] = {"run_id": self.run_id}
            if nm:
                body["metrics"] = metrics[m : m + nm]
            if np_:
                body["params"] = params[p : p + np_]
            if nt:
                body["tags"] = tags[t : t + nt]
            m, p, t = m + nm, p + np_, t + nt
            bodies.append(body)
        return bodies


def _split_userinfo(url: str) -> tuple[str, tuple[str, str] | None]:
    # http://user:pass@host: take the credentials out of the URL, which reprs, logs
    # and error messages show, and send them as basic auth instead.
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url, None
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port else "")
    clean = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return clean, (unquote(parts.username or ""), unquote(parts.password or ""))


def _short(name: str, limit: int = 80) -> str:
    """``name``'s repr for a warning line, cut in the middle when long (250 characters
    of a module path, five times over, make a line no one reads)."""
    text = repr(name)
    return text if len(text) <= limit else f"{text[: limit // 2]}...{text[-(limit // 2) :]}"


def _body(run_id: str | None, entries: Sequence[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """A log-batch body holding ``entries`` (kind, entry), in their order."""
    body: dict[str, Any] = {"run_id": run_id}
    for kind, entry in entries:
        body.setdefault(kind, []).append(entry)
    return body


def _without(body: dict[str, Any], kind: str, key: str) -> dict[str, Any]:
    if not any(e.get("key") == key for e in body.get(kind) or []):
        return body
    out = dict(body)
    kept = [e for e in body[kind] if e.get("key") != key]
    if kept:
        out[kind] = kept
    else:
        del out[kind]
    return out


def _has_entries(body: dict[str, Any]) -> bool:
    return any(body.get(kind) for kind in ("metrics", "params", "tags"))


def _kv(d: Mapping[str, str]) -> list[dict[str, str]]:
    return [{"key": sanitize_name(k), "value": str(v)[:MAX_TAG_VAL_LENGTH]} for k, v in d.items()]
