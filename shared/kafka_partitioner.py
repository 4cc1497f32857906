"""Which partition a keyed message goes to: Kafka's own rule (the Java client's murmur2), computed faster.

A message with a key goes to partition `toPositive(murmur2(key)) % partitions`, as every Kafka client puts it, so
that Switchyard's services, aiokafka's default and any other producer agree on where a request's messages go.
aiokafka's pure-Python murmur2 spends about 9.4 µs on a 41-byte request id; this one reads the key four bytes at a
time with `struct` and spends 4.6 µs, for the same result (tests/test_kafka_partitioner.py checks it against
aiokafka's on any key). Recent keys' hashes are kept: a worker sends a request's write-ahead usage and its
outcome under the same key, and its events under its deployment's id. A message without a key goes to a random
partition that has a leader, as aiokafka's default does.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Sequence

_M = 0x5BD1E995
_MASK = 0xFFFF_FFFF
_WORDS = struct.Struct("<I").iter_unpack


def murmur2(data: bytes) -> int:
    """MurmurHash2 with Kafka's seed, as an unsigned 32-bit int (org.apache.kafka.common.utils.Utils.murmur2)."""
    length = len(data)
    whole = length & ~3
    h = 0x9747B28C ^ length
    for (k,) in _WORDS(data[:whole]):
        k = (k * _M) & _MASK
        k ^= k >> 24
        h = ((h * _M) & _MASK) ^ ((k * _M) & _MASK)
    extra = length & 3
    if extra:
        if extra == 3:
            h ^= data[whole + 2] << 16
        if extra >= 2:
            h ^= data[whole + 1] << 8
        h = ((h ^ data[whole]) * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    return h ^ (h >> 15)


_recent: dict[bytes, int] = {}
_RECENT_KEPT = 4096


def partition(key: bytes | None, all_partitions: Sequence[int], available: Sequence[int]) -> int:
    """aiokafka's `partitioner` callable: the key's partition among all of the topic's, sorted by id; without a
    key, a random available one (any one while none has a leader)."""
    if key is None:
        return random.choice(available or all_partitions)
    hashed = _recent.get(key)
    if hashed is None:
        hashed = murmur2(key)
        if len(_recent) >= _RECENT_KEPT:
            _recent.clear()
        _recent[key] = hashed
    return all_partitions[(hashed & 0x7FFF_FFFF) % len(all_partitions)]
