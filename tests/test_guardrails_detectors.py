"""The built-in detectors: what each must find (true positives) and what it must leave alone (false positives)."""

from __future__ import annotations

from typing import Any

import pytest

from switchyard.shared.config import ConfigError, parse_config
from switchyard.shared.detector_checks import iban_ok, luhn_ok
from switchyard.shared.detectors import DETECTORS
from switchyard.shared.guardrails import Guardrails, guard_answer, guard_request
from switchyard.shared.spans import mask, non_overlapping

TRUE_POSITIVES = {
    "email": ["write to ana.perez+work@example.co.uk today", "x@y.io"],
    "phone": ["call +1 415 555 0132", "(415) 555-0132", "+442079460958", "415-555-0132", "+49 30 1234 5678"],
    "credit_card": ["card 4111 1111 1111 1111 exp", "5500-0000-0000-0004", "378282246310005", "4012888888881881"],
    "iban": ["IBAN DE89 3704 0044 0532 0130 00 please", "GB82WEST12345698765432", "FR1420041010050500013M02606",
             "DE89 3704 0044 0532 0130 00 12 more"],  # followed by more digit groups: read to its country's length
    "ssn": ["ssn 123-45-6789", "078-05-1121"],
    "ip_address": ["from 192.168.1.20 at", "10.0.0.1", "2001:db8::8a2e:370:7334", "::1", "1:2:3:4:5:6:7:8",
                   "::ffff:10.0.0.1", "255.255.255.255"],
    "secret": ["key sk-proj-abcDEF1234567890abcdEFGH5678", "sk-ant-api03-AbCdEfGhIjKlMnOpQrStUvWx",
               "AKIAIOSFODNN7EXAMPLE", "ghp_" + "a1B2" * 9, "xoxb-1234567890-abcdefghij",
               "AIza" + "Sy" + "D1234567890abcdefghijklmnopqrstu", "hf_" + "AbCd1234" * 4,
               "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
               "token=Zx8Qp2Lm7Vn4Rt6Ws1Yk9Bd3Hg5Jf0Ca",
               "-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----"],
}

FALSE_POSITIVES = {
    "email": ["user at example dot com", "@handle", "a@b", "version 1.2@3"],
    "phone": ["in 2024 we sold 1500 units", "order 12345", "3.14159", "ISBN 978"],
    "credit_card": ["4111 1111 1111 1112", "1234567890123", "0000 0000 0000 0000", "order 2024-11-24",
                    "phone +1 415 555 0132"],
    "iban": ["DE89 3704 0044 0532 0130 01", "GB00WEST12345698765432", "XX12345678901234567"],
    "ssn": ["000-12-3456", "666-12-3456", "123-00-4567", "123-45-0000", "1234-56-7890", "2024-11-24"],
    "ip_address": ["version 1.2.3", "999.1.1.1", "at 12:30:45 today", "std::vector", "1.2.3.4.5", "256.1.1.1",
                   "01.2.3.4", "1:2:3:4:5:6:7"],
    "secret": ["the quick brown fox jumps over the lazy dog", "internationalization_localization_settings",
               "/usr/local/lib/python3.11/site-packages", "sk-short", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
               "1234567890123456789012345678", "CamelCaseIdentifierForSomethingLong",
               "GET /v1/logs/4f9c2a7e1b3d4c5a8e6f7a9b0c1d2e3f", "lib/python3.11/site-packages/starlette/middleware",
               # ids an error message or a log line quotes: a word prefix and hex, or a UUID
               "batch batch_0378ecf0ad894ecb9614bade71c5f233 not found", "chatcmpl-908e094f7eef4d3880ea9fa5d9c141c3",
               "file-0b9b3257244c46bab899cb28dfa2d126", "req_f5c8173ead094c789e82144b",
               "908e094f-7eef-4d38-80ea-9fa5d9c141c3"],
}


@pytest.mark.parametrize(("name", "text"), [(n, t) for n, ts in TRUE_POSITIVES.items() for t in ts])
def test_detector_finds(name: str, text: str) -> None:
    assert DETECTORS[name].find(text), f"{name} missed {text!r}"


@pytest.mark.parametrize(("name", "text"), [(n, t) for n, ts in FALSE_POSITIVES.items() for t in ts])
def test_detector_leaves_alone(name: str, text: str) -> None:
    assert not DETECTORS[name].find(text), f"{name} flagged {text!r}"


def test_checksums() -> None:
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("DE89370400440532013000") and not iban_ok("DE89370400440532013001")
    assert not iban_ok("DE8937040044053201300")  # one character short for Germany


def test_mask_replaces_each_match_with_a_typed_placeholder() -> None:
    text = "mail ana@example.com, card 4111 1111 1111 1111."
    spans = non_overlapping(DETECTORS["email"].find(text) + DETECTORS["credit_card"].find(text))
    assert mask(text, spans) == "mail [EMAIL], card [CREDIT_CARD]."


CONFIG = """
guardrails:
  - {name: pii, detectors: [email, credit_card], patterns: ["(?i)project falcon"]}
  - {name: no-ssn, action: block, detectors: [ssn], models: ["gpt-*"]}
  - {name: keyed, action: log, detectors: [ip_address], models: []}
  - {name: answer-is-json, stage: output, action: block, json_schema: {type: object, required: [answer]}}
"""


def test_input_mask_block_log_and_model_globs() -> None:
    rails = Guardrails(parse_config(CONFIG).guardrails)
    body: dict[str, Any] = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Project Falcon: ana@example.com"}]},
                         {"role": "user", "content": "from 10.0.0.1, ssn 123-45-6789"}]}
    # `no-ssn` covers gpt-* only; `keyed` only applies where a key names it.
    decisions = guard_request(rails.select("claude", ["keyed"]), body)
    assert body["messages"][0]["content"][0]["text"] == "[PATTERN]: [EMAIL]"
    assert body["messages"][1]["content"] == "from 10.0.0.1, ssn 123-45-6789"  # logged, not masked
    assert {(d.guardrail, d.action, d.detector) for d in decisions} == {
        ("pii", "mask", "pattern"), ("pii", "mask", "email"), ("keyed", "log", "ip_address")}
    assert all("10.0.0.1" not in str(d.as_dict()) for d in decisions)
    with pytest.raises(Exception) as refused:
        guard_request(rails.select("gpt-4o"), {"messages": [{"role": "user", "content": "ssn 123-45-6789"}]})
    assert refused.value.code == "guardrail_violation" and "no-ssn" in str(refused.value)  # type: ignore[attr-defined]
    assert "123-45-6789" not in str(refused.value)


def test_schema_guardrail_checks_the_answer() -> None:
    rails = Guardrails(parse_config(CONFIG).guardrails).select("any")
    ok = {"choices": [{"message": {"role": "assistant", "content": '{"answer": 42}'}}]}
    assert guard_answer(rails, ok) == []
    with pytest.raises(Exception) as refused:
        guard_answer(rails, {"choices": [{"message": {"role": "assistant", "content": "forty-two"}}]})
    assert "answer-is-json" in str(refused.value)


@pytest.mark.parametrize("bad", [
    "guardrails: [{name: x, patterns: ['(unclosed']}]",
    "guardrails: [{name: x, detectors: [passport]}]",
    "guardrails: [{name: x}]",
    "guardrails: [{name: x, stage: input, json_schema: {type: object}}]",
    "guardrails: [{name: x, stage: output, json_schema: {type: 12}}]",
    "guardrails: [{name: x, detectors: [email]}, {name: x, detectors: [ssn]}]",
    "logging: {retention_days: 0}",
])
def test_bad_guardrail_config_is_refused_at_load(bad: str) -> None:
    with pytest.raises(ConfigError):
        parse_config(bad)


def test_a_secret_or_key_block_is_found_wherever_it_sits_in_a_long_prompt() -> None:
    """Secrets are looked for only in long words and near a key block's marker: one deep in a prompt, quoted,
    after a newline or at the very end is found all the same."""
    pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----"
    filler = "the quick brown fox jumps over the lazy dog. " * 90
    for secret in ("AKIAIOSFODNN7EXAMPLE", "xoxb-1234567890-abcdefghij", "Zx8Qp2Lm7Vn4Rt6Ws1Yk9Bd3Hg5Jf0Ca", pem):
        for text in (f"{filler}{secret}", f'{filler}"{secret}",', f"{filler}\n{secret}\n{filler}"):
            spans = DETECTORS["secret"].find(text)
            assert [text[s:e] for s, e, _ in spans] == [secret], (secret, text[-80:])
