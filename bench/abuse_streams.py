"""Slow stream readers against a running stack: peak memory of every process, and what happened to each stream.

`m` streaming chat requests are opened over raw sockets whose receive buffer is shrunk (SO_RCVBUF, set before
connecting) so the kernel hides little of the backlog; half of the clients never read a byte while they are
held (`stalled`), the other half read `trickle_bytes` a second (`trickle`). The provider (bench/fake_openai.py)
streams long answers, longer than ingress's per-stream buffer (`SWITCHYARD_STREAM_BUFFER_BYTES`, 1 MiB by
default), so a client that does not keep up must be cut by the gateway, not buffered without end.

While they are held, every process of the stack is sampled (VmRSS from /proc, `procstat.tree`) every
`sample_s`; an ordinary non-streaming request is sent every `probe_every_s` to check the stack still serves
others. Then every client reads what is left as fast as it can (up to `drain_s`), so each stream's end is seen:
`completed` (`data: [DONE]`), `cut` (the `stream_buffer_full` error event: the per-stream buffer cap),
`refused` (a 503 before the stream began, e.g. `overloaded` from `SWITCHYARD_MAX_IN_FLIGHT`, with Retry-After),
or `other` (anything else, with the first line it got).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
from procstat import label_for, tree

RCVBUF = 4096


@dataclass
class Stream:
    """What one slow client saw (`mode`: stalled, trickle, or long: stalled on a very long stream)."""

    mode: str
    head: bytes = b""
    tail: bytes = b""
    bytes_read: int = 0
    done: bool = False
    cut: bool = False
    error: str | None = None
    opened: bool = False

    def feed(self, data: bytes) -> None:
        self.bytes_read += len(data)
        if len(self.head) < 512:
            self.head += data[: 512 - len(self.head)]
        window = self.tail + data
        self.cut = self.cut or b"stream_buffer_full" in window
        self.done = self.done or b"data: [DONE]" in window
        self.tail = window[-64:]

    @property
    def status(self) -> int:
        try:
            return int(self.head.split(b" ", 2)[1])
        except (IndexError, ValueError):
            return 0

    def outcome(self) -> str:
        if self.status == 503:
            return "refused"
        if self.cut:
            return "cut"
        if self.done and self.status == 200:
            return "completed"
        return "other"


def _request(host: str, port: int, key: str, model: str, extra: dict[str, Any] | None = None) -> bytes:
    body = orjson.dumps({"model": model, "stream": True, "messages": [{"role": "user", "content": "long answer"}],
                         **(extra or {})})
    return (f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}:{port}\r\nauthorization: Bearer {key}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
            ).encode() + body


async def _open(host: str, port: int, request: bytes) -> socket.socket:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    sock.setblocking(False)
    await loop.sock_connect(sock, (host, port))
    await loop.sock_sendall(sock, request)
    return sock


async def _client(stream: Stream, host: str, port: int, request: bytes, release: asyncio.Event,
                  trickle_bytes: int, drain_s: float) -> None:
    """Open the stream, read as `stream.mode` says until `release`, then read to its end within `drain_s`."""
    loop = asyncio.get_running_loop()
    sock: socket.socket | None = None
    try:
        sock = await _open(host, port, request)
        stream.opened = True
        if stream.mode == "trickle":
            while not release.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await release.wait()
                if not release.is_set():
                    try:  # a plain non-blocking read: cancelling a pending sock_recv may lose what it read
                        data = sock.recv(trickle_bytes)
                    except BlockingIOError:
                        continue  # nothing came this second
                    if not data:
                        return
                    stream.feed(data)
        else:
            await release.wait()
        async with asyncio.timeout(drain_s):
            while data := await loop.sock_recv(sock, 65536):
                stream.feed(data)
    except (OSError, TimeoutError) as e:
        stream.error = type(e).__name__
    finally:
        if sock is not None:
            sock.close()


def sample_rss(roots: list[int]) -> dict[str, float]:
    """Resident memory (MB) per process label, summed over processes of one label (postgres backends)."""
    out: dict[str, float] = {}
    for pid in tree(roots):
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    label = label_for(pid)
                    out[label] = out.get(label, 0.0) + int(line.split()[1]) / 1024.0
                    break
    return out


@dataclass
class Sampler:
    roots: list[int]
    peaks: dict[str, float] = field(default_factory=dict)
    samples: int = 0

    def take(self) -> dict[str, float]:
        now = sample_rss(self.roots)
        for label, mb in now.items():
            self.peaks[label] = max(self.peaks.get(label, 0.0), mb)
        self.samples += 1
        return now


async def _probe(url: str, key: str, model: str) -> dict[str, Any]:
    began = time.monotonic()
    try:
        async with httpx.AsyncClient(timeout=60) as client:
            r = await client.post(f"{url}/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                                  json={"model": model, "messages": [{"role": "user", "content": "ping"}]})
        status = r.status_code
    except httpx.HTTPError as e:
        status = -1
        return {"status": status, "error": type(e).__name__, "ms": round((time.monotonic() - began) * 1000)}
    return {"status": status, "ms": round((time.monotonic() - began) * 1000)}


async def run(host: str, port: int, key: str, model: str, roots: list[int], m: int, hold_s: float,
              long_streams: int = 0, long_chunks: int = 8000, long_chunk_bytes: int = 1024, long_extra_s: float = 20.0,
              trickle_bytes: int = 16, drain_s: float = 60.0, sample_s: float = 0.5, probe_every_s: float = 5.0,
              open_batch: int = 100, say: Any = print) -> dict[str, Any]:
    """`m` slow readers (half stalled, half trickling) plus `long_streams` stalled readers of streams long enough
    (`long_chunks` chunks padded by `long_chunk_bytes`) to fill the kernel's socket buffers (a few MB per
    connection on loopback) and reach ingress's own per-stream cap; those stay unread until the others are done
    and `long_extra_s` more, so their answers have surely arrived (a loaded pipeline may take longer than the hold)."""
    url = f"http://{host}:{port}"
    sampler = Sampler(roots)
    baseline = sampler.take()
    sampler.peaks = {}
    release, release_long = asyncio.Event(), asyncio.Event()
    streams = [Stream("stalled" if i % 2 == 0 else "trickle") for i in range(m)]
    streams += [Stream("long") for _ in range(long_streams)]
    request = _request(host, port, key, model)
    long_request = _request(host, port, key, model, {"fake_stream_chunks": long_chunks,
                                                     "fake_chunk_bytes": long_chunk_bytes})
    tasks: list[asyncio.Task[None]] = []
    began = time.monotonic()
    for i, stream in enumerate(streams):  # opened in batches: a listen backlog is not what this measures
        long = stream.mode == "long"
        tasks.append(asyncio.create_task(_client(stream, host, port, long_request if long else request,
                                                 release_long if long else release, trickle_bytes, drain_s)))
        if (i + 1) % open_batch == 0:
            await asyncio.sleep(0.05)
            sampler.take()
    opened_s = time.monotonic() - began
    say(f"slow readers: {m} + {long_streams} long streams opened in {opened_s:.1f} s; holding them {hold_s:.0f} s")
    probes: list[dict[str, Any]] = []
    next_probe = time.monotonic()
    probe_task: asyncio.Task[dict[str, Any]] | None = None
    while time.monotonic() - began < hold_s:
        sampler.take()
        if probe_task is not None and probe_task.done():
            probes.append(probe_task.result())
            probe_task = None
        if probe_task is None and time.monotonic() >= next_probe:
            probe_task = asyncio.create_task(_probe(url, key, model))
            next_probe = time.monotonic() + probe_every_s
        await asyncio.sleep(sample_s)
    if probe_task is not None:
        probes.append(await probe_task)
    held_peak = dict(sampler.peaks)
    say("slow readers: releasing; every client now reads to the end of its stream")
    release.set()
    drain_began = time.monotonic()
    while not all(t.done() for t, s in zip(tasks, streams, strict=True) if s.mode != "long"):
        sampler.take()
        await asyncio.sleep(sample_s)
    drain = time.monotonic() - drain_began
    if long_streams:  # now that the pipeline is idle, the long answers arrive in full while still unread
        say(f"slow readers: drained in {drain:.0f} s; the long streams stay unread {long_extra_s:.0f} s more")
        until = time.monotonic() + long_extra_s
        while time.monotonic() < until:
            sampler.take()
            await asyncio.sleep(sample_s)
        release_long.set()
        while not all(t.done() for t in tasks):
            sampler.take()
            await asyncio.sleep(sample_s)
    after = [await _probe(url, key, model) for _ in range(3)]
    final = sampler.take()
    outcomes = Counter(s.outcome() for s in streams)
    by_mode = {mode: dict(Counter(s.outcome() for s in streams if s.mode == mode))
               for mode in ("stalled", "trickle", "long")}
    others = Counter((s.status, s.error, s.head[:60].decode(errors="replace").split("\r\n")[0])
                     for s in streams if s.outcome() == "other")
    return {
        "clients": m, "long_streams": long_streams, "long_chunks": long_chunks,
        "long_chunk_bytes": long_chunk_bytes, "hold_s": hold_s, "trickle_bytes_per_s": trickle_bytes, "rcvbuf": RCVBUF,
        "opened_s": round(opened_s, 1), "drain_s": round(drain, 1), "rss_samples": sampler.samples,
        "outcomes": dict(outcomes), "outcomes_by_mode": by_mode,
        "refused_with_retry_after": sum(1 for s in streams if s.status == 503 and b"retry-after" in s.head.lower()),
        "others": [{"status": k[0], "error": k[1], "first_line": k[2], "count": n} for k, n in others.most_common(5)],
        "bytes_read_total": sum(s.bytes_read for s in streams),
        "rss_mb_before": {k: round(v, 1) for k, v in sorted(baseline.items())},
        "rss_mb_peak_while_held": {k: round(v, 1) for k, v in sorted(held_peak.items())},
        "rss_mb_peak": {k: round(v, 1) for k, v in sorted(sampler.peaks.items())},
        "rss_mb_after": {k: round(v, 1) for k, v in sorted(final.items())},
        "probes_during": probes, "probes_after": after,
    }
