"""Keep secrets out of everything we write: configs, hparams, reprs and logs."""

from __future__ import annotations

import re
from typing import Any, Mapping

__all__ = ["REDACTED", "Secret", "is_secret_key", "redact", "redact_text"]

REDACTED = "***"

_SECRET_KEY = re.compile(r"(token|secret|password|passwd|api[_-]?key|apikey|authorization|credential)", re.IGNORECASE)


def is_secret_key(key: str) -> bool:
    """True for keys that name a secret (``api_key``, ``hub_token``, ``MLFLOW_TRACKING_PASSWORD``...)."""
    return bool(_SECRET_KEY.search(str(key)))


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
