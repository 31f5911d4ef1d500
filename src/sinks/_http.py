"""Shared asynchronous HTTP plumbing for the sinks that talk to a REST backend.

One :class:`HttpClient` per sink, on the bus loop, built on ``httpx.AsyncClient``.

Where retries live
------------------
Two layers compose, and each does what it is good at:

* **Here, per request**: a few *fast* attempts (``max_attempts``, default 3) for the
  blips a single request meets: a reset connection, a timeout, a 408, 429 or 5xx. The
  wait between attempts is exponential with jitter (``backoff * 2**n``, capped at
  ``backoff_max``), or exactly what the server's ``Retry-After`` asked for when that is
  at most ``max_retry_after`` seconds.
* **On the bus, per batch**: when those attempts are spent (or the server asked for a
  longer wait than ``max_retry_after``), the request fails with
  :class:`~eventbus.errors.TransientSinkError`, carrying the server's ``retry_after``
  when it gave one. The bus then retries the whole ``write`` with its own, slower
  backoff (honouring ``retry_after``), opens the circuit when a backend stays down, and
  spools or counts what never got through. The sink, not this module, makes a retried
  write resume where it stopped instead of sending twice.

Errors that retrying cannot fix (a 400 from a bad request, a 403, a 404, or a 401 that a
fresh token did not cure) raise a plain :class:`~eventbus.errors.SinkError`, which the
bus counts without retrying.

Credentials
-----------
A bearer token, static or from a token provider (any callable, sync or async, that
returns a string or an object with a ``.token`` attribute such as azure-identity's
``AccessToken``; an ``expires_on`` attribute is honoured), or HTTP basic auth. On a 401
the provider is asked again once and the request repeated. A credential is never sent
over plain ``http://`` to a host that is not loopback unless ``allow_insecure_token``
is true, TLS certificates are verified unless the caller says otherwise, and the
credential never appears in a repr, a log line or an exception message.
"""

from __future__ import annotations

import base64
import email.utils
import inspect
import ipaddress
import logging
import random
import ssl
import time
from typing import Any, Awaitable, Callable, Mapping, Union
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
import httpx
import msgspec

from eventbus.errors import SinkConfigError, SinkError, TransientSinkError
from eventbus.redact import REDACTED, redact_str, redact_text

__all__ = [
    "HttpClient",
    "TokenProvider",
    "RETRY_STATUSES",
    "is_loopback_host",
    "parse_retry_after",
]

logger = logging.getLogger("sinks.http")

_JSON_HEADERS = {"Content-Type": "application/json"}

TokenProvider = Callable[[], Union[str, Any, Awaitable[Any]]]
"""A callable returning a bearer token: a ``str`` or an object with ``.token`` (and
optionally ``.expires_on``, seconds since the epoch), or an awaitable of either."""

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504}) | frozenset(range(505, 600))
"""HTTP statuses worth retrying: request timeout, rate limited, and every 5xx."""

# Refresh a provider's token this long before it says it expires, so that a request
# in flight does not race the expiry.
_EXPIRY_MARGIN_S = 300.0


def is_loopback_host(host: str | None) -> bool:
    """Whether ``host`` (a name or an IP literal) is this machine's loopback."""
    if not host:
        return False
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date),
    or ``None`` when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


class _BearerAuth(httpx.Auth):
    """Adds ``Authorization: Bearer`` from the client's current token."""

    def __init__(self, client: HttpClient) -> None:
        self._client = client

    def auth_flow(self, request: httpx.Request):  # type: ignore[override]
        token = self._client._token
        if token:
            request.headers["Authorization"] = f"Bearer {token}"
        yield request

    def __repr__(self) -> str:
        return f"<_BearerAuth {REDACTED}>"


class HttpClient:
    """An async JSON-over-HTTP client with retries, timeouts and bearer-token refresh.

    ``base_url`` is prefixed to every request path. ``token`` is a static bearer token;
    ``token_provider`` a callable asked for one (and asked again after a 401);
    ``basic_auth`` a ``(user, password)`` pair. ``timeout`` bounds each attempt
    (connect, read, write and pool), ``max_attempts`` the attempts per request (see the
    module docstring for how this composes with the bus's own retries).

    ``verify``: ``True`` (the default: certificates checked against the system's CAs),
    ``False``, a CA bundle path or an ``ssl.SSLContext``.
    ``transport`` and ``sleep`` exist for tests.
    """

    def __init__(
        self,
        base_url: str,
        *,
        name: str = "http",
        token: str | None = None,
        token_provider: TokenProvider | None = None,
        basic_auth: tuple[str, str] | None = None,
        timeout: float = 30.0,
        max_attempts: int = 3,
        backoff: float = 0.25,
        backoff_max: float = 4.0,
        max_retry_after: float = 10.0,
        verify: bool | str | ssl.SSLContext = True,
        allow_insecure_token: bool = False,
        headers: Mapping[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SinkConfigError(
                f"{name}: the URL must be http(s)://host[:port][/path], got {base_url!r}"
            )
        if not isinstance(max_attempts, int) or isinstance(max_attempts, bool) or max_attempts < 1:
            raise SinkConfigError(f"{name}: max_attempts must be an int >= 1, got {max_attempts!r}")
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout <= 0:
            raise SinkConfigError(f"{name}: timeout must be a positive number of seconds, got {timeout!r}")
        if token is not None and not isinstance(token, str):
            raise SinkConfigError(f"{name}: token must be a string, got {type(token).__name__}")
        if token:
            token = _clean_token(name, token, "token")
        if token_provider is not None and not callable(token_provider):
            raise SinkConfigError(f"{name}: token_provider must be callable, got {type(token_provider).__name__}")
        if token and token_provider:
            raise SinkConfigError(f"{name}: give either token or token_provider, not both")
        has_credential = bool(token or token_provider or basic_auth)
        if has_credential and parts.scheme == "http" and not is_loopback_host(parts.hostname):
            if not allow_insecure_token:
                raise SinkConfigError(
                    f"{name}: refusing to send a credential over plain http to {parts.hostname!r}, where anyone on "
                    f"the network can read it; use https://, or pass allow_insecure_token=True if this network is "
                    f"trusted"
                )
            logger.warning("%s: sending a credential over plain http to %s (allow_insecure_token=True)", name, parts.hostname)
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.max_retry_after = max_retry_after
        self.requests = 0
        """HTTP attempts made (each retry counts)."""
        self.retries = 0
        """Attempts repeated after a retryable failure."""
        self.token_refreshes = 0
        """Times the token provider was asked again after a 401."""
        self._token: str | None = token or None
        self._token_expires: float | None = None
        self._provider = token_provider
        self._basic = basic_auth
        self._sleep = sleep or anyio.sleep
        if isinstance(verify, str):
            try:
                verify = ssl.create_default_context(cafile=verify)
            except (OSError, ssl.SSLError) as exc:
                raise SinkConfigError(f"{name}: cannot load the CA bundle {verify!r} given to verify TLS: {exc}") from None
        auth: httpx.Auth | None
        if basic_auth is not None:
            auth = httpx.BasicAuth(*basic_auth)
        elif token or token_provider:
            auth = _BearerAuth(self)
        else:
            auth = None
        self._client = httpx.AsyncClient(
            base_url=self.base_url,
            auth=auth,
            timeout=httpx.Timeout(timeout),
            verify=verify,
            headers=dict(headers or {}),
            transport=transport,
            follow_redirects=False,
        )

    def __repr__(self) -> str:
        auth = "bearer" if (self._token or self._provider) else ("basic" if self._basic else "none")
        return f"<HttpClient {self.name} {self.base_url} auth={auth}>"

    # -- credentials -----------------------------------------------------------------

    def _secrets(self) -> tuple[str | None, ...]:
        if not self._basic:
            return (self._token,)
        # A server may echo the Authorization header: basic auth is there in base64.
        user, password = self._basic
        encoded = base64.b64encode(f"{user}:{password}".encode()).decode()
        return (self._token, password, encoded)

    def scrub(self, text: str) -> str:
        """``text`` with this client's credentials replaced by ``***``."""
        return redact_text(text, *self._secrets())

    async def _fetch_token(self) -> None:
        assert self._provider is not None
        provider = self._provider
        try:
            if inspect.iscoroutinefunction(provider):
                result = await provider()
            else:
                # A sync provider may block on the network (azure-identity does): keep
                # it off the bus loop.
                result = await anyio.to_thread.run_sync(provider)
            if inspect.isawaitable(result):
                result = await result
        except Exception as exc:
            # The provider's own message may hold anything; keep its type and scrub it.
            raise SinkError(f"{self.name}: the token provider failed: {type(exc).__name__}: {self.scrub(str(exc))}") from None
        token = result if isinstance(result, str) else getattr(result, "token", None)
        if not isinstance(token, str) or not token.strip():
            raise SinkError(
                f"{self.name}: the token provider returned {type(result).__name__}, expected a non-empty str or an "
                f"object with a .token str (such as azure.core.credentials.AccessToken)"
            )
        self._token = _clean_token(self.name, token, "token the token provider returned")
        expires = getattr(result, "expires_on", None)
        self._token_expires = float(expires) if isinstance(expires, (int, float)) else None

    async def _ensure_token(self) -> None:
        if self._provider is None:
            return
        if self._token is None or (
            self._token_expires is not None and time.time() > self._token_expires - _EXPIRY_MARGIN_S
        ):
            await self._fetch_token()

    # -- requests ----------------------------------------------------------------------

    def _delay(self, attempt: int) -> float:
        base = min(self.backoff_max, self.backoff * (2 ** (attempt - 1)))
        return base * random.uniform(0.5, 1.0)

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        ok_statuses: tuple[int, ...] = (),
    ) -> httpx.Response:
        """Send one request, retrying as the module docstring says, and return the
        response when it is a 2xx (or in ``ok_statuses``).

        Raises :class:`TransientSinkError` when retryable failures outlast
        ``max_attempts`` (or the server asks to wait longer than ``max_retry_after``),
        and :class:`SinkError` for any other failure.
        """
        refreshed = False
        attempt = 0
        # Encoded once, with msgspec (five times faster than the json module httpx
        # uses: a log-batch body holds up to a thousand metrics, encoded on the bus
        # thread), and sent again as it is on a retry.
        content = None if json is None else msgspec.json.encode(json)
        headers = _JSON_HEADERS if content is not None else None
        while True:
            attempt += 1
            await self._ensure_token()
            self.requests += 1
            try:
                response = await self._client.request(method, path, content=content, headers=headers, params=params)
            except httpx.TimeoutException as exc:
                failure: str = f"timed out ({type(exc).__name__})"
                retry_after: float | None = None
            except httpx.TransportError as exc:
                failure = f"connection failed ({type(exc).__name__}: {self.scrub(str(exc))})"
                retry_after = None
            else:
                status = response.status_code
                if 200 <= status < 300 or status in ok_statuses:
                    return response
                if status == 401 and self._provider is not None and not refreshed:
                    # An expired or revoked token: ask the provider once, and try again
                    # without spending an attempt.
                    refreshed = True
                    self.token_refreshes += 1
                    await self._fetch_token()
                    attempt -= 1
                    continue
                detail = _body_excerpt(response, self.scrub)
                where = f"{method} {self.base_url}{path}"
                if status not in RETRY_STATUSES:
                    hint = ""
                    if status in (401, 403):
                        hint = " (check the token or credentials this sink was given)"
                    raise SinkError(f"{self.name}: {where} answered {status}{hint}: {detail}")
                failure = f"answered {status}: {detail}"
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                if retry_after is not None and retry_after > self.max_retry_after:
                    # Too long to hold this request open: hand the wait to the bus,
                    # which honours retry_after without blocking anything else.
                    raise TransientSinkError(
                        f"{self.name}: {where} {failure}; the server asked to retry after {retry_after:g} s",
                        retry_after=retry_after,
                    )
            if attempt >= self.max_attempts:
                raise TransientSinkError(
                    f"{self.name}: {method} {self.base_url}{path} {failure} (after {attempt} attempts)",
                    retry_after=retry_after,
                )
            self.retries += 1
            delay = retry_after if retry_after is not None else self._delay(attempt)
            logger.debug("%s: %s %s %s; retrying in %.2f s", self.name, method, path, failure, delay)
            await self._sleep(delay)

    async def json(self, method: str, path: str, **kwargs: Any) -> Any:
        """:meth:`request`, then the response body decoded as JSON (``{}`` if empty)."""
        response = await self.request(method, path, **kwargs)
        if not response.content:
            return {}
        try:
            return response.json()
        except ValueError:
            raise SinkError(
                f"{self.name}: {method} {self.base_url}{path} answered {response.status_code} with a body that is not "
                f"JSON: {_body_excerpt(response, self.scrub)}"
            ) from None

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()


def _body_excerpt(response: httpx.Response, scrub: Callable[[str], str], limit: int = 300) -> str:
    """The start of a response's body for an error message, on one line. ``scrub``
    (the client's credentials out) runs on the whole body first: cut first, a
    credential the server echoed could be cut in two, and its first half shown."""
    try:
        text = response.text
    except Exception:
        return "<unreadable body>"
    text = " ".join(redact_str(scrub(text)).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _clean_token(name: str, token: str, what: str) -> str:
    """``token`` without surrounding whitespace (a token read from a file or a
    Kubernetes secret ends in a newline), or a :class:`SinkConfigError` when it holds
    whitespace or a control character inside, which no HTTP header can carry: a
    mistake to fix, not a connection failure to retry. The value is never shown."""
    cleaned = token.strip()
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in cleaned):
        raise SinkConfigError(
            f"{name}: the {what} holds whitespace or a control character inside it, which an HTTP header cannot "
            f"carry; check how it was read (the value is not shown)"
        )
    return cleaned
