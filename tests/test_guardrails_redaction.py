"""Error text goes through the redaction policy when an error is made (issue 17: "redaction applies before every
sink ... and any error text"); the gateway's own ids in it stay readable."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from switchyard.shared import redaction
from switchyard.shared.errors import MAX_MESSAGE_CHARS, GatewayError
from switchyard.shared.guardrails import DEFAULT_REDACT

CARD, EMAIL, KEY = "4111 1111 1111 1111", "ana.perez@example.com", "sk-proj-abcDEF1234567890abcdEFGH5678"


@pytest.fixture(autouse=True)
def default_policy() -> Iterator[None]:
    before = redaction._policy
    redaction.set_policy(redaction.Redactor(DEFAULT_REDACT))
    yield
    redaction._policy = before


def test_an_error_message_and_param_are_redacted_when_the_error_is_made() -> None:
    err = GatewayError(400, f"upstream: bad content near {EMAIL} / {CARD} for key {KEY}", param=f"metadata.{EMAIL}")
    body = err.body()["error"]
    assert body["message"] == "upstream: bad content near [EMAIL] / [CREDIT_CARD] for key [SECRET]"
    assert EMAIL not in body["param"] and str(err) == body["message"]


def test_an_error_rebuilt_from_its_wire_form_is_redacted_too() -> None:
    """A provider's OpenAI-style error body, or a reply's error data, read back at the next hop."""
    err = GatewayError.from_body(400, {"error": {"message": f"Invalid prompt: 'mail {EMAIL}'", "code": "bad"}})
    assert err.message == "Invalid prompt: 'mail [EMAIL]'" and err.code == "bad"


def test_ids_quoted_by_an_error_stay_as_they_are() -> None:
    """Hex ids with a word prefix and UUIDs are neither secrets nor (for the digits in them) cards or phones."""
    for _ in range(300):
        for known in (f"batch_{uuid.uuid4().hex}", f"file-{uuid.uuid4().hex}", f"chatcmpl-{uuid.uuid4().hex}",
                      str(uuid.uuid4()), f"req_{uuid.uuid4().hex[:24]}"):
            message = f"No such object: {known}."
            assert GatewayError(404, message).message == message


def test_a_huge_message_is_cut_before_it_is_redacted() -> None:
    err = GatewayError(502, f"echo: {EMAIL} " + "x" * (2 * MAX_MESSAGE_CHARS))
    assert len(err.message) <= MAX_MESSAGE_CHARS + 1 and err.message.startswith("echo: [EMAIL] ")


def test_an_empty_policy_leaves_error_text_alone() -> None:
    redaction.set_policy(redaction.Redactor([]))
    assert GatewayError(400, f"mail {EMAIL}").message == f"mail {EMAIL}"
