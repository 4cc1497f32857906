"""Spans of sensitive data in a text, and masking them with typed placeholders (`[EMAIL]`, `[PATTERN]`).

A span is only `(start, end, label)`: nothing here keeps the matched text, so a decision can be recorded without
the data.
"""

from __future__ import annotations

Span = tuple[int, int, str]
"""(start, end, detector or pattern label) in the scanned text."""


_PLACEHOLDERS: dict[str, str] = {}


def placeholder(label: str) -> str:
    found = _PLACEHOLDERS.get(label)
    if found is None:
        found = f"[{label.upper()}]"
        if len(_PLACEHOLDERS) < 1000:
            _PLACEHOLDERS[label] = found
    return found


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
    append = parts.append
    last = 0
    for start, end, label in spans:
        append(text[last:start])
        append(_PLACEHOLDERS.get(label) or placeholder(label))
        last = end
    append(text[last:])
    return "".join(parts)
