"""AzureMLSink: the azureml:// tracking URI mapping, and its token provider against a
loopback server that speaks MLflow's REST API under Azure ML's workspace prefix."""

from __future__ import annotations

import sys
import time
import types
from typing import Any, NamedTuple

import pytest

from eventbus import EventBus, Log, RunInfo, TrainBegin, TrainEnd
from eventbus.errors import SinkConfigError
from sinks import azureml
from sinks.azureml import AZURE_SCOPE, AzureMLSink, azureml_to_https
from sinks.mlflow import MLflowSink
from tests._faultserver import FaultServer, no_mlflow_env, server  # noqa: F401 (fixtures)

SCOPE = "/subscriptions/1234-abcd/resourceGroups/my-rg/providers/Microsoft.MachineLearningServices/workspaces/my-ws"
URI = f"azureml://eastus2.api.azureml.ms/mlflow/v1.0{SCOPE}"


class AccessToken(NamedTuple):
    """Shaped like azure.core.credentials.AccessToken."""

    token: str
    expires_on: int


def test_azureml_uri_maps_to_its_https_rest_base() -> None:
    assert azureml_to_https(URI) == f"https://eastus2.api.azureml.ms/mlflow/v1.0{SCOPE}"
    assert azureml_to_https(URI + "/") == f"https://eastus2.api.azureml.ms/mlflow/v1.0{SCOPE}"
    assert azureml_to_https(URI, api_version="v2.0") == f"https://eastus2.api.azureml.ms/mlflow/v2.0{SCOPE}"
    china = f"azureml://chinaeast2.api.ml.azure.cn/mlflow/v1.0{SCOPE}"
    assert azureml_to_https(china) == f"https://chinaeast2.api.ml.azure.cn/mlflow/v1.0{SCOPE}"


@pytest.mark.parametrize(
    "bad, says",
    [
        ("https://eastus2.api.azureml.ms/mlflow/v1.0" + SCOPE, "expected an azureml://"),
        ("azureml://eastus2.api.azureml.ms/mlflow/v1.0/subscriptions/x", "az ml workspace show"),
        ("azureml://eastus2.api.azureml.ms" + SCOPE, "not a workspace tracking URI"),
        ("azureml:///mlflow/v1.0" + SCOPE, "expected an azureml://"),
    ],
)
def test_a_bad_azureml_uri_says_what_is_wrong(bad: str, says: str) -> None:
    with pytest.raises(SinkConfigError, match=says):
        azureml_to_https(bad)


def test_api_version_is_checked() -> None:
    with pytest.raises(SinkConfigError, match="api_version"):
        azureml_to_https(URI, api_version="3")


def test_sinks_use_the_mapped_base(monkeypatch: pytest.MonkeyPatch) -> None:
    sink = AzureMLSink(URI, token="t0k3n-value", api_version="v2.0")
    assert sink.base_url == f"https://eastus2.api.azureml.ms/mlflow/v2.0{SCOPE}"
    assert "t0k3n-value" not in repr(sink) and "t0k3n-value" not in repr(sink.http)
    # the plain MLflow sink understands the URI too, as mlflow does with azureml-mlflow
    assert MLflowSink(URI).base_url == f"https://eastus2.api.azureml.ms/mlflow/v1.0{SCOPE}"


def test_available_only_when_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not AzureMLSink.available() and not MLflowSink.available()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", URI)
    assert AzureMLSink.available() and not MLflowSink.available()  # report_to="all" logs once
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert MLflowSink.available() and not AzureMLSink.available()


def test_no_credential_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(azureml, "_default_credential_provider", lambda: None)
    with pytest.raises(SinkConfigError, match="azure-identity"):
        AzureMLSink(URI)


def test_default_azure_credential_is_used_lazily_with_the_azure_ml_scope(monkeypatch: pytest.MonkeyPatch) -> None:
    scopes: list[str] = []

    class DefaultAzureCredential:
        def get_token(self, scope: str) -> AccessToken:
            scopes.append(scope)
            return AccessToken("from-identity", int(time.time()) + 3600)

    fake = types.ModuleType("azure.identity")
    fake.DefaultAzureCredential = DefaultAzureCredential  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "azure.identity", fake)
    provider = azureml._default_credential_provider()
    assert provider is not None
    assert provider().token == "from-identity"
    assert scopes == [AZURE_SCOPE]
    sink = AzureMLSink(URI)
    assert sink._client_options["token_provider"] is not None


def workspace_url(server: FaultServer) -> str:
    # The loopback server stands in for the workspace: same path, http on 127.0.0.1.
    return f"{server.url}/mlflow/v1.0{SCOPE}"


def run(sink: AzureMLSink) -> Any:
    bus = EventBus([sink], run=RunInfo(run_name="aml"))
    bus.publish(TrainBegin(step=0, config={"lr": 0.01}))
    for step in range(1, 4):
        bus.publish(Log(step=step, values={"loss": float(step)}))
    bus.publish(TrainEnd(step=3))
    bus.start()
    return bus.close(timeout=30).sinks["azure_ml"]


def test_token_provider_refreshes_on_401_against_the_workspace_path(server: FaultServer) -> None:
    issued: list[str] = []

    def provider() -> AccessToken:
        issued.append(f"aml-token-{len(issued)}")
        return AccessToken(issued[-1], int(time.time()) + 3600)

    server.valid_tokens = {"aml-token-1"}  # the first token is already revoked
    sink = AzureMLSink(workspace_url(server), token_provider=provider, experiment_name="aml-exp")
    http = sink.http  # closed with the sink; its counters stay readable
    stats = run(sink)
    assert http.token_refreshes == 1
    assert (stats.delivered, stats.dropped, stats.errors) == (5, 0, 0)
    assert issued == ["aml-token-0", "aml-token-1"]
    paths = [r.path for r in server.requests]
    assert all(p.startswith(f"/mlflow/v1.0{SCOPE}/api/2.0/mlflow/") for p in paths)
    assert [r.authorization for r in server.requests] == ["Bearer aml-token-0"] + ["Bearer aml-token-1"] * (len(paths) - 1)
    run_ = server.runs["run1"]
    assert [(m["step"], m["value"]) for m in run_["metrics"]] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert run_["params"] == {"lr": "0.01"} and run_["status"] == "FINISHED"


def test_a_token_about_to_expire_is_renewed_before_use(server: FaultServer) -> None:
    issued: list[int] = []

    async def provider() -> AccessToken:  # async providers work too
        issued.append(1)
        return AccessToken(f"short-lived-{len(issued)}", int(time.time()) + 60)  # inside the 5 min margin

    sink = AzureMLSink(workspace_url(server), token_provider=provider)
    stats = run(sink)
    assert stats.delivered == 5
    assert len(issued) == len(server.requests)  # asked before every request: never sent stale
    assert server.count("/runs/log-batch") == 1


def test_tracking_token_from_the_environment(server: FaultServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "env-token-xyz")
    sink = AzureMLSink(workspace_url(server))
    assert run(sink).delivered == 5
    assert {r.authorization for r in server.requests} == {"Bearer env-token-xyz"}
