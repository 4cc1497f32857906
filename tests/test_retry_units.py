"""The retry loops' promises that need no stack: a Kafka client that cannot reach a broker gives up after
its timeout (a service exits and its supervisor restarts it, instead of hanging), saying each time that it
waits."""

from __future__ import annotations

import logging
import socket

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError

from switchyard.shared.kafka import start_client


def _closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_client_without_a_broker_gives_up_after_its_timeout(caplog: pytest.LogCaptureFixture) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=f"127.0.0.1:{_closed_port()}", request_timeout_ms=500)
    with caplog.at_level(logging.WARNING, logger="switchyard.kafka"), pytest.raises(KafkaConnectionError):
        await start_client(producer, "producer", timeout_s=1.2)
    waits = [r for r in caplog.records if r.getMessage() == "waiting for Kafka"]
    assert len(waits) >= 2, "it retried, saying so each time"
    assert all(getattr(r, "client", None) == "producer" for r in waits)
