"""ICD v1 codec throughput: PULSE frames decoded and encoded per second, on one core.

Run from the repository root: ``.venv/bin/python -m benchmarks.codec [--frames N] [--repeat R]``.
Prints a table; the best of R runs is reported (these machines are noisy: compare rows of one run).
Target: decode ≥ 250,000 frames/s. Rows:

- FrameReader: COBS + CRC only; HostCodec: plus typed messages; DeviceLink receive path: plus
  event dispatch, SEQ-gap counting and the daemon's handler (a no-op here);
- each fed the whole stream as one buffer, and in 1 KiB chunks (a serial read returns ≤ 1,024 B);
- encode: HostCodec.send / DeviceCodec.send of a PULSE, and encode_frame of its prebuilt payload;
- breach to STOP: one PULSE chunk into the link's receive callback, whose handler calls
  ``stop_now()``, until STOP's bytes reach the transport's ``write`` (host CPU only: add the port's
  own latency, e.g. an FTDI adapter's 16 ms latency timer).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable

from devicectl.link import DeviceLink
from drivers import MemoryLink
from protocols import DeviceCodec, FrameReader, HostCodec, Message, Pulse, encode_frame


def pulse_stream(count: int) -> bytes:
    codec = DeviceCodec()
    return b"".join(
        codec.send(i & 0xFF, Pulse(i + 1, i * 2000, 10_000 + (i % 600))) for i in range(count)
    )


def chunked(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def best_rate(run: Callable[[], int], repeat: int) -> float:
    best = 0.0
    for _ in range(repeat):
        start = time.perf_counter()
        frames = run()
        elapsed = time.perf_counter() - start
        best = max(best, frames / elapsed)
    return best


class _RecordingTransport:
    """A transport that only notes when it was written to."""

    url = "bench"
    is_open = True

    def __init__(self) -> None:
        self.written_ns = 0

    def write(self, _data: bytes) -> None:
        self.written_ns = time.perf_counter_ns()

    def close(self) -> None:
        self.is_open = False

    async def wait_closed(self) -> None:
        return None


async def breach_to_stop_us(count: int) -> list[float]:
    """Per PULSE: µs from handing its bytes to the link to STOP being written."""
    frames = [DeviceCodec().send(i & 0xFF, Pulse(i + 1, i * 2000, 99_999)) for i in range(count)]
    transport = _RecordingTransport()

    def on_event(_seq: int, _message: Message) -> None:
        link.stop_now()  # the supervisor's reaction to a breach

    link = DeviceLink(MemoryLink().connect, port="bench", on_event=on_event)
    link._transport = transport  # attached by hand: no handshake in a micro-benchmark
    out: list[float] = []
    for frame in frames:
        start = time.perf_counter_ns()
        link._on_data(frame)
        out.append((transport.written_ns - start) / 1000)
        pending = link._pending
        assert pending is not None
        link._abandon(pending, None)  # as if ACKed: the next breach writes a fresh STOP
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    n: int = args.frames
    repeat: int = args.repeat
    stream = pulse_stream(n)
    feeds = {"whole": [stream], "1 KiB chunks": chunked(stream, 1024)}

    rows: list[tuple[str, str, float]] = []
    for feed_name, chunks in feeds.items():

        def reader_run(chunks: list[bytes] = chunks) -> int:
            reader = FrameReader()
            got = 0
            for chunk in chunks:
                got += len(reader.feed(chunk))
            return got

        def host_run(chunks: list[bytes] = chunks) -> int:
            codec = HostCodec()
            got = 0
            for chunk in chunks:
                codec.receive_data(chunk)
                got += len(codec.events())
            return got

        def link_run(chunks: list[bytes] = chunks) -> int:
            seen = [0]

            def on_event(_seq: int, _message: Message) -> None:
                seen[0] += 1

            link = DeviceLink(MemoryLink().connect, port="bench", on_event=on_event)
            receive = link._on_data  # the transport's data callback, called directly
            for chunk in chunks:
                receive(chunk)
            assert link.stats["lost_events"] == 0
            return seen[0]

        for name, run in (
            ("decode FrameReader", reader_run),
            ("decode HostCodec", host_run),
            ("decode DeviceLink receive path", link_run),
        ):
            assert run() == n
            rows.append((name, feed_name, best_rate(run, repeat)))

    pulses = [Pulse(i + 1, i * 2000, 10_000) for i in range(n)]

    def encode_codec() -> int:
        send = DeviceCodec().send
        for i, pulse in enumerate(pulses):
            send(i & 0xFF, pulse)
        return n

    payloads = [p.payload() for p in pulses]

    def encode_raw() -> int:
        for i, payload in enumerate(payloads):
            encode_frame(i & 0xFF, 0xA0, payload)
        return n

    rows.append(("encode DeviceCodec.send(Pulse)", "-", best_rate(encode_codec, repeat)))
    rows.append(("encode encode_frame(payload)", "-", best_rate(encode_raw, repeat)))

    latencies = sorted(asyncio.run(breach_to_stop_us(min(n, 20_000))))

    print(f"ICD v1 codec, {n:,} PULSE frames ({len(stream):,} bytes), best of {repeat}")
    print(f"{'what':<34} {'fed':<13} {'frames/s':>12} {'µs/frame':>9}")
    for name, feed_name, rate in rows:
        print(f"{name:<34} {feed_name:<13} {rate:>12,.0f} {1e6 / rate:>9.2f}")
    p50 = statistics.median(latencies)
    p99 = latencies[int(len(latencies) * 0.99)]
    print(f"breach to STOP written (host CPU): p50 {p50:.1f} µs, p99 {p99:.1f} µs")


if __name__ == "__main__":
    main()
