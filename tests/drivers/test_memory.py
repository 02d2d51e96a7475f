"""The in-memory transport: ordered, never re-entrant delivery; fault-injecting manipulators."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import pytest

from drivers import MemoryLink, MemoryTransport, TransportError


def collect(end: MemoryTransport) -> tuple[list[bytes], list[TransportError]]:
    received: list[bytes] = []
    lost: list[TransportError] = []
    end.attach(on_data=received.append, on_lost=lost.append)
    return received, lost


async def drain() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_pair_delivers_in_order_both_ways() -> None:
    host, device = MemoryLink.pair()
    at_host, _ = collect(host)
    at_device, _ = collect(device)
    for i in range(100):
        host.write(bytes([i]))
    device.write(b"reply")
    await drain()
    assert at_device == [bytes([i]) for i in range(100)]
    assert at_host == [b"reply"]


async def test_delivery_is_never_reentrant() -> None:
    host, device = MemoryLink.pair()
    depth = [0]
    order: list[str] = []

    def on_device_data(data: bytes) -> None:
        depth[0] += 1
        order.append(f"device got {data!r} at depth {depth[0]}")
        device.write(b"echo:" + data)
        order.append("device handler returns")
        depth[0] -= 1

    def on_host_data(data: bytes) -> None:
        order.append(f"host got {data!r}")

    device.attach(on_data=on_device_data, on_lost=lambda _e: None)
    host.attach(on_data=on_host_data, on_lost=lambda _e: None)
    host.write(b"x")
    assert order == []  # nothing delivered inside write()
    await drain()
    assert order == [
        "device got b'x' at depth 1",
        "device handler returns",
        "host got b'echo:x'",
    ]


async def test_data_written_before_attach_waits_in_order() -> None:
    host, device = MemoryLink.pair()
    host.write(b"a")
    host.write(b"b")
    await drain()
    received, _ = collect(device)
    await drain()
    assert received == [b"a", b"b"]


async def test_manipulator_splits_corrupts_and_drops() -> None:
    calls = [0]

    def manipulate(data: bytes) -> Iterable[bytes]:
        calls[0] += 1
        if calls[0] == 1:
            return [data[:2], data[2:]]  # split
        if calls[0] == 2:
            return [bytes([data[0] ^ 0xFF]) + data[1:]]  # corrupt one byte
        return []  # drop

    host, device = MemoryLink.pair(to_device=manipulate)
    at_host, _ = collect(host)
    at_device, _ = collect(device)
    host.write(b"hello")
    host.write(b"\x01\x02")
    host.write(b"gone")
    device.write(b"untouched")  # the other direction has no manipulator
    await drain()
    assert at_device == [b"he", b"llo", b"\xfe\x02"]
    assert at_host == [b"untouched"]


async def test_closing_one_end_tells_the_other_it_vanished() -> None:
    host, device = MemoryLink.pair("memory://board")
    at_host, lost = collect(host)
    collect(device)
    device.close()
    device.write(b"after close")  # ignored
    await drain()
    assert at_host == []
    assert len(lost) == 1
    assert lost[0].port == "memory://board"
    assert str(lost[0]) == "serial port memory://board vanished: peer closed"
    assert not host.is_open
    host.write(b"ignored once closed")


async def test_local_close_does_not_report_lost() -> None:
    host, device = MemoryLink.pair()
    _, lost = collect(host)
    collect(device)
    host.close()
    await host.wait_closed()
    await drain()
    assert lost == []
    assert not host.is_open
    assert not device.is_open


async def test_memory_link_accepts_each_connection_and_can_be_unplugged() -> None:
    accepted: list[MemoryTransport] = []
    link = MemoryLink(accepted.append, name="sim")
    first = await link.connect(on_data=lambda _d: None, on_lost=lambda _e: None)
    assert link.url == "memory://sim" == first.url
    assert accepted == [link.device]
    link.available = False
    with pytest.raises(TransportError, match="serial port memory://sim cannot be opened") as err:
        await link.connect(on_data=lambda _d: None, on_lost=lambda _e: None)
    assert err.value.port == "memory://sim"
    link.available = True
    await link.connect(on_data=lambda _d: None, on_lost=lambda _e: None)
    assert link.connections == 2
    assert len(accepted) == 2
