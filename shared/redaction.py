"""The one redaction policy (`logging.redact`), applied before anything is written anywhere.

Every sink goes through it: the prompt log (ingress redacts a record before it reaches the topic), the
services' own log lines (`RedactingFilter`, installed by `switchyard.shared.logs.setup_logging` on every service),
every error's text (`switchyard.shared.errors.GatewayError` redacts its message when it is made, so clients, reply
topics and stored errors see the same), and any span attribute (`redact_text`). Input guardrails with `mask`
have already replaced what they matched before the request left ingress; this policy is the net under
every sink for what guardrails do not cover (a `log` guardrail, an answer, an error message).
"""

from __future__ import annotations

import logging
import traceback
from types import TracebackType
from typing import Any

from pydantic import ValidationError

from switchyard.shared.detectors import DETECTORS, Detector, digit_runs
from switchyard.shared.guardrails import DEFAULT_REDACT
from switchyard.shared.spans import mask, non_overlapping


class Redactor:
    """Replaces what the chosen detectors find with their typed placeholders, in text or in JSON-like values."""

    def __init__(self, names: list[str] | tuple[str, ...]) -> None:
        self.detectors: list[Detector] = [DETECTORS[n] for n in names]

    def text(self, text: str) -> str:
        if not self.detectors or not text:
            return text
        runs = digit_runs(text)
        spans = [span for d in self.detectors for span in d.find(text, runs)]
        return mask(text, non_overlapping(spans)) if spans else text

    def value(self, value: Any) -> Any:
        """A copy of `value` (dicts, lists, strings) with every string redacted; other values as they are."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {k: self.value(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.value(v) for v in value]
        return value


_policy: Redactor | None = None
_DEFAULT = Redactor(DEFAULT_REDACT)
_loading = False


def policy() -> Redactor:
    """The process's policy: `logging.redact` of the gateway config (the default list when there is none).
    While the config is being read (an error made then asks for the policy too), the default applies."""
    global _policy, _loading
    if _policy is None:
        if _loading:
            return _DEFAULT
        names: list[str] = list(DEFAULT_REDACT)
        _loading = True
        try:
            from switchyard.shared.config import load_config

            names = list(load_config().logging.redact)
        except Exception:  # a config error is reported by the service itself; logs stay redacted by default
            pass
        finally:
            _loading = False
        _policy = Redactor(names)
    return _policy


def set_policy(redactor: Redactor) -> None:
    global _policy
    _policy = redactor


def redact_text(text: str) -> str:
    """For span attributes and error text: the policy applied to one string."""
    return policy().text(text)


_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class RedactingFilter(logging.Filter):
    """Redacts a log record's message, arguments and `extra` fields before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        redactor = policy()
        if not redactor.detectors:
            return True
        if record.args:
            record.msg = record.getMessage()
            record.args = None
        if isinstance(record.msg, str):
            record.msg = redactor.text(record.msg)
        for key, value in list(record.__dict__.items()):
            if key not in _STANDARD and not key.startswith("_") and isinstance(value, str | dict | list):
                record.__dict__[key] = redactor.value(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = redactor.text(exception_text(record.exc_info))
            record.exc_info = None
        return True


ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]


def exception_text(exc_info: ExcInfo) -> str:
    """A traceback as logging formats it, except that a pydantic ValidationError anywhere in it (cause and
    context included) reads as its problems by field, without the input values it would quote: those are
    request bodies (prompts) or secrets. No redaction policy catches a prompt, so it must never be written."""
    value = exc_info[1]
    if value is None:
        return logging.Formatter().formatException(exc_info)
    from switchyard.shared.answers import (
        problems,  # here: switchyard.shared.answers loads Kafka clients, which logging must not
    )

    rendered = traceback.TracebackException.from_exception(value)
    seen: set[int] = set()
    stack: list[tuple[traceback.TracebackException, BaseException]] = [(rendered, value)]
    while stack:
        te, exc = stack.pop()
        if id(exc) in seen:
            continue
        seen.add(id(exc))
        if isinstance(exc, ValidationError):
            te._str = f"{exc.error_count()} validation error(s) for {exc.title}: {problems(exc)}"  # type: ignore[attr-defined]
        for linked_te, linked in ((te.__cause__, exc.__cause__), (te.__context__, exc.__context__)):
            if linked_te is not None and linked is not None:
                stack.append((linked_te, linked))
    return "".join(rendered.format()).rstrip("\n")
