"""Secrets never reach a model or any output: every form a secret can be echoed in is redacted.

A server or an exception may quote a key as is, URL-encoded, base64-encoded or JSON-escaped;
each of those forms is replaced by `[redacted]` wherever it appears in a value (strings inside
lists and dicts, keys included), before anything cuts the text short.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, quote_plus

REDACTED = "[redacted]"
MIN_SECRET_CHARS = 4  # shorter "secrets" would redact ordinary words


def encodings(secret: str) -> set[str]:
    """The forms `secret` takes when a server or a library echoes it."""
    raw = secret.encode()
    b64 = base64.b64encode(raw).decode()
    url_b64 = base64.urlsafe_b64encode(raw).decode()
    forms = {
        secret,
        quote(secret, safe=""),
        quote(secret),
        quote_plus(secret),
        b64,
        b64.rstrip("="),
        url_b64,
        url_b64.rstrip("="),
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
        "".join(f"\\u{ord(char):04x}" for char in secret),
    }
    return {form for form in forms if len(form) >= MIN_SECRET_CHARS}


def redact(value: Any, secrets: Iterable[str]) -> Any:
    """`value` with every form of every secret replaced by [redacted]."""
    forms = {form for secret in secrets if len(secret) >= MIN_SECRET_CHARS for form in encodings(secret)}
    if not forms:
        return value
    # Longest first: a secret holding another is redacted whole.
    return _redact(value, sorted(forms, key=len, reverse=True))


def _redact(value: Any, forms: list[str]) -> Any:
    if isinstance(value, str):
        for form in forms:
            value = value.replace(form, REDACTED)
        return value
    if isinstance(value, list | tuple):
        return [_redact(item, forms) for item in value]
    if isinstance(value, dict):
        return {_redact(str(key), forms): _redact(item, forms) for key, item in value.items()}
    return value
