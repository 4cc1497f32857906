"""A keyed message goes to the partition every Kafka client chooses for its key (the Java client's murmur2).

Switchyard's producers use a faster murmur2 than aiokafka's; a request's messages must still land where
aiokafka's default, the Java client, and any other producer of the same key puts them.
"""

from __future__ import annotations

from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2
from hypothesis import given, settings
from hypothesis import strategies as st

from switchyard.shared.kafka_partitioner import murmur2, partition


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=80))
def test_murmur2_is_aiokafkas_on_any_key(key: bytes) -> None:
    assert murmur2(key) == aiokafka_murmur2(key)


def test_murmur2_matches_the_java_clients_published_values() -> None:
    # org.apache.kafka.common.utils.UtilsTest.testMurmur2, as signed ints
    cases = {b"21": -973932308, b"foobar": -790332482, b"a-little-bit-long-string": -985981536,
             b"a-little-bit-longer-string": -1486304829,
             b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971, b"abc": 479470107}
    for key, expected in cases.items():
        assert murmur2(key) == expected & 0xFFFF_FFFF


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=60), st.integers(1, 64))
def test_a_keyed_message_goes_to_the_partition_aiokafkas_default_chooses(key: bytes, count: int) -> None:
    partitions = list(range(count))
    assert partition(key, partitions, partitions[:1]) == DefaultPartitioner()(key, partitions, partitions[:1])


def test_a_message_without_a_key_goes_to_a_partition_with_a_leader() -> None:
    assert {partition(None, [0, 1, 2, 3], [2]) for _ in range(50)} == {2}
    assert {partition(None, [0, 1], []) for _ in range(200)} == {0, 1}  # none has a leader: any of them
