"""Keep secrets out of everything we write: configs, hparams, reprs and logs."""

from __future__ import annotations

import re
from typing import Any, Mapping

__all__ = ["REDACTED", "Secret", "is_secret_key", "redact", "redact_text"]

REDACTED = "***"

# Words that name a secret wherever they are in a key (client_secret, db_password,
# COMET_API_KEY, apiKey, aws_secret_access_key, Authorization, credentials_json).
_SECRET_WORD = re.compile(r"secret|password|passwd|authorization|credential|(?:api|access|private)[_\-. ]?key", re.IGNORECASE)
# "token" only as the key's last word (hub_token, HF_TOKEN, authToken), as transformers
# masks ``*_token`` arguments: pad_token_id, include_num_input_tokens_seen or
# average_tokens_across_devices are settings, not secrets.
_TOKEN_LAST = re.compile(r"(?:^|[_\-. ])token$", re.IGNORECASE)
_CAMEL_TOKEN = re.compile(r"[a-z0-9]Token$")


def is_secret_key(key: str) -> bool:
    """True for keys that name a secret: one containing ``secret``, ``password``,
    ``passwd``, ``authorization``, ``credential``, ``api_key``/``apikey``,
    ``access_key`` or ``private_key`` (any case and separator), or ending in the word
    ``token`` (``hub_token``, ``MLFLOW_TRACKING_TOKEN``, ``authToken``), but not
    ``pad_token_id`` or ``max_tokens``."""
    key = str(key)
    return bool(_SECRET_WORD.search(key) or _TOKEN_LAST.search(key) or _CAMEL_TOKEN.search(key))


def redact(value: Any) -> Any:
    """A copy of ``value`` (mappings and sequences, recursively) with the values of
    secret-named keys replaced by ``"***"``."""
    if isinstance(value, Mapping):
        return {k: (REDACTED if is_secret_key(k) and v not in (None, "") else redact(v)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value


def redact_text(text: str, *secrets: str | None) -> str:
    """``text`` with every occurrence of each non-empty secret replaced by ``"***"``."""
    for s in secrets:
        if s and len(s) >= 4:
            text = text.replace(s, REDACTED)
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
