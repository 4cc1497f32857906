"""Built-in PII and secret detectors: compiled once at import, each a regular expression plus a validator.

A detector finds spans `(start, end, name)` in a text. Candidates come from a regular expression; a validator
then drops the false positives a regex alone cannot tell apart (shared/detector_checks.py: card numbers must pass
Luhn, IBANs their ISO 13616 mod-97 checksum, IP addresses must parse, high-entropy strings must look random).
Nothing here keeps or returns the matched text beyond the offsets, so callers can record a decision without the data.

Cost (bench/guardrails.py, results in bench/results/guardrails-2026-12-01.md): every detector and one pattern
over a 4 kB prompt take about 0.2 ms of CPU, and 0.4 ms when it holds PII every 250 characters. What keeps it
there: each expression starts with a literal or a character class (the regex engine scans for those in C) or
runs only where its candidates can be (the digit runs, the long words, the text around an `@`), and no
validator parses what a cheaper test can refuse first.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from switchyard.shared.detector_checks import (
    ENTROPY_MIN_LENGTH,
    IBAN_LENGTHS,
    card_ok,
    high_entropy,
    iban_ok,
    inside_identifier,
    ip_ok,
)
from switchyard.shared.spans import Span, placeholder


@dataclass(frozen=True)
class Detector:
    """One kind of sensitive data: a compiled candidate expression and an optional validator of a candidate.

    `within` names where candidates are looked for: `digits` detectors run only inside the runs of digits and
    separators that `digit_runs` finds once per text (most of a prompt is words, and an expression starting
    with a digit class would be tried at every position of them), and only in runs at least `min_length`
    long (the shortest text their expression can match: shorter runs cannot hold one).
    """

    name: str
    pattern: re.Pattern[str]
    valid: Callable[[str], bool] | None = None
    within: str = "text"
    min_length: int = 0
    needs: str = ""
    """For `digits` detectors: a separator every match holds (`-` of an SSN), so runs without it are skipped."""

    @property
    def placeholder(self) -> str:
        return placeholder(self.name)

    def find(self, text: str, runs: list[tuple[int, int]] | None = None) -> list[Span]:
        valid, name = self.valid, self.name
        if self.within != "digits":
            return [(m.start(), m.end(), name) for m in self.pattern.finditer(text)
                    if valid is None or valid(m.group())]
        runs = digit_runs(text) if runs is None else runs
        least, needs, finditer = self.min_length, self.needs, self.pattern.finditer
        return [(m.start(), m.end(), name) for start, end in runs
                if end - start >= least and (not needs or text.find(needs, start, end) >= 0)
                for m in finditer(text, start, end)
                if (valid is None or valid(m.group())) and not inside_identifier(text, m.start(), m.end())]


_DIGIT_RUN = re.compile(r"[0-9+(][0-9 ().+\-]{5,}")


def digit_runs(text: str) -> list[tuple[int, int]]:
    """Stretches of at least 6 digits/separators (where phones, cards, SSNs and IPv4 addresses can be)."""
    return [m.span() for m in _DIGIT_RUN.finditer(text)]


_SECRET_PREFIXES = "|".join((  # every shape but the PEM block (_PEM) is one word
    r"sk-ant-[A-Za-z0-9_\-]{20,}",                 # Anthropic
    r"sk-(?:proj-|svcacct-|sy-)?[A-Za-z0-9_\-]{20,}",  # OpenAI (and Switchyard's own virtual keys)
    r"(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9]{16,}",  # Stripe
    r"(?:AKIA|ASIA)[0-9A-Z]{16}",                  # AWS access key id
    r"AIza[0-9A-Za-z_\-]{35}",                     # Google API key
    r"gh[pousr]_[A-Za-z0-9]{36,}",                 # GitHub tokens
    r"github_pat_[A-Za-z0-9_]{40,}",               # GitHub fine-grained tokens
    r"glpat-[A-Za-z0-9_\-]{20,}",                  # GitLab
    r"xox[abprs]-[A-Za-z0-9\-]{10,}",              # Slack
    r"hf_[A-Za-z0-9]{30,}",                        # Hugging Face
    r"gsk_[A-Za-z0-9]{40,}",                       # Groq
    r"eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}",  # JWT
))

_SECRET_KNOWN = re.compile(rf"(?<![A-Za-z0-9_\-])(?:{_SECRET_PREFIXES})")
_SECRET_ENTROPY = re.compile(rf"(?<![A-Za-z0-9+_\-])[A-Za-z0-9+_\-]{{{ENTROPY_MIN_LENGTH},}}=*")
"""Candidate tokens for the entropy test: `/` splits them, so paths and URLs are judged segment by segment."""
_PEM_MARK = "PRIVATE KEY-----"
_PEM = re.compile(r"(?<![A-Za-z0-9_\-])-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----")
SECRET_MIN_LENGTH = 15
"""The shortest known key shape (a Slack token, `xoxb-` and 10 more): no shorter word can hold a secret."""


def long_words(text: str, least: int) -> list[tuple[int, int]]:
    """(start, end) of each whitespace-delimited word of at least `least` characters, in order.

    The words are split in C (`str.split`); only the few long ones are then located, each after the last one
    found (no shorter word can contain it, and a longer one before it was passed already)."""
    words = text.split()
    found: list[tuple[int, int]] = []
    at = 0
    for word in [word for word in words if len(word) >= least]:
        at = text.find(word, at)
        found.append((at, at + len(word)))
        at += len(word)
    return found


class SecretDetector(Detector):
    """Provider keys and tokens by their known shapes, then any other high-entropy token.

    Every shape but a PEM private key is one unbroken word, so both expressions run only inside the words
    of at least SECRET_MIN_LENGTH characters (a prompt has few), not at every position of the text; a PEM
    block is looked for only where its marker is in the text. The spans are those of both expressions over
    the whole text: none of them matches across whitespace, and their look-behinds see the text before a
    word."""

    def find(self, text: str, runs: list[tuple[int, int]] | None = None) -> list[Span]:
        spans = [(m.start(), m.end(), self.name) for m in _PEM.finditer(text)] if _PEM_MARK in text else []
        pem = list(spans)  # what starts inside a private key block is part of that secret
        for start, end in long_words(text, SECRET_MIN_LENGTH):
            known = [(m.start(), m.end(), self.name) for m in _SECRET_KNOWN.finditer(text, start, end)
                     if not any(s <= m.start() < e for s, e, _ in pem)]
            spans.extend(known)
            if end - start < ENTROPY_MIN_LENGTH:
                continue
            for m in _SECRET_ENTROPY.finditer(text, start, end):
                if not any(s <= m.start() < e for s, e, _ in pem) and \
                        not any(s <= m.start() < e for s, e, _ in known) and high_entropy(m.group()):
                    spans.append((m.start(), m.end(), self.name))
        return spans


_IBAN_ANCHOR = re.compile(r"[A-Z][A-Z][0-9][0-9]")
_IBAN_SHAPES = {length: re.compile(rf"\b[A-Z]{{2}}[0-9]{{2}}(?: ?[A-Z0-9]){{{length - 4}}}\b")
                for length in set(IBAN_LENGTHS.values())}
"""Per IBAN length: the country code, check digits and exactly the rest, in groups of any size."""


class IbanDetector(Detector):
    """Candidates start at a country code and check digits (`DE89`), found by an expression starting with
    a character class (the regex engine scans for it in C); there the country's IBAN length is read, so an
    IBAN followed by more letters or digits is still found, and the checksum decides."""

    def find(self, text: str, runs: list[tuple[int, int]] | None = None) -> list[Span]:
        spans: list[Span] = []
        pos = 0
        while (anchor := _IBAN_ANCHOR.search(text, pos)) is not None:
            length = IBAN_LENGTHS.get(text[anchor.start():anchor.start() + 2])
            m = _IBAN_SHAPES[length].match(text, anchor.start()) if length is not None else None
            if m is not None and iban_ok(m.group()):
                spans.append((m.start(), m.end(), self.name))
                pos = m.end()
            else:
                pos = anchor.start() + 1
        return spans


_EMAIL_DOMAIN = re.compile(r"@[A-Za-z0-9\-]{1,63}(?:\.[A-Za-z0-9\-]{1,63})*\.[A-Za-z]{2,24}\b")
_EMAIL_LOCAL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._%+-")


def _word(ch: str) -> bool:
    """`\\w` of a str regular expression."""
    return ch.isalnum() or ch == "_"


def _local_part(text: str, at: int) -> int | None:
    """Where the local part of an address whose `@` is at `at` starts: the longest run of up to 64 local-part
    characters before it that no word character, `.`, `+` or `-` precedes; None when there is none."""
    lo, start = max(0, at - 64), at
    while start > lo and text[start - 1] in _EMAIL_LOCAL:
        start -= 1
    while start < at:
        before = text[start - 1] if start else ""
        if not before or not (_word(before) or before in ".+-"):
            return start
        percent = text.find("%", start, at)  # only a `%` inside the run may precede a local part
        if percent < 0:
            return None
        start = percent + 1
    return None


class EmailDetector(Detector):
    """Anchored on `@` (rare in prose), then the local part is read backwards from it."""

    def find(self, text: str, runs: list[tuple[int, int]] | None = None) -> list[Span]:
        spans: list[Span] = []
        for m in _EMAIL_DOMAIN.finditer(text):
            local = _local_part(text, m.start())
            if local is not None:
                spans.append((local, m.end(), self.name))
        return spans


_IPV6_CORE = re.compile(r"::|:[0-9A-Fa-f]{1,4}:[0-9A-Fa-f]{1,4}:")
"""Every IPv6 address has `::`, or all its groups and so `:x:y:`; a time of day (`12:30:45`) has neither, so
it costs the one scan of the text and no parse."""
_HEX_OR_COLON = frozenset("0123456789abcdefABCDEF:")
_IPV6_RIGHT = re.compile(r"[0-9A-Fa-f:]*(?:[0-9]{1,3}(?:\.[0-9]{1,3}){3})?(?![\w:.])")
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = re.compile(rf"(?<![0-9.])(?:{_OCTET}\.){{3}}{_OCTET}(?![0-9.])")
"""Parts of at most 255 without a leading zero, as `ipaddress` reads an IPv4 address: no parse needed."""


def _ipv6_left(text: str, at: int) -> int | None:
    """Where an IPv6 address whose anchor (`_IPV6_CORE`) is at `at` starts: the groups of at most 4 hex digits before
    it (within 40 characters), preceded by no word character or `:`; None when they are not such."""
    lo, start = max(0, at - 40), at
    while start > lo and text[start - 1] in _HEX_OR_COLON:
        start -= 1
    if start and (_word(text[start - 1]) or text[start - 1] == ":"):
        return None
    if any(len(group) > 4 for group in text[start:at].split(":")):
        return None
    return start


class IpDetector(Detector):
    """IPv4 inside the digit runs; IPv6 anchored on `::` or `:x:y:`, widened both ways, and parsed to confirm."""

    def find(self, text: str, runs: list[tuple[int, int]] | None = None) -> list[Span]:
        runs = digit_runs(text) if runs is None else runs
        spans = [(m.start(), m.end(), self.name) for start, end in runs
                 if end - start >= 7 and text.count(".", start, end) >= 3
                 for m in _IPV4.finditer(text, start, end)]
        pos = 0
        while (m := _IPV6_CORE.search(text, pos)) is not None:
            left = _ipv6_left(text, m.start())
            right = _IPV6_RIGHT.match(text, m.end())
            start = left if left is not None else m.start()
            end = right.end() if right is not None else m.end()
            if left is not None and right is not None and ip_ok(text[start:end]):
                spans.append((start, end, self.name))
            pos = max(end, m.start() + 1)
        return spans


DETECTORS: dict[str, Detector] = {
    "email": EmailDetector("email", _EMAIL_DOMAIN),
    "phone": Detector("phone", re.compile(
        r"(?<![\w+])(?:\+[0-9]{1,3}[ .\-]?)?(?:\([0-9]{2,4}\)[ .\-]?|[0-9]{2,4}[ .\-])[0-9]{2,4}[ .\-][0-9]{3,4}"
        r"(?![\w])|(?<![\w+])\+[0-9]{8,15}(?!\w)"), within="digits", min_length=9),  # 7 to 15 digits, by its shape
    "credit_card": Detector("credit_card", re.compile(r"(?<![0-9\-])[0-9](?:[ \-]?[0-9]){12,18}(?![0-9\-])"),
                            card_ok, within="digits", min_length=13),
    "iban": IbanDetector("iban", _IBAN_ANCHOR, iban_ok),
    "ssn": Detector("ssn", re.compile(
        r"(?<![0-9\-])(?!000|666|9[0-9][0-9])[0-9]{3}-(?!00)[0-9]{2}-(?!0000)[0-9]{4}(?![0-9\-])"), within="digits",
                min_length=11, needs="-"),
    "ip_address": IpDetector("ip_address", _IPV4),
    "secret": SecretDetector("secret", _SECRET_KNOWN, min_length=SECRET_MIN_LENGTH),
}
DETECTOR_NAMES = tuple(DETECTORS)
PATTERN_LABEL = "pattern"
"""The type of a match of a configured `patterns` entry; its placeholder is `[PATTERN]`."""
