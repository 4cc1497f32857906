"""The validators of the built-in detectors: checksums and shape tests a regular expression alone cannot do.

Each takes a candidate the detector's expression found and says whether it is what it looks like: card numbers
pass Luhn, IBANs their country's length and ISO 13616 mod-97 checksum, IPv6 candidates parse, a secret looks
random, and digits inside a longer id (a request id, a UUID) are no card or phone. Each refuses by the cheapest
test first (bench/guardrails.py).
"""

from __future__ import annotations

import ipaddress
import math
import re

_DOUBLED = bytes.maketrans(b"0123456789", b"0246813579")
"""Maps each ASCII digit to the digit of its Luhn double (2d, less 9 when over 9)."""


def luhn_ok(digits: str) -> bool:
    """The Luhn checksum of a digit string (card numbers): the sum of the doubled-every-other digits ≡ 0 mod 10."""
    raw = digits.encode()
    return (sum(raw[-1::-2]) + sum(raw[-2::-2].translate(_DOUBLED)) - 48 * len(raw)) % 10 == 0


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


_ID_PARTS = re.compile(r"[-_]+")


def _identifier(candidate: str) -> bool:
    """Hex, or words and hex joined by `-`/`_`: the gateway's and providers' own ids (`chatcmpl-<hex>`,
    `batch_<hex>`, `file-<hex>`, UUIDs), hashes and commit ids, which error messages and log lines quote."""
    return all(part.isalpha() or all(c in _HEX for c in part) for part in _ID_PARTS.split(candidate))


ID_MIN_HEX = 24
"""The fewest hex digits of an id (the gateway's request and batch ids have 32, OpenAI's `req_` ids 24)."""
_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_DIGITS_OR_HYPHEN = frozenset("0123456789-")


def inside_identifier(text: str, start: int, end: int) -> bool:
    """Whether a match of digits (and `-`) is part of a longer id: the unbroken token around it is words and
    hex joined by `-`/`_`, with at least ID_MIN_HEX hex digits, one part mixing hex letters and digits
    (`batch_e9c6bbc8576147518485aff3b4703f27`, the `2413-4393-9084` of a UUID). Such digits are no card or
    phone; `card_4111111111111111` (no mixed part) and `4111111111111111ab` (too short for an id) still are."""
    if (start == 0 or text[start - 1] not in _ID_CHARS) and (end == len(text) or text[end] not in _ID_CHARS):
        return False  # set off from its neighbours, as PII in prose is
    if not _DIGITS_OR_HYPHEN.issuperset(text[start:end]):
        return False
    lo, hi = start, end
    while lo > 0 and text[lo - 1] in _ID_CHARS:
        lo -= 1
    while hi < len(text) and text[hi] in _ID_CHARS:
        hi += 1
    if lo == start and hi == end:
        return False
    token = text[lo:hi]
    if not _identifier(token):
        return False
    hex_parts = [part for part in _ID_PARTS.split(token) if part and all(c in _HEX for c in part)]
    return sum(map(len, hex_parts)) >= ID_MIN_HEX and any(
        not part.isdigit() and not part.isalpha() for part in hex_parts)


def high_entropy(candidate: str) -> bool:
    if _identifier(candidate):  # at most 4 bits/char in its random part, and no secret's shape
        return False
    has_digit = any(c.isdigit() for c in candidate)
    has_alpha = any(c.isalpha() for c in candidate)
    return has_digit and has_alpha and shannon_entropy(candidate) >= ENTROPY_MIN_BITS


def ip_ok(candidate: str) -> bool:
    """Whether an IPv6 candidate (hex digits, `:` and `.` only) is an address: `::` alone is not taken."""
    colons = candidate.count(":")  # eight groups, or fewer with `::`, or six and an IPv4 tail: else no parse
    if "::" not in candidate and colons != 7 and not (colons == 6 and "." in candidate):
        return False
    if not candidate.strip(":."):
        return False
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return False
    return True


_SEPARATORS = str.maketrans("", "", " -")
"""Deletes what a card number candidate allows between its digits (it holds nothing else)."""


def card_ok(candidate: str) -> bool:
    digits = candidate.translate(_SEPARATORS)
    return 13 <= len(digits) <= 19 and digits.count(digits[0]) != len(digits) and luhn_ok(digits)
