"""docs/protocol.md's test vectors, decoded and encoded with ``protocols``: the page a firmware
engineer implements a board from and the codec devicectl runs cannot drift apart."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

import protocols
from protocols import BadCommand, DeviceCodec, Frame, HostCodec, crc16, encode_frame

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def _block(tag: str) -> list[dict[str, Any]]:
    text = DOC.read_text(encoding="utf-8")
    match = re.search(rf"```json {tag}\n(.*?)\n```", text, re.DOTALL)
    assert match is not None, f"docs/protocol.md has no ```json {tag} block"
    vectors: list[dict[str, Any]] = json.loads(match.group(1))
    return vectors


MESSAGES = _block("test-vectors")
RECEIVING = _block("receive-vectors")


def _hex(text: str) -> bytes:
    """Hex bytes, with ``REPEAT xx N`` standing for N bytes xx and ``|`` joining pieces."""
    out = b""
    for piece in text.split("|"):
        words = piece.split()
        if words[:1] == ["REPEAT"]:
            out += bytes.fromhex(words[1]) * int(words[2])
        else:
            out += bytes.fromhex(" ".join(words))
    return out


def _message(vector: dict[str, Any]) -> protocols.Message:
    cls = getattr(protocols, vector["message"])
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in vector["fields"].items()}
    message: protocols.Message = cls(**fields)
    return message


def test_every_message_type_has_a_vector() -> None:
    types = {v["type"] for v in MESSAGES}
    every = set(protocols.COMMAND_TYPES) | set(protocols.REPLY_TYPES) | set(protocols.EVENT_TYPES)
    assert types == every


@pytest.mark.parametrize("vector", MESSAGES, ids=[v["message"] for v in MESSAGES])
def test_encoding_the_fields_gives_the_wire_bytes(vector: dict[str, Any]) -> None:
    message = _message(vector)
    assert vector["type"] == message.TYPE
    body = bytes((vector["seq"], vector["type"])) + message.payload()
    assert body == _hex(vector["body"])
    assert crc16(body) == int(vector["crc"], 16)
    assert encode_frame(vector["seq"], message.TYPE, message.payload()) == _hex(vector["wire"])
    codec = HostCodec() if vector["from"] == "host" else DeviceCodec()
    assert codec.send(vector["seq"], message) == _hex(vector["wire"])


@pytest.mark.parametrize("vector", MESSAGES, ids=[v["message"] for v in MESSAGES])
def test_decoding_the_wire_bytes_gives_the_fields(vector: dict[str, Any]) -> None:
    wire = _hex(vector["wire"])
    # The receiving end: a device decodes commands, a host replies and events.
    codec = DeviceCodec() if vector["from"] == "host" else HostCodec()
    for i in range(len(wire)):  # one byte at a time, as a UART delivers them
        codec.receive_data(wire[i : i + 1])
    decoded = codec.events()
    assert decoded == [Frame(vector["seq"], _message(vector))]
    assert codec.counters.dropped == 0


@pytest.mark.parametrize("vector", RECEIVING, ids=[v["name"] for v in RECEIVING])
def test_the_receiving_rules(vector: dict[str, Any]) -> None:
    stream = _hex(vector["stream"])
    pieces = [stream[i : i + 1] for i in range(len(stream))]  # as a UART delivers them
    if vector["end"] == "host":
        host = HostCodec()
        for piece in pieces:
            host.receive_data(piece)
        bodies = [bytes((f.seq, f.message.TYPE)) + f.message.payload() for f in host.events()]
        assert [b.hex(" ") for b in bodies] == vector["frames"]
        counters = host.counters.as_dict()
    else:
        device = DeviceCodec()
        for piece in pieces:
            device.receive_data(piece)
        refusals = [e for e in device.events() if isinstance(e, BadCommand)]
        expected = [BadCommand(r["seq"], r["type"], r["reason"]) for r in vector["refusals"]]
        assert refusals == expected
        counters = device.counters.as_dict()
    for name, count in vector["counters"].items():
        assert counters[name] == count, name
    assert counters["dropped"] == sum(vector["counters"].values())
