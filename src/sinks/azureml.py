"""AzureMLSink: the MLflow REST client pointed at an Azure Machine Learning workspace.

An Azure ML workspace is an MLflow tracking server. Its tracking URI
(``az ml workspace show --query mlflow_tracking_uri``) looks like::

    azureml://<region>.api.azureml.ms/mlflow/v1.0/subscriptions/<sub>/resourceGroups/<rg>/
        providers/Microsoft.MachineLearningServices/workspaces/<workspace>

and its REST base is the same with ``https://`` (what the ``azureml-mlflow`` plugin
builds: the service host, then ``/mlflow/v1.0``, then the workspace scope); MLflow's
``/api/2.0/mlflow/...`` paths follow. Recent ``azureml-mlflow`` releases talk to
``/mlflow/v2.0`` when the client is MLflow >= 2; pass ``api_version="v2.0"`` to do the
same.

Credentials, first found wins: ``token_provider`` (any callable returning a token
string or an ``AccessToken``; asked again when the server answers 401 or the token is
about to expire), ``token`` / ``MLFLOW_TRACKING_TOKEN`` / ``AZUREML_RUN_TOKEN`` (set
inside Azure ML jobs), else azure-identity's ``DefaultAzureCredential`` for the scope
``https://management.azure.com/.default`` when ``azure-identity`` is installed.
"""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from eventbus.errors import SinkConfigError
from sinks._common import check_option_types
from sinks._http import TokenProvider
from sinks.mlflow import MLflowSink

__all__ = ["AzureMLSink", "azureml_to_https", "AZURE_SCOPE"]

AZURE_SCOPE = "https://management.azure.com/.default"
"""The OAuth scope azureml-mlflow asks tokens for (Azure public cloud)."""

_SCOPE_PATH = re.compile(
    r"^/mlflow/v(?P<version>[0-9.]+)"
    r"(?P<scope>/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.MachineLearningServices/workspaces/[^/]+)/?$",
    re.IGNORECASE,
)


def azureml_to_https(uri: str, api_version: str | None = None) -> str:
    """The https REST base of an Azure ML ``azureml://`` tracking URI.

    ``api_version`` (``"v1.0"`` or ``"v2.0"``) replaces the ``/mlflow/vX`` segment;
    ``None`` keeps the URI's own. Raises :class:`SinkConfigError` saying what is wrong
    with a URI that is not a workspace tracking URI.
    """
    parts = urlsplit(uri)
    if parts.scheme != "azureml" or not parts.netloc:
        raise SinkConfigError(
            f"azure_ml sink: expected an azureml://<region>.api.azureml.ms/mlflow/v1.0/subscriptions/... tracking URI, "
            f"got {uri!r}"
        )
    m = _SCOPE_PATH.match(parts.path)
    if m is None:
        raise SinkConfigError(
            f"azure_ml sink: {uri!r} is not a workspace tracking URI; it should end in "
            f"/mlflow/v1.0/subscriptions/<id>/resourceGroups/<group>/providers/"
            f"Microsoft.MachineLearningServices/workspaces/<name> (copy it from "
            f"`az ml workspace show --query mlflow_tracking_uri`)"
        )
    version = m.group("version")
    if api_version is not None:
        if api_version not in ("v1.0", "v2.0"):
            raise SinkConfigError(f"azure_ml sink: api_version must be 'v1.0' or 'v2.0', got {api_version!r}")
        version = api_version[1:]
    return urlunsplit(("https", parts.netloc, f"/mlflow/v{version}{m.group('scope')}", "", ""))


def _default_credential_provider() -> TokenProvider | None:
    try:
        from azure.identity import DefaultAzureCredential  # optional dependency
    except ImportError:
        return None
    credential = DefaultAzureCredential()

    def provider() -> Any:
        return credential.get_token(AZURE_SCOPE)

    return provider


class AzureMLSink(MLflowSink):
    """Log to an Azure ML workspace through its MLflow-compatible REST API.

    Takes every :class:`~sinks.mlflow.MLflowSink` argument; ``tracking_uri`` (default
    ``MLFLOW_TRACKING_URI``) is the workspace's ``azureml://`` URI (an ``https://`` REST
    base is taken as is). ``api_version`` picks ``/mlflow/v1.0`` or ``/mlflow/v2.0``.
    See the module docstring for where the token comes from.
    """

    name = "azure_ml"

    def __init__(
        self,
        tracking_uri: str | None = None,
        *,
        api_version: str | None = None,
        token: str | None = None,
        token_provider: TokenProvider | None = None,
        **options: Any,
    ) -> None:
        check_option_types(self.name, AzureMLSink.__init__, locals())
        self.api_version = api_version
        if token is None and token_provider is None:
            token = os.environ.get("MLFLOW_TRACKING_TOKEN") or os.environ.get("AZUREML_RUN_TOKEN") or None
            if token is None:
                token_provider = _default_credential_provider()
            if token is None and token_provider is None:
                raise SinkConfigError(
                    "azure_ml sink: no credential: pass token_provider= (e.g. "
                    "azure.identity.DefaultAzureCredential().get_token with scope "
                    f"{AZURE_SCOPE!r}), set MLFLOW_TRACKING_TOKEN, or pip install azure-identity"
                )
        super().__init__(tracking_uri, token=token, token_provider=token_provider, **options)

    @classmethod
    def available(cls) -> bool:
        """Configured when ``MLFLOW_TRACKING_URI`` is an ``azureml://`` URI."""
        return os.environ.get("MLFLOW_TRACKING_URI", "").startswith("azureml://")

    def _base_url(self, uri: str) -> str:
        if uri.startswith("azureml://"):
            return azureml_to_https(uri, getattr(self, "api_version", None))
        return super()._base_url(uri)
