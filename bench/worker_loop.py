"""CPU per request of one worker process, alone against Apache Kafka, under a closed loop of envelopes.

    .venv/bin/python bench/worker_loop.py [--concurrency 50] [--seconds 10] [--repeats 3] [--stream]
    .venv/bin/python bench/worker_loop.py --repo bench/.work/src/before   # interleaved with another tree

Why: the worker is the largest share of a request's CPU (bench/README.md), and the whole stack's figures
move by ±15 % on this shared machine, so a change of a few percent in the worker cannot be read there. This
drives the real `switchyard worker` process the way ingress does: envelopes routed to the fake provider's
deployment go to the provider topic with `concurrency` in flight, and each reply on `llm.replies` sends the
next. Nothing else runs: usage and events stay in their topics. Reported per tree: requests per second and
the worker's CPU per request (from /proc, so its whole process), median of the repeats, trees interleaved.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))

import procstat  # noqa: E402
from aiokafka import TopicPartition  # noqa: E402

from switchyard.devstack.apache_kafka import EmbeddedKafka  # noqa: E402
from switchyard.shared import topics  # noqa: E402
from switchyard.shared.config import load_config  # noqa: E402
from switchyard.shared.contracts import Reply, RequestEnvelope  # noqa: E402
from switchyard.shared.kafka import make_consumer, make_producer  # noqa: E402
from switchyard.shared.kafka_delivery import encode  # noqa: E402


async def drive(bootstrap: str, config_path: Path, pid: int, concurrency: int, seconds: float,
                stream: bool) -> tuple[float, float]:
    """Closed loop against the worker: (requests per second, worker CPU ms per request)."""
    config = load_config(str(config_path))
    group = config.models[0]
    dep = group.deployments[0]
    topic = topics.provider_topic(dep.provider)
    producer = make_producer(bootstrap)
    consumer = make_consumer(bootstrap=bootstrap, group_id=None)
    await producer.start()
    await consumer.start()
    replies = TopicPartition(topics.REPLIES, 0)
    consumer.assign([replies])
    await consumer.seek_to_end(replies)
    await consumer.position(replies)
    done = 0
    measuring = False

    async def send() -> None:
        env = RequestEnvelope(id=uuid.uuid4().hex, model=group.name, model_group=group.name, deployment=dep.id,
                              body={"model": group.name, "messages": [{"role": "user", "content": "hi there"}],
                                    **({"stream": True} if stream else {})},
                              stream=stream, reply_topic=topics.REPLIES, reply_partition=0, announce_start=False)
        await producer.send(topic, encode(env), key=env.id.encode())

    async def loop(until: float) -> None:
        nonlocal done
        while time.monotonic() < until:
            batches = await consumer.getmany(timeout_ms=200)
            for record in batches.get(replies, []):
                reply = Reply.model_validate_json(record.value)
                if reply.type in ("response", "end", "error"):
                    if reply.type == "error":
                        raise SystemExit(f"the worker answered with an error: {reply.data}")
                    done += measuring
                    await send()

    try:
        for _ in range(concurrency):
            await send()
        await loop(time.monotonic() + 3)  # warm up
        measuring, before, t0 = True, procstat.snapshot([pid]), time.monotonic()
        await loop(t0 + seconds)
        cpu_ms, t1 = sum(procstat.cpu_delta(before, procstat.snapshot([pid])).values()), time.monotonic()
        await asyncio.sleep(1)  # let the requests in flight end before the next run
        await consumer.getmany(timeout_ms=500)
        return done / (t1 - t0), cpu_ms / max(done, 1)
    finally:
        await producer.stop()
        await consumer.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--repo", action="append", default=[], help="another tree to measure, interleaved")
    args = parser.parse_args()
    work = BENCH / ".work" / "worker_loop"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    broker = EmbeddedKafka(work / "kafka", work / "broker.log")
    broker.start()
    fake = subprocess.Popen([sys.executable, str(BENCH / "fake_openai.py"), "--port", "0"], stdout=subprocess.PIPE)
    workers: list[subprocess.Popen[bytes]] = []
    try:
        assert fake.stdout is not None
        port = int(fake.stdout.readline().split()[1])
        config_path = work / "bench.yaml"
        config_path.write_text(f"models:\n  - name: bench\n    deployments:\n      - provider: openai\n"
                               f"        model: gpt-4o-mini\n        api_base: http://127.0.0.1:{port}/v1\n"
                               f"        api_key: x\n")
        env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap, "SWITCHYARD_CONFIG": str(config_path),
               "SWITCHYARD_PARTITIONS": "1"}  # as `switchyard up` makes them for one process per stage
        subprocess.run([sys.executable, "-m", "switchyard.cli", "topics", "create"], env=env, check=True,
                       cwd=work, capture_output=True)
        trees = [REPO, *(Path(r).resolve() for r in args.repo)]
        results: dict[Path, list[tuple[float, float]]] = {tree: [] for tree in trees}
        import uvloop

        for _ in range(args.repeats):
            for tree in trees:
                worker = subprocess.Popen([sys.executable, "-m", "switchyard.cli", "worker", "--provider", "openai"],
                                          env={**env, "PYTHONPATH": str(tree)}, cwd=work,
                                          stderr=open(work / "worker.log", "ab"))  # noqa: SIM115
                workers.append(worker)
                results[tree].append(uvloop.run(drive(broker.bootstrap, config_path, worker.pid, args.concurrency,
                                                      args.seconds, args.stream)))
                worker.terminate()
                worker.wait(30)
        kind = "streams" if args.stream else "requests"
        for tree, runs in results.items():
            rates = ", ".join(f"{r:.0f}" for r, _ in runs)
            cpus = ", ".join(f"{c:.3f}" for _, c in runs)
            print(f"{tree}: {kind}/s {statistics.median(r for r, _ in runs):.0f} ({rates}); worker CPU ms per "
                  f"{kind[:-1]} {statistics.median(c for _, c in runs):.3f} ({cpus})", flush=True)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
        fake.terminate()
        fake.wait()
        if broker.proc is not None:
            broker.proc.terminate()
            broker.proc.wait()


if __name__ == "__main__":
    main()
