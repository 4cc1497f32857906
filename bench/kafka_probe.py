"""One Kafka hop, measured: produce acknowledgement and produce-to-consume latency per fetch wait.

    .venv/bin/python bench/kafka_probe.py                      # its own embedded Apache Kafka: waits 5, 100, 500 ms
    .venv/bin/python bench/kafka_probe.py --broker tansu       # the same on the Tansu fallback
    .venv/bin/python bench/kafka_probe.py --bootstrap HOST:PORT --waits 5,500   # against another broker

Why: every Switchyard request crosses three hops (ingress -> router -> worker -> ingress), so a
hop's latency is the floor of the added latency, and the consumers' fetch wait decides both that
latency and the idle CPU (a consumer whose fetches come back empty polls 1000/wait times a
second). On Apache Kafka a waiting fetch is answered as soon as data arrives, so a long wait costs
no latency; this probe shows whether a broker does that (on Tansu the latency grows with the wait).
Uses the services' own producer and consumer settings (shared/kafka.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiokafka import TopicPartition  # noqa: E402

from switchyard.devstack.apache_kafka import EmbeddedKafka  # noqa: E402
from switchyard.devstack.broker import EmbeddedBroker, EmbeddedTansu  # noqa: E402
from switchyard.shared.kafka import ensure_topics, make_consumer, make_producer  # noqa: E402
from switchyard.shared.tansu import BROKER_ENV  # noqa: E402


async def probe(bootstrap: str, wait_ms: int, n: int, linger_ms: int = 0) -> dict[str, float]:
    topic = "bench.probe"
    await ensure_topics(bootstrap, {topic: 1})
    producer = make_producer(bootstrap, linger_ms=linger_ms)
    consumer = make_consumer(bootstrap=bootstrap, group_id=None, fetch_max_wait_ms=wait_ms)
    await producer.start()
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_end(tp)
        await consumer.position(tp)
        acks, hops = [], []
        for _ in range(n):
            t = time.perf_counter()
            await (await producer.send(topic, b"x" * 600))
            acks.append((time.perf_counter() - t) * 1000)
            while not await consumer.getmany(timeout_ms=2000):
                pass
            hops.append((time.perf_counter() - t) * 1000)
            await asyncio.sleep(0.01)
        acks.sort()
        hops.sort()
        return {"fetch_max_wait_ms": wait_ms, "linger_ms": linger_ms, "ack_p50": round(acks[n // 2], 2),
                "ack_p90": round(acks[n * 9 // 10], 2),
                "hop_p50": round(hops[n // 2], 2), "hop_p90": round(hops[n * 9 // 10], 2)}
    finally:
        await producer.stop()
        await consumer.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bootstrap", default=None, help="an existing broker (default: start an embedded one)")
    parser.add_argument("--broker", choices=["kafka", "tansu"], default="kafka", help="which embedded broker")
    parser.add_argument("--waits", default="5,100,500", help="fetch_max_wait_ms values to try")
    parser.add_argument("-n", type=int, default=40, help="messages per wait")
    parser.add_argument("--lingers", default="0", help="producer linger_ms values to try (the services use 0)")
    args = parser.parse_args()
    os.environ.setdefault(BROKER_ENV, args.broker)  # the services' producer and consumer settings for this broker
    broker: EmbeddedBroker | None = None
    bootstrap = args.bootstrap
    if bootstrap is None:
        work = Path(__file__).resolve().parent / ".work"
        work.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(work / "kafka_probe-kafka", ignore_errors=True)
        broker = (EmbeddedTansu(work / "kafka_probe-broker.log") if args.broker == "tansu"
                  else EmbeddedKafka(work / "kafka_probe-kafka", work / "kafka_probe-broker.log"))
        broker.start()
        bootstrap = broker.bootstrap
    try:
        import uvloop

        for linger in (int(v) for v in args.lingers.split(",")):
            for wait in (int(w) for w in args.waits.split(",")):
                print(uvloop.run(probe(bootstrap, wait, args.n, linger)), flush=True)
    finally:
        if broker is not None and broker.proc is not None:
            broker.proc.terminate()
            broker.proc.wait()


if __name__ == "__main__":
    main()
