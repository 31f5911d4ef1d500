"""Secrets never leak: API keys and tokens from arguments or the environment appear in
no log line, repr, exception message, JSONL line, spool record, trainer_state.json, or
config/hparams a sink logs.

Proved the blunt way: a real training run with every sink that runs locally
(TensorBoard, JSONL, Neptune offline, Comet offline, MLflow against a real ``mlflow
server``, a spooling sink, and an MLflow sink whose server echoes the Authorization
header back in its errors), distinctive fake secrets everywhere, and then a byte scan
of every file the run left, the MLflow server's answers, every log record and all
captured output. Plus: HTTP sinks verify TLS and refuse a credential over plain http
to a non-loopback host, through ``create_sink`` and ``report_to``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator, Sequence

import httpx
import pytest

from eventbus import EventBus, Log, RunInfo, Sink, TrainBegin, TrainEnd
from eventbus.errors import SinkConfigError
from eventbus.events import BaseEvent
from eventbus.registry import create_sink, sinks_from_report_to
from sinks.mlflow import MLflowSink
from tests._faultserver import FaultServer
from tests.conftest import clean_backend_env, require, require_module
from tests.integration.conftest import mlflow_server  # noqa: F401 - the real mlflow server fixture
from tests.trainer._loop_helpers import TinyClassifier, make_dataset
from trainer import Trainer, TrainingArguments

# Distinctive fake secrets: any of these bytes found anywhere is a leak.
SECRETS = {
    "NEPTUNE_API_TOKEN": "zzNEPenvTOKENq1w2e3r4",
    "COMET_API_KEY": "zzCOMenvKEYt5y6u7i8",
    "MLFLOW_TRACKING_TOKEN": "zzMLFenvTOKENo9p0a1s2",
    "MLFLOW_TRACKING_PASSWORD": "zzMLFenvPASSd3f4g5h6",
    "hub_token": "zzHUBargTOKENj7k8l9",
    "wandb_api_key": "zzWANDBargKEYz1x2c3",
    "neptune_arg": "zzNEParg_TOKENv4b5n6",
    "comet_arg": "zzCOMargKEYm7n8b9",
    "mlflow_arg": "zzMLFargTOKENa8s7d6",
    "model_cfg": "zzMODELcfgSECRETf5g4",
    "model_pw": "zzMODELnestedPWh3j2",
}
TRAIN = make_dataset(16)


@dataclasses.dataclass
class MyArguments(TrainingArguments):
    """A user's arguments with credentials in them, as transformers' hub_token."""

    hub_token: str | None = None
    wandb_api_key: str | None = None


class ModelWithConfig(TinyClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.config = {
            "hidden_size": 16,
            "api_key": SECRETS["model_cfg"],
            "backend": {"password": SECRETS["model_pw"], "host": "db.local"},
        }


class Down(Sink):
    """A backend that is down for the whole run: everything goes to its disk spool."""

    name = "spooling"
    spool = True
    max_retries = 0
    circuit_threshold = 1
    circuit_cooldown = 3600.0

    async def write(self, batch: Sequence[BaseEvent]) -> None:
        raise ConnectionError("backend unreachable")


def assert_no_secret(text: str | bytes, where: str) -> None:
    data = text.encode("utf-8", "replace") if isinstance(text, str) else text
    for name, secret in SECRETS.items():
        assert secret.encode() not in data, f"the secret {name} leaked into {where}"


@pytest.fixture
def secret_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    clean_backend_env(tmp_path, monkeypatch)
    monkeypatch.setenv("COMET_START_ONLINE", "false")
    for var in ("NEPTUNE_API_TOKEN", "COMET_API_KEY", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(var, SECRETS[var])
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    yield tmp_path


def test_a_full_run_leaves_no_secret_anywhere(secret_env, mlflow_server, caplog, capfd):
    tmp = secret_env
    caplog.set_level(logging.DEBUG)
    echo = FaultServer()  # its error bodies echo the Authorization header back
    try:
        echo.fail("/experiments/get-by-name", *[500] * 100)
        echoing = MLflowSink(echo.url, experiment_name="echo", token=SECRETS["mlflow_arg"], max_attempts=1)
        echoing.name = "mlflow_echo"  # type: ignore[misc]
        echoing.max_retries = 0
        echoing.circuit_threshold = 1
        echoing.circuit_cooldown = 3600.0
        mlflow = MLflowSink(mlflow_server, experiment_name="secrets", token=SECRETS["mlflow_arg"])
        sinks: list[Sink] = [
            create_sink("neptune", mode="offline", api_token=SECRETS["neptune_arg"], capture_hardware_metrics=False),
            create_sink("comet_ml", api_key=SECRETS["comet_arg"], offline_directory=str(tmp / "comet")),
            mlflow,
            echoing,
            Down(),
        ]
        args = MyArguments(
            output_dir=str(tmp / "out"),
            per_device_train_batch_size=4,
            max_steps=4,
            logging_steps=1,
            save_strategy="steps",
            save_steps=2,
            report_to=["tensorboard", "jsonl"],
            disable_tqdm=False,
            bus_close_timeout=30.0,
            hub_token=SECRETS["hub_token"],
            wandb_api_key=SECRETS["wandb_api_key"],
        )
        t = Trainer(ModelWithConfig(), args, train_dataset=TRAIN, sinks=sinks)
        t.train()
        stats = t.bus.stats()
    finally:
        echo.close()

    # Every sink ran; the echoing one failed (that is the point) and the spooling one spooled.
    for name in ("tensorboard", "jsonl", "neptune", "comet_ml", "mlflow"):
        s = stats.sinks[name]
        assert s.delivered == s.received and s.errors == 0, (name, s.last_error)
    assert stats.sinks["mlflow_echo"].delivered == 0 and "500" in (stats.sinks["mlflow_echo"].last_error or "")
    assert stats.sinks["spooling"].spooled == stats.sinks["spooling"].received > 0

    # Every file the run produced (checkpoints, trainer_state.json, JSONL, TensorBoard
    # event files, the spool, neptune's and comet's offline data).
    files = [p for p in tmp.rglob("*") if p.is_file()]
    kinds = {p.suffix for p in files} | {p.name for p in files}
    assert {"trainer_state.json", ".jsonl", ".spool", ".zip"} <= kinds, sorted(kinds)
    assert any(p.name.startswith("events.out.tfevents") for p in files)
    assert any(".neptune" in p.parts for p in files)
    for p in files:
        assert_no_secret(p.read_bytes(), str(p.relative_to(tmp)))

    # The MLflow server: the run's params and tags, as its REST API answers them.
    run = httpx.get(f"{mlflow_server}/api/2.0/mlflow/runs/get", params={"run_id": mlflow.run_id}, timeout=30)
    assert run.status_code == 200
    assert_no_secret(run.text, "the MLflow run's params/tags")
    params = {p["key"]: p["value"] for p in run.json()["run"]["data"].get("params", [])}
    assert params["hub_token"] == "***" and params["wandb_api_key"] == "***"  # redacted, not dropped
    assert params["learning_rate"] == str(args.learning_rate)

    # Reprs, exception messages, every log record and all output.
    for obj in [args, t.bus, *t.bus.sinks, stats, stats.to_dict()]:
        assert_no_secret(repr(obj), f"repr({type(obj).__name__})")
    assert_no_secret(str(args), "str(args)")
    assert_no_secret(args.to_json_string(), "args.to_json_string()")
    for s in stats.sinks.values():
        assert_no_secret(s.last_error or "", f"{s.name}'s last error")
    for r in caplog.records:
        assert_no_secret(r.getMessage(), f"the log record {r.name}: {r.getMessage()[:80]!r}")
        if r.exc_info:
            assert_no_secret(logging.Formatter().formatException(r.exc_info), f"a logged traceback ({r.name})")
    out, err = capfd.readouterr()
    assert_no_secret(out, "stdout")
    assert_no_secret(err, "stderr")
    # The echoing server did receive the token: the scan above is what proves no leak.
    assert any(r.authorization == f"Bearer {SECRETS['mlflow_arg']}" for r in echo.requests)


def test_the_config_and_hparams_sinks_log_are_redacted(tmp_path):
    """What TrainBegin carries (and so every sink gets) has secret-named keys redacted."""
    got: list[BaseEvent] = []

    class Keep(Sink):
        name = "keep"

        async def write(self, batch: Sequence[BaseEvent]) -> None:
            got.extend(batch)

    args = MyArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        report_to="none",
        disable_tqdm=True,
        hub_token=SECRETS["hub_token"],
        wandb_api_key=SECRETS["wandb_api_key"],
    )
    Trainer(ModelWithConfig(), args, train_dataset=TRAIN, sinks=[Keep()]).train()
    (begin,) = [e for e in got if isinstance(e, TrainBegin)]
    assert begin.config["hub_token"] == "***" and begin.config["wandb_api_key"] == "***"
    assert begin.hparams["hub_token"] == "***"
    assert begin.model_config["api_key"] == "***" and begin.model_config["backend"]["password"] == "***"
    assert begin.model_config["backend"]["host"] == "db.local"
    assert args.hub_token == SECRETS["hub_token"]  # the user's object is untouched


# -- TLS and plain http ------------------------------------------------------------------


def test_a_token_over_plain_http_to_a_remote_host_is_refused_through_create_sink_and_report_to(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("MLFLOW_", "AZUREML_")):
            monkeypatch.delenv(k)
    secret = SECRETS["mlflow_arg"]
    with pytest.raises(SinkConfigError, match="plain http") as info:
        create_sink("mlflow", tracking_uri="http://tracking.example.com:5000", token=secret)
    assert_no_secret(str(info.value), "the error")

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://10.1.2.3:5000")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", SECRETS["MLFLOW_TRACKING_TOKEN"])
    with pytest.raises(SinkConfigError, match="allow_insecure_token") as info:
        sinks_from_report_to(["mlflow"])
    assert_no_secret(str(info.value), "the error")
    with pytest.raises(SinkConfigError, match="plain http"):
        # The Trainer builds its sinks the same way.
        Trainer(TinyClassifier(), TrainingArguments(output_dir="unused", report_to=["mlflow"]), train_dataset=TRAIN)

    # Explicitly allowed, a loopback host, or https: accepted.
    (sink,) = sinks_from_report_to(["mlflow"], mlflow={"allow_insecure_token": True})
    assert sink.name == "mlflow"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert sinks_from_report_to(["mlflow"])[0].name == "mlflow"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://tracking.example.com")
    (https,) = sinks_from_report_to(["mlflow"])
    assert https._client_options["verify"] is True


@pytest.fixture
def tls_cert(tmp_path: Path) -> tuple[str, str]:
    require(shutil.which("openssl") is not None, "openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return str(cert), str(key)


def _send(sink: MLflowSink) -> Any:
    bus = EventBus([sink], run=RunInfo(run_name="tls"))
    bus.publish(TrainBegin(step=0, config={"lr": 0.1}))
    bus.publish(Log(step=1, values={"loss": 0.5}))
    bus.publish(TrainEnd(step=1))
    bus.start()
    return bus.close(timeout=30).sinks["mlflow"]


def test_tls_is_verified(tls_cert, monkeypatch, caplog):
    for k in list(os.environ):
        if k.startswith(("MLFLOW_", "AZUREML_", "SSL_CERT")):
            monkeypatch.delenv(k)
    server = FaultServer(tls=tls_cert)
    try:
        assert server.url.startswith("https://")
        secret = SECRETS["mlflow_arg"]
        # A self-signed certificate the system does not trust: nothing is sent.
        untrusted = MLflowSink(server.url, experiment_name="tls", token=secret, max_attempts=1)
        untrusted.max_retries = 0
        s = _send(untrusted)
        assert s.delivered == 0 and "CERTIFICATE_VERIFY_FAILED" in (s.last_error or "")
        assert server.requests == []  # the handshake failed: no request, no token on the wire
        # Trusted through verify=<CA bundle> (or MLFLOW_TRACKING_SERVER_CERT_PATH): delivered.
        monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", tls_cert[0])
        trusted = MLflowSink(server.url, experiment_name="tls", token=secret)
        s = _send(trusted)
        assert s.delivered == s.received == 3 and s.errors == 0
        assert all(r.authorization == f"Bearer {secret}" for r in server.requests)
        assert_no_secret(caplog.text, "the logs")
    finally:
        server.close()


def test_basic_auth_echoed_by_a_server_is_scrubbed_in_base64_too(monkeypatch, caplog):
    import base64

    for k in list(os.environ):
        if k.startswith(("MLFLOW_", "AZUREML_")):
            monkeypatch.delenv(k)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRETS["MLFLOW_TRACKING_PASSWORD"])
    caplog.set_level(logging.DEBUG)
    server = FaultServer()
    try:
        server.fail("/experiments/get-by-name", *[500] * 10)
        sink = MLflowSink(server.url, experiment_name="basic", max_attempts=1)
        sink.max_retries = 0
        s = _send(sink)
    finally:
        server.close()
    encoded = base64.b64encode(f"alice:{SECRETS['MLFLOW_TRACKING_PASSWORD']}".encode()).decode()
    assert any(r.authorization == f"Basic {encoded}" for r in server.requests)  # it was sent, and echoed
    assert s.delivered == 0 and "500" in (s.last_error or "")
    for text in (s.last_error or "", caplog.text):
        assert encoded not in text
        assert_no_secret(text, "the error")


# -- which keys are secrets ------------------------------------------------------------

SECRET_KEYS = [
    "hub_token", "HF_TOKEN", "token", "MLFLOW_TRACKING_TOKEN", "NEPTUNE_API_TOKEN", "authToken", "push_to_hub_token",
    "api_key", "COMET_API_KEY", "apiKey", "wandb_api_key", "access_key", "private-key",
    "password", "MLFLOW_TRACKING_PASSWORD", "db_passwd", "client_secret", "aws_secret_access_key",
    "Authorization", "credentials",
    "passphrase", "db_pwd", "PWD", "AccountKey", "storage_account_key", "connection_string", "AZURE_STORAGE_CONNECTION_STRING",
    "signing_key", "ssh_key", "hmac_key", "session_cookie", "slack_webhook_url", "sas_url", "sas", "auth", "db.pwd",
    "db_pass", "DB_PASS", "ldap_bind_pass", "dsn", "SENTRY_DSN", "sig", "blob_sig", "sessionCookie", "dbPass",
]
SETTING_KEYS = [
    # transformers' own arguments and model configs: settings, logged as they are
    "pad_token_id", "bos_token_id", "eos_token_id", "average_tokens_across_devices",
    "include_num_input_tokens_seen", "max_tokens", "tokenizer_name", "token_ids", "hub_model_id", "key",
    "author", "passage_len", "signal_dim", "sig_figs", "sort_key", "label_key", "text_key", "design",
    # class labels (a config's label2id) and settings with short words in them
    "mountain pass", "fortune cookie", "boarding pass", "pass_at_k", "pass@k", "noise_sig", "two_pass", "num_passes",
    "bypass", "compass", "sigma",
]


@pytest.mark.parametrize("key", SECRET_KEYS)
def test_secret_named_keys_are_secrets(key: str) -> None:
    from eventbus.redact import is_secret_key

    assert is_secret_key(key)


@pytest.mark.parametrize("key", SETTING_KEYS)
def test_settings_that_mention_tokens_are_not_secrets(key: str) -> None:
    from eventbus.redact import is_secret_key

    assert not is_secret_key(key)


def test_a_trainbegin_published_directly_reaches_no_file_with_its_secrets(tmp_path):
    # Not through the trainer (which redacts first): the event redacts itself, so the
    # JSONL file, which writes events as they are, gets no secret either.
    from sinks.jsonl import JSONLSink, read_jsonl

    path = tmp_path / "events.jsonl"
    config = {"hub_token": SECRETS["hub_token"], "nested": {"api_key": SECRETS["wandb_api_key"]}, "pad_token_id": 0}
    with EventBus([JSONLSink(path=path)]) as bus:
        bus.publish(TrainBegin(step=0, config=config, hparams={"hub_token": SECRETS["hub_token"]}, model_config={"pad_token_id": 0}))
    assert_no_secret(path.read_bytes(), "the JSONL file")
    (begin,) = [e for e in read_jsonl(path) if isinstance(e, TrainBegin)]
    assert begin.config == {"hub_token": "***", "nested": {"api_key": "***"}, "pad_token_id": 0}
    assert begin.model_config == {"pad_token_id": 0} and begin.hparams == {"hub_token": "***"}
    assert config["hub_token"] == SECRETS["hub_token"]  # the caller's dict is untouched


# -- secrets inside objects and text -----------------------------------------------------


@dataclasses.dataclass
class HubConfig:
    repo: str = "me/model"
    token: str | None = None


@dataclasses.dataclass
class NestedArguments(TrainingArguments):
    """Arguments holding a config object with a credential inside (not a dict)."""

    hub: HubConfig = dataclasses.field(default_factory=HubConfig)


class ObjectConfigModel(TinyClassifier):
    """A model whose config is a namespace holding a pydantic model, a dataclass, an
    argparse Namespace, a plain object whose repr shows its key, and URLs carrying
    credentials in their text."""

    def __init__(self) -> None:
        import argparse
        import types

        import pydantic

        class DataConfig(pydantic.BaseModel):
            url: str = "s3://bucket/data"
            api_key: str = SECRETS["model_cfg"]

        class Tracker:
            def __init__(self) -> None:
                self.api_key = SECRETS["wandb_api_key"]

            def __repr__(self) -> str:
                return f"Tracker(project='p', api_key={self.api_key!r})"

        super().__init__()
        self.config = types.SimpleNamespace(
            hidden_size=16,
            data=DataConfig(),
            hub=HubConfig(token=SECRETS["hub_token"]),
            cli=argparse.Namespace(hf_token=SECRETS["neptune_arg"], seed=1),
            tracker=Tracker(),
            data_url=f"https://acct.blob.core.windows.net/c/train.parquet?sv=2022-11-02&sig={SECRETS['comet_arg']}",
            mirror=f"https://alice:{SECRETS['model_pw']}@mirror.local/x",
        )


def test_secrets_inside_config_objects_and_urls_reach_no_sink_nor_file(tmp_path):
    """A credential held by a dataclass, a pydantic model, a namespace or an object's
    repr, or carried in a URL's text, is masked in TrainBegin: no JSONL line,
    TensorBoard event file or repr shows it, and the rest of the config is kept."""
    require_module("tensorboard")
    from sinks.jsonl import read_jsonl

    out = tmp_path / "out"
    args = NestedArguments(
        output_dir=str(out), max_steps=2, logging_steps=1, report_to=["jsonl", "tensorboard"], disable_tqdm=True,
        hub=HubConfig(token=SECRETS["mlflow_arg"]),
    )
    assert_no_secret(repr(args), "repr(args)")
    assert_no_secret(args.to_json_string(), "args.to_json_string()")
    Trainer(ObjectConfigModel(), args, train_dataset=TRAIN).train()
    for path in out.rglob("*"):
        if path.is_file():
            assert_no_secret(path.read_bytes(), str(path.relative_to(tmp_path)))
    (begin,) = [e for f in out.rglob("*.jsonl") for e in read_jsonl(f) if isinstance(e, TrainBegin)]
    assert begin.config["hub"] == {"repo": "me/model", "token": "***"}
    model = begin.model_config
    assert model["data"] == {"url": "s3://bucket/data", "api_key": "***"}
    assert model["hub"] == {"repo": "me/model", "token": "***"} and model["cli"] == {"hf_token": "***", "seed": 1}
    assert model["tracker"] == "Tracker(project='p', api_key='***')"
    assert model["data_url"] == "https://acct.blob.core.windows.net/c/train.parquet?sv=2022-11-02&sig=***"
    assert model["mirror"] == "https://alice:***@mirror.local/x" and model["hidden_size"] == 16
    assert args.hub.token == SECRETS["mlflow_arg"]  # the user's object is untouched


def test_a_crash_message_with_a_signed_url_reaches_no_file(tmp_path):
    """TrainEnd's error (an exception's text) has the credentials its text shows
    masked: a data loader's HTTP error names the presigned URL it failed on."""
    from sinks.jsonl import read_jsonl
    from trainer import TrainerCallback

    url = f"https://bucket.s3.amazonaws.com/shard-3?X-Amz-Signature={SECRETS['comet_arg']}&X-Amz-Expires=60"

    class Fails(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 2:
                raise RuntimeError(f"403 Client Error: Forbidden for url: {url}")

    out = tmp_path / "out"
    args = TrainingArguments(output_dir=str(out), max_steps=4, report_to=["jsonl"], disable_tqdm=True)
    with pytest.raises(RuntimeError, match="403"):
        Trainer(TinyClassifier(), args, train_dataset=TRAIN, callbacks=[Fails()]).train()
    (end,) = [e for f in out.rglob("*.jsonl") for e in read_jsonl(f) if isinstance(e, TrainEnd)]
    assert end.status == "failed"
    assert end.error == (
        "RuntimeError: 403 Client Error: Forbidden for url: "
        "https://bucket.s3.amazonaws.com/shard-3?X-Amz-Signature=***&X-Amz-Expires=60"
    )
    for path in out.rglob("*.jsonl"):
        assert_no_secret(path.read_bytes(), path.name)


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("https://alice:s3cr3t-pw@host/x", "https://alice:***@host/x"),
        ("postgresql://u:s3cr3t-pw@db:5432/x", "postgresql://u:***@db:5432/x"),
        ("https://a.blob.core.windows.net/c?sv=2022&sig=abcDEF%2B123&se=1", "https://a.blob.core.windows.net/c?sv=2022&sig=***&se=1"),
        ("https://api.x/v1?access_token=abc123&page=2", "https://api.x/v1?access_token=***&page=2"),
        ("Wandb(api_key='abc123', project='p')", "Wandb(api_key='***', project='p')"),
        ('{"password": "abc123", "lr": 0.1}', '{"password": "***", "lr": 0.1}'),
        ("login with token=abc123 failed", "login with token=*** failed"),
        ("echo: Bearer abcdef123456XYZ789", "echo: Bearer ***"),
        ("BertTokenizer(pad_token='[PAD]', unk_token='[UNK]')", "BertTokenizer(pad_token='[PAD]', unk_token='[UNK]')"),
        ("Authorization: Basic YWxpY2U6c2VjcmV0cGFzc3dvcmQx", "Authorization: Basic ***"),
        ("authorization: bearer abcdefghijklmnopqrstuvwxyz", "authorization: bearer ***"),
        ("connect with db_pass=hunter2x9", "connect with db_pass=***"),
        # settings and plain text stay as they are
        ("pad_token_id=0 max_tokens=5", "pad_token_id=0 max_tokens=5"),
        ("Basic baseline: lr sweep", "Basic baseline: lr sweep"),
        ("BASIC augmentation pipeline", "BASIC augmentation pipeline"),
        ("LlamaTokenizer(eos_token='</s>', pad_token='<pad>')", "LlamaTokenizer(eos_token='</s>', pad_token='<pad>')"),
        ("https://docs.x/search?code=python&key=train", "https://docs.x/search?code=python&key=train"),
        ("s3://bucket/data/train-*.parquet", "s3://bucket/data/train-*.parquet"),
        ("token embeddings: 512", "token embeddings: 512"),
        ("https://host/x?page=2&sort=asc", "https://host/x?page=2&sort=asc"),
    ],
)
def test_credentials_in_text_are_masked(text: str, masked: str) -> None:
    from eventbus.redact import redact_str

    assert redact_str(text) == masked


def test_a_token_read_with_its_newline_is_used_without_it(monkeypatch, caplog):
    """A token read from a file or a Kubernetes secret ends in a newline: it is sent
    without it (no header error retried as a connection failure, with the token in
    its message); whitespace inside a token is a configuration error that does not
    show the token."""
    from sinks._http import HttpClient

    caplog.set_level(logging.DEBUG)
    secret = SECRETS["MLFLOW_TRACKING_TOKEN"]
    server = FaultServer()
    try:
        for k in list(os.environ):
            if k.startswith(("MLFLOW_", "AZUREML_")):
                monkeypatch.delenv(k)
        sink = MLflowSink(server.url, experiment_name="newline", token=secret + "\n", max_attempts=1)
        sink.max_retries = 0
        _send(sink)
    finally:
        server.close()
    assert server.requests and all(r.authorization == f"Bearer {secret}" for r in server.requests)
    with pytest.raises(SinkConfigError, match="whitespace or a control character") as err:
        HttpClient("https://example.org", name="mlflow sink", token="abc def\r\nX-Injected: 1")
    assert "abc" not in str(err.value)


def test_an_error_body_echoing_a_long_token_is_not_shown_in_part(monkeypatch, caplog):
    """The server's body is scrubbed before it is cut for the message: a long token
    echoed near the cut is masked whole, not shown up to the cut."""
    caplog.set_level(logging.DEBUG)
    secret = "zz" + "LongBearerToken" * 20  # an Azure AD token is 1-2 KB
    server = FaultServer()
    try:
        for k in list(os.environ):
            if k.startswith(("MLFLOW_", "AZUREML_")):
                monkeypatch.delenv(k)
        # The server's body echoes the Authorization header after ~50 characters: the
        # 300-character cut falls inside the token.
        server.fail("/experiments/get-by-name", *[403] * 3)
        sink = MLflowSink(server.url, experiment_name="long", token=secret, max_attempts=1)
        sink.max_retries = 0
        s = _send(sink)
    finally:
        server.close()
    assert "403" in (s.last_error or "")
    # The body is in the message (what the server said helps), its token masked whole.
    assert "you sent Bearer ***" in (s.last_error or "")
    for text in (s.last_error or "", caplog.text):
        assert "zzLongBearerToken" not in text


def test_bridges_hyperparameters_with_secrets_inside_objects_are_masked() -> None:
    """What the Lightning and transformers bridges log as hyperparameters (a
    LightningModule's hparams often hold an argparse Namespace or a tracker object)."""
    import argparse

    from eventbus.bridges._common import safe_config, scalar_params

    class Tracker:
        def __repr__(self) -> str:
            return f"Tracker(project='p', api_key={SECRETS['wandb_api_key']!r})"

    hparams = {"lr": 1e-3, "tracker": Tracker(), "args": argparse.Namespace(hf_token=SECRETS["hub_token"], seed=1)}
    assert safe_config(hparams) == {
        "lr": 1e-3, "tracker": "Tracker(project='p', api_key='***')", "args": {"hf_token": "***", "seed": 1}
    }
    assert scalar_params(hparams) == {
        "lr": 1e-3, "tracker": "Tracker(project='p', api_key='***')", "args/hf_token": "***", "args/seed": 1
    }

