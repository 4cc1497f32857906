"""What a partition costs a consumer and the broker: CPU per consumed message, by the topic's partition count.

    .venv/bin/python bench/partitions_probe.py                    # 16, 4 and 1 partitions, twice, ~2 min
    .venv/bin/python bench/partitions_probe.py --partitions 16,2 --rate 200

A producer sends keyed 400-byte messages at a steady `--rate` (one at a time, as requests arrive between bursts)
to a topic of N partitions; one consumer (a separate process, with the services' consumer settings from
shared/kafka.py) reads them all. The probe reports the consumer's and the embedded broker's CPU per message
(/proc, so the producer's own CPU is not counted in the consumer's; the broker's includes serving the produce).
aiokafka names every partition a consumer holds in every fetch request, and the broker answers for each, so
this is the cost a stage pays for partitions it holds beyond what it needs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvloop  # noqa: E402

from switchyard.devstack.apache_kafka import EmbeddedKafka  # noqa: E402
from switchyard.shared.kafka import ensure_topics, make_consumer, make_producer  # noqa: E402


def cpu_ms(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


async def consume(bootstrap: str, topic: str, count: int) -> None:
    consumer = make_consumer(topic, bootstrap=bootstrap, group_id=f"probe-{topic}")
    await consumer.start()
    print("ready", flush=True)
    got = 0
    while got < count:
        got += sum(len(records) for records in (await consumer.getmany(timeout_ms=1000)).values())
    await consumer.stop()


async def produce(bootstrap: str, topic: str, count: int, rate: float) -> None:
    producer = make_producer(bootstrap)
    await producer.start()
    start = time.perf_counter()
    for i in range(count):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await producer.send(topic, b"x" * 400, key=uuid.uuid4().hex.encode())
    await producer.flush()
    await producer.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--partitions", default="16,4,1")
    parser.add_argument("--rate", type=float, default=400.0, help="messages per second")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--consume", nargs=3, metavar=("BOOTSTRAP", "TOPIC", "COUNT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.consume:
        uvloop.run(consume(args.consume[0], args.consume[1], int(args.consume[2])))
        return
    work = Path(__file__).resolve().parent / ".work" / "partitions_probe"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    broker = EmbeddedKafka(work / "kafka", work / "broker.log")
    broker.start()
    assert broker.proc is not None
    count = int(args.rate * args.seconds)
    try:
        for round_ in range(args.rounds):
            for partitions in (int(p) for p in args.partitions.split(",")):
                topic = f"probe-{partitions}-{round_}"
                uvloop.run(ensure_topics(broker.bootstrap, {topic: partitions}))
                reader = subprocess.Popen([sys.executable, __file__, "--consume", broker.bootstrap, topic, str(count)],
                                          stdout=subprocess.PIPE, text=True)
                assert reader.stdout is not None
                reader.stdout.readline()
                time.sleep(3)  # the group is joined and the first fetch waits
                consumer_before, broker_before = cpu_ms(reader.pid), cpu_ms(broker.proc.pid)
                uvloop.run(produce(broker.bootstrap, topic, count, args.rate))
                consumer_ms, broker_ms = cpu_ms(reader.pid) - consumer_before, cpu_ms(broker.proc.pid) - broker_before
                reader.wait()
                print(f"{partitions:3d} partitions: consumer {consumer_ms / count * 1000:6.0f} µs/message, "
                      f"broker {broker_ms / count * 1000:6.0f} µs/message (with the produce)", flush=True)
    finally:
        broker.proc.terminate()
        broker.proc.wait()


if __name__ == "__main__":
    main()
