"""Keep secrets out of everything we write: configs, hparams, reprs and logs."""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

__all__ = ["REDACTED", "Secret", "is_secret_key", "redact", "redact_str", "redact_text"]

REDACTED = "***"

# Words that name a secret wherever they are in a key (client_secret, db_password,
# COMET_API_KEY, apiKey, aws_secret_access_key, Authorization, credentials_json,
# AccountKey, connection_string, passphrase, signing_key).
_SECRET_WORD = re.compile(
    r"secret|password|passwd|passphrase|authorization|credential|webhook|connection[_\-. ]?string"
    r"|(?:api|access|private|account|signing|encryption|session|master|ssh|hmac|license)[_\-. ]?key",
    re.IGNORECASE,
)
# Short words only as words of their own in an identifier (db_pwd, PWD, db_pass,
# SENTRY_DSN, sas_url, blob_sig, sessionCookie), not inside one (author, passage) nor
# in words a space separates (a class label such as "mountain pass" is not a key
# naming a secret), nor in settings that count passes (pass_at_k, two_pass).
_SHORT_WORD = re.compile(
    r"(?:^|[_\-.])(?:pwd|pass|auth|bearer|sas|dsn|cookie)(?:$|[_\-.])|(?:^|[_\-.])sig$", re.IGNORECASE
)
_CAMEL_SHORT_WORD = re.compile(r"[a-z0-9](?:Pwd|Pass|Auth|Dsn|Cookie|Sig)$")
_NOT_A_SECRET = re.compile(
    r"(?:^|[_\-.])pass(?:[_\-.]?at|@)|(?:^|[_\-.])(?:one|two|three|single|multi|first|second|num|n|max|min)[_\-.]pass(?:es)?$"
    r"|(?:^|[_\-.])noise[_\-.]sig$",
    re.IGNORECASE,
)
# "token" only as the key's last word (hub_token, HF_TOKEN, authToken), as transformers
# masks ``*_token`` arguments: pad_token_id, include_num_input_tokens_seen or
# average_tokens_across_devices are settings, not secrets.
_TOKEN_LAST = re.compile(r"(?:^|[_\-. ])token$", re.IGNORECASE)
_CAMEL_TOKEN = re.compile(r"[a-z0-9]Token$")
# Query parameters that carry a signature or a one-time credential without a secret
# word in their name: Azure SAS ``sig``, S3/GCS presigned URLs, OAuth ``code``.
_SIGNATURE_PARAMS = frozenset(
    {"sig", "signature", "code", "key", "x-amz-signature", "x-amz-credential", "x-amz-security-token",
     "x-goog-signature", "x-goog-credential", "awsaccesskeyid"}
)

# In free text (a config value, an error message, an object's repr):
# Each name starts where an identifier starts (the lookbehind) and is at most 128
# characters: tried at every position of a long run of letters (a hash, base64 in an
# error message), an unanchored name made these quadratic (seconds for 20 kB).
_URL_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]{0,30}://[^/\s:@'\"]{0,256}):[^/\s@'\"]+@")
_QUERY_PARAM = re.compile(r"(?P<head>[?&;](?P<name>[A-Za-z0-9_.\-]{1,128})=)(?P<value>[^&#\s'\"<>]+)")
_QUOTED_ASSIGN = re.compile(
    r"(?P<head>(?<![A-Za-z0-9_.\-])(?P<name>[A-Za-z0-9_.\-]{1,128})['\"]?\s*[=:]\s*)(?P<q>['\"])(?P<value>[^'\"]*)(?P=q)"
)
_BARE_ASSIGN = re.compile(r"(?P<head>(?<![A-Za-z0-9_.\-])(?P<name>[A-Za-z0-9_.\-]{1,128})=)(?P<value>[^\s,;)\]}'\"&]+)")
# An Authorization header's credential echoed in text: the scheme as a header writes
# it, then something shaped like a credential (16 or more characters, a digit in them).
_BEARER = re.compile(
    r"(?P<head>\b(?:Bearer|Basic) )(?P<value>(?=[A-Za-z\-._~+/]*\d)[A-Za-z0-9\-._~+/]{16,}=*)", re.IGNORECASE
)
# A header line: whatever follows ``Authorization:`` (and its scheme) is the credential.
_AUTH_HEADER = re.compile(r"(?P<head>\bAuthorization\s*:\s*(?:[A-Za-z]+ )?)(?P<value>[^\s,;'\"]+)", re.IGNORECASE)
# A signature parameter's value is at least this long (``?key=train`` is a word).
_MIN_SECRET = 8


def is_secret_key(key: str) -> bool:
    """True for keys that name a secret: one containing ``secret``, ``password``,
    ``passwd``, ``passphrase``, ``authorization``, ``credential``, ``webhook``,
    ``connection_string``, or ``api_key``/``apikey``, ``access_key``,
    ``private_key``, ``account_key``, ``signing_key``, ``encryption_key``,
    ``session_key``, ``master_key``, ``ssh_key``, ``hmac_key``, ``license_key`` (any
    case and separator); one with the word ``pwd``, ``pass``, ``auth``, ``bearer``,
    ``sas``, ``dsn`` or ``cookie`` between ``_``, ``-`` or ``.`` or in camelCase
    (``db_pwd``, ``DB_PASS``, ``SENTRY_DSN``, ``sessionCookie``; not ``author``, a label
    such as ``fortune cookie``, nor ``pass_at_k``/``two_pass``), or ``sig`` as its
    last word (``blob_sig``); or one
    ending in the word ``token`` (``hub_token``, ``MLFLOW_TRACKING_TOKEN``,
    ``authToken``), but not ``pad_token_id`` or ``max_tokens``."""
    key = str(key)
    if _SECRET_WORD.search(key) or _TOKEN_LAST.search(key) or _CAMEL_TOKEN.search(key):
        return True
    return bool((_SHORT_WORD.search(key) or _CAMEL_SHORT_WORD.search(key)) and not _NOT_A_SECRET.search(key))


def _credential_like(value: str, shortest: int = 1) -> bool:
    """Not empty, not ``None``, not a placeholder (``<pad>``, ``[PAD]``, ``***``)."""
    if len(value) < shortest or value in ("None", REDACTED):
        return False
    return not ((value[0], value[-1]) in (("<", ">"), ("[", "]")))


def _mask_param(m: re.Match[str]) -> str:
    name, value = m.group("name"), m.group("value")
    if is_secret_key(name):
        masked = _credential_like(value)
    else:  # a signature's name is a common word too (?key=train, ?code=python)
        masked = name.lower() in _SIGNATURE_PARAMS and _credential_like(value, _MIN_SECRET)
    return m.group("head") + REDACTED if masked else m.group(0)


def _mask_assign(m: re.Match[str]) -> str:
    if not is_secret_key(m.group("name")) or not _credential_like(m.group("value")):
        return m.group(0)
    q = m.groupdict().get("q") or ""
    return f"{m.group('head')}{q}{REDACTED}{q}"


def redact_str(text: str) -> str:
    """``text`` with the credentials it visibly carries replaced by ``"***"``: a URL's
    password (``https://user:***@host``), query parameters that are secrets or
    signatures (``?sig=***``, ``&access_token=***``, ``X-Amz-Signature=***``),
    ``name=value`` / ``"name": "value"`` pairs whose name is a secret's
    (:func:`is_secret_key`: ``api_key='***'`` in an object's repr) and
    ``Bearer``/``Basic`` credentials. Placeholders are left (a tokenizer's
    ``pad_token='<pad>'``), as are short values of parameters named like common
    words (``?key=train``). For what configs and error messages hold as plain text."""
    if not text or not isinstance(text, str):
        return text
    if "://" in text and "@" in text:
        text = _URL_USERINFO.sub(lambda m: m.group("head") + ":" + REDACTED + "@", text)
    if "=" in text:
        text = _QUERY_PARAM.sub(_mask_param, text)
        text = _BARE_ASSIGN.sub(_mask_assign, text)
    if "=" in text or ":" in text:
        text = _QUOTED_ASSIGN.sub(_mask_assign, text)
    if " " in text:
        text = _BEARER.sub(lambda m: m.group("head") + REDACTED, text)
    if ":" in text:
        text = _AUTH_HEADER.sub(lambda m: m.group("head") + (m.group("value") if m.group("value") == REDACTED else REDACTED), text)
    return text


def _fields(value: Any) -> Mapping[str, Any] | None:
    """The fields of a config object that is not a mapping, as a mapping, or None:
    a dataclass instance, a pydantic model, an ``argparse.Namespace`` or
    ``types.SimpleNamespace``. Each is read field by field so that a secret inside
    it is masked, not written out with the object's repr."""
    if isinstance(value, type):
        return None
    if dataclasses.is_dataclass(value):
        return {f.name: getattr(value, f.name, None) for f in dataclasses.fields(value)}
    dump = getattr(value, "model_dump", None)  # pydantic 2
    if callable(dump) and hasattr(type(value), "model_fields"):
        try:
            return dict(dump())
        except Exception:
            return None
    kind = type(value)
    if (kind.__module__, kind.__name__) in (("argparse", "Namespace"), ("types", "SimpleNamespace")):
        return dict(vars(value))
    return None


def redact(value: Any, _depth: int = 0) -> Any:
    """A copy of ``value`` with the values of secret-named keys replaced by ``"***"``:
    mappings and sequences recursively; dataclass instances, pydantic models and
    namespaces as dicts of their fields (so that a secret inside one is masked rather
    than written out with the object's repr); strings through :func:`redact_str`."""
    if isinstance(value, str):
        return redact_str(value)
    if _depth > 30:
        return value
    if isinstance(value, Mapping):
        return {
            k: (REDACTED if is_secret_key(k) and v not in (None, "") else redact(v, _depth + 1)) for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        items = [redact(v, _depth + 1) for v in value]
        try:
            if hasattr(value, "_fields"):  # a namedtuple: positional fields
                return type(value)(*items)
            return type(value)(items)
        except TypeError:  # a sequence type with a signature of its own
            return items
    fields = _fields(value)
    if fields is not None:
        return redact(fields, _depth + 1)
    return value


def redact_text(text: str, *secrets: str | None) -> str:
    """``text`` with every occurrence of each non-empty secret replaced by ``"***"``,
    also where it appears escaped (``\\n`` for a newline, as in a repr)."""
    for s in secrets:
        if s and len(s) >= 4:
            text = text.replace(s, REDACTED)
            escaped = repr(s)[1:-1]
            if escaped != s:
                text = text.replace(escaped, REDACTED)
    return text


class Secret:
    """Holds a secret (an API key, a token) so that no repr, log line or traceback
    shows it; ``get()`` returns the value for the one place that needs it."""

    __slots__ = ("_value",)

    def __init__(self, value: str | None) -> None:
        self._value = value or None

    def get(self) -> str | None:
        """The secret itself, or ``None``."""
        return self._value

    def __bool__(self) -> bool:
        return self._value is not None

    def __repr__(self) -> str:
        return REDACTED if self._value else "None"

    __str__ = __repr__
