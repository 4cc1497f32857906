"""Asking a local service how it is, over HTTP, with the standard library only.

The supervisor runs for as long as the stack does, so it stays small: urllib here instead of httpx (about
18 MB of RSS), and database migrations in a child process (`switchyard migrate`) instead of SQLAlchemy in
its own memory.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


def get(url: str, timeout_s: float = 1.0) -> tuple[int, Any]:
    """(status, decoded JSON body or None) of `GET url`; (0, None) when nothing answered in time."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as answer:  # noqa: S310 - a loopback URL we built
            status, body = answer.status, answer.read()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read()
    except (OSError, ValueError):
        return 0, None
    try:
        return status, json.loads(body) if body else None
    except ValueError:
        return status, None
