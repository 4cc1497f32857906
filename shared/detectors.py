"""Built-in PII and secret detectors: compiled once at import, each a regular expression plus a validator.

A detector finds spans `(start, end, name)` in a text. Candidates come from a regular expression; a validator
then drops the false positives a regex alone cannot tell apart: card numbers must pass Luhn, IBANs their
ISO 13616 mod-97 checksum, IP addresses must parse, high-entropy strings must look random. Nothing here
keeps or returns the matched text beyond the offsets, so callers can record a decision without the data.

Cost: all detectors over a 4 kB prompt take well under 0.5 ms of CPU (bench/guardrails.py).
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable
from dataclasses import dataclass

Span = tuple[int, int, str]
"""(start, end, detector or pattern label) in the scanned text."""


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum of a digit string (card numbers): the sum of the doubled-every-other digits ≡ 0 mod 10."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BR": 29, "BY": 28,
    "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18,
    "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22,
    "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20,
    "LU": 20, "LV": 21, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15,
    "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24, "SC": 31, "SE": 24, "SI": 19,
    "SK": 24, "SM": 27, "ST": 25, "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}


def iban_ok(text: str) -> bool:
    """An IBAN's country length and ISO 13616 checksum: the rearranged number, letters as 10..35, mod 97 == 1."""
    iban = text.replace(" ", "").upper()
    if IBAN_LENGTHS.get(iban[:2]) != len(iban):
        return False
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(ch, 36)) for ch in rearranged)) % 97 == 1


def shannon_entropy(text: str) -> float:
    """Bits per character of `text`'s own character distribution."""
    counts: dict[str, int] = {}
    for ch in text:
        counts[ch] = counts.get(ch, 0) + 1
    n = len(text)
    return -sum(c / n * math.log2(c / n) for c in counts.values())


_HEX = frozenset("0123456789abcdefABCDEF")
ENTROPY_MIN_LENGTH = 24
ENTROPY_MIN_BITS = 4.0
"""A run of at least 24 token characters with ≥ 4 bits/char, mixing letters and digits, reads as a secret.
English words, UUID-free identifiers, paths and base-10 numbers stay below; random base64/hex-ish keys don't."""


def _high_entropy(candidate: str) -> bool:
    if all(c in _HEX for c in candidate):  # request ids, hashes and commit ids: hex, at most 4 bits/char
        return False
    has_digit = any(c.isdigit() for c in candidate)
    has_alpha = any(c.isalpha() for c in candidate)
    return has_digit and has_alpha and shannon_entropy(candidate) >= ENTROPY_MIN_BITS


def _ip_ok(candidate: str) -> bool:
    if not any(c.isalnum() for c in candidate):
        return False
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return True


def _phone_ok(candidate: str) -> bool:
    digits = sum(c.isdigit() for c in candidate)
    return 7 <= digits <= 15


def _card_ok(candidate: str) -> bool:
    digits = "".join(c for c in candidate if c.isdigit())
    return 13 <= len(digits) <= 19 and len(set(digits)) > 1 and luhn_ok(digits)


@dataclass(frozen=True)
class Detector:
    """One kind of sensitive data: a compiled candidate expression and an optional validator of a candidate.

    `within` names where candidates are looked for: `digits` detectors run only inside the runs of digits and
    separators that `digit_runs` finds once per text (most of a prompt is words, and an expression starting
    with a digit class would be tried at every position of them).
    """

    name: str
    pattern: re.Pattern[str]
    valid: Callable[[str], bool] | None = None
    within: str = "text"

    @property
    def placeholder(self) -> str:
        return placeholder(self.name)

    def find(self, text: str, runs: list[tuple[int, int]] | None = None) -> list[Span]:
        if self.within == "digits":
            runs = digit_runs(text) if runs is None else runs
            matches = [m for start, end in runs for m in self.pattern.finditer(text, start, end)]
        else:
            matches = list(self.pattern.finditer(text))
        return [(m.start(), m.end(), self.name) for m in matches if self.valid is None or self.valid(m.group())]


_DIGIT_RUN = re.compile(r"[0-9+(][0-9 ().+\-]{5,}")


def digit_runs(text: str) -> list[tuple[int, int]]:
    """Stretches of at least 6 digits/separators (where phones, cards, SSNs and IPv4 addresses can be)."""
    return [m.span() for m in _DIGIT_RUN.finditer(text)]


_SECRET_PREFIXES = "|".join((
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
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----",
))

_SECRET_KNOWN = re.compile(rf"(?<![A-Za-z0-9_\-])(?:{_SECRET_PREFIXES})")
_SECRET_ENTROPY = re.compile(rf"(?<![A-Za-z0-9+_\-])[A-Za-z0-9+_\-]{{{ENTROPY_MIN_LENGTH},}}=*")
"""Candidate tokens for the entropy test: `/` splits them, so paths and URLs are judged segment by segment."""


class SecretDetector(Detector):
    """Provider keys and tokens by their known shapes, then any other high-entropy token."""

    def find(self, text: str, runs: list[tuple[int, int]] | None = None) -> list[Span]:
        spans = [(m.start(), m.end(), self.name) for m in _SECRET_KNOWN.finditer(text)]
        for m in _SECRET_ENTROPY.finditer(text):
            if not any(s <= m.start() < e for s, e, _ in spans) and _high_entropy(m.group()):
                spans.append((m.start(), m.end(), self.name))
        return spans


_EMAIL_DOMAIN = re.compile(r"@[A-Za-z0-9\-]{1,63}(?:\.[A-Za-z0-9\-]{1,63})*\.[A-Za-z]{2,24}\b")
_EMAIL_LOCAL = re.compile(r"(?<![\w.+\-])[A-Za-z0-9._%+\-]{1,64}\Z")


class EmailDetector(Detector):
    """Anchored on `@` (rare in prose), then the local part is read backwards from it."""

    def find(self, text: str, runs: list[tuple[int, int]] | None = None) -> list[Span]:
        spans: list[Span] = []
        for m in _EMAIL_DOMAIN.finditer(text):
            local = _EMAIL_LOCAL.search(text, max(0, m.start() - 64), m.start())
            if local is not None:
                spans.append((local.start(), m.end(), self.name))
        return spans


_IPV6_CORE = re.compile(r":[0-9A-Fa-f]{0,4}:")
_IPV6_LEFT = re.compile(r"(?<![\w:])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4})*\Z")
_IPV6_RIGHT = re.compile(r"[0-9A-Fa-f:]*(?:[0-9]{1,3}(?:\.[0-9]{1,3}){3})?(?![\w:.])")
_IPV4 = re.compile(r"(?<![0-9.])(?:[0-9]{1,3}\.){3}[0-9]{1,3}(?![0-9.])")


class IpDetector(Detector):
    """IPv4 inside the digit runs; IPv6 anchored on `:x:`, widened both ways, and parsed to confirm."""

    def find(self, text: str, runs: list[tuple[int, int]] | None = None) -> list[Span]:
        runs = digit_runs(text) if runs is None else runs
        spans = [(m.start(), m.end(), self.name) for start, end in runs for m in _IPV4.finditer(text, start, end)
                 if _ip_ok(m.group())]
        pos = 0
        while (m := _IPV6_CORE.search(text, pos)) is not None:
            left = _IPV6_LEFT.search(text, max(0, m.start() - 40), m.start())
            right = _IPV6_RIGHT.match(text, m.end())
            start = left.start() if left is not None else m.start()
            end = right.end() if right is not None else m.end()
            if left is not None and right is not None and _ip_ok(text[start:end]):
                spans.append((start, end, self.name))
            pos = max(end, m.start() + 1)
        return spans


DETECTORS: dict[str, Detector] = {
    "email": EmailDetector("email", _EMAIL_DOMAIN),
    "phone": Detector("phone", re.compile(
        r"(?<![\w+])(?:\+[0-9]{1,3}[ .\-]?)?(?:\([0-9]{2,4}\)[ .\-]?|[0-9]{2,4}[ .\-])[0-9]{2,4}[ .\-][0-9]{3,4}"
        r"(?![\w])|(?<![\w+])\+[0-9]{8,15}(?!\w)"), _phone_ok, within="digits"),
    "credit_card": Detector("credit_card", re.compile(r"(?<![0-9\-])[0-9](?:[ \-]?[0-9]){12,18}(?![0-9\-])"),
                            _card_ok, within="digits"),
    "iban": Detector("iban", re.compile(r"\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,30}\b"), iban_ok),
    "ssn": Detector("ssn", re.compile(
        r"(?<![0-9\-])(?!000|666|9[0-9][0-9])[0-9]{3}-(?!00)[0-9]{2}-(?!0000)[0-9]{4}(?![0-9\-])"), within="digits"),
    "ip_address": IpDetector("ip_address", _IPV4),
    "secret": SecretDetector("secret", _SECRET_KNOWN),
}
DETECTOR_NAMES = tuple(DETECTORS)
PATTERN_LABEL = "pattern"
"""The type of a match of a configured `patterns` entry; its placeholder is `[PATTERN]`."""


def placeholder(label: str) -> str:
    return f"[{label.upper()}]"


def non_overlapping(spans: list[Span]) -> list[Span]:
    """Spans sorted by start; of overlapping ones, the earliest (then the longest) is kept."""
    out: list[Span] = []
    for span in sorted(spans, key=lambda s: (s[0], -s[1])):
        if out and span[0] < out[-1][1]:
            if span[1] > out[-1][1] and span[0] == out[-1][0]:
                out[-1] = span
            continue
        out.append(span)
    return out


def mask(text: str, spans: list[Span]) -> str:
    """`text` with each (non-overlapping, sorted) span replaced by its typed placeholder."""
    parts: list[str] = []
    last = 0
    for start, end, label in spans:
        parts.append(text[last:start])
        parts.append(placeholder(label))
        last = end
    parts.append(text[last:])
    return "".join(parts)
