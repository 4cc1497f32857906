"""LZ4 in LZ4's fast mode for every producer: aiokafka compresses at level 9 (LZ4's slow, high-compression mode)
and has no setting to change it (aio-libs/aiokafka#1028).

Measured on this project's messages (bench/README.md, "what bounds the closed loop, LZ4's level, cookies"): a
630-byte batch of stream chunks took 10.2 µs at level 9 and 2.5 µs at level 1, to the same 201 bytes; a 130 KB
request body took 2.7 ms and 0.52 ms, to 75 and 84 KB. A worker compresses a batch for every partition of every
produce request, so level 9 was 3-4 % of its CPU, and a large prompt paid milliseconds of latency at ingress
before it reached Kafka.

The frames are the ones Kafka expects at any level (independent blocks, no content checksum); brokers and
consumers read them as before. Only how hard the compressor searches for matches changes.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from aiokafka import codec

LZ4_LEVEL = 1
"""LZ4 frame compression level: below 3 is LZ4's fast mode, 3 and up its high-compression mode."""

_BUILDERS = ("aiokafka.record._crecords.default_records", "aiokafka.record.default_records")
"""aiokafka's record-batch builders (the C extension, and the pure-Python one it falls back to without it); each
looks `lz4_encode` up among its module's names at every call."""


def lz4_fast(payload: bytes | bytearray | memoryview) -> bytes:
    """One record batch's payload as a Kafka LZ4 frame, at LZ4_LEVEL."""
    frame: bytes = codec.lz4_encode(payload, LZ4_LEVEL)
    return frame


def use_fast_lz4() -> None:
    """Make aiokafka's record-batch builders compress with `lz4_fast` (idempotent; every producer factory calls it)."""
    for name in _BUILDERS:
        try:
            module: ModuleType = importlib.import_module(name)
        except ImportError:  # the C extension is optional (AIOKAFKA_NO_EXTENSIONS, or a platform without a wheel)
            continue
        module.lz4_encode = lz4_fast  # type: ignore[attr-defined]
