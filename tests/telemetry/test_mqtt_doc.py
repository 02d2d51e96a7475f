"""docs/mqtt.md against the payload models the daemon publishes with: every field of every
payload is in the page's tables, every example is a valid message of its topic, and the page
names every topic of the contract."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from protocols import mqtt

DOC = (Path(__file__).resolve().parents[2] / "docs" / "mqtt.md").read_text(encoding="utf-8")
MODELS: dict[str, type[mqtt.Envelope]] = {
    "state": mqtt.StatePayload,
    "session": mqtt.SessionPayload,
    "sessions/{id}/events": mqtt.SessionEventPayload,
    "pulses": mqtt.PulseBatchPayload,
    "metrics": mqtt.MetricsPayload,
    "alerts": mqtt.AlertPayload,
}


def _examples() -> dict[str, dict[str, object]]:
    match = re.search(r"```json mqtt-examples\n(.*?)```", DOC, re.DOTALL)
    assert match is not None
    examples: dict[str, dict[str, object]] = json.loads(match.group(1))
    return examples


def _table(heading: str) -> set[str]:
    start = DOC.index(f"### `{heading}`")
    end = DOC.index("\n### ", start + 1)
    return set(re.findall(r"^\| `(\w+)` \|", DOC[start:end], re.MULTILINE))


@pytest.mark.parametrize("topic", list(MODELS))
def test_every_field_is_in_its_table(topic: str) -> None:
    own = set(MODELS[topic].model_fields) - set(mqtt.Envelope.model_fields)
    assert _table(topic) == own


def test_the_summary_table_and_the_envelope() -> None:
    assert _table("summary") == set(mqtt.SessionSummary.model_fields)
    for field in mqtt.Envelope.model_fields:
        assert f"| `{field}` |" in DOC, field


@pytest.mark.parametrize("topic", list(MODELS))
def test_every_example_is_a_valid_message(topic: str) -> None:
    example = _examples()[topic]
    MODELS[topic].model_validate(example)


def test_every_topic_of_the_contract_is_named() -> None:
    for spec in mqtt.STREAMS.values():
        pattern = spec.pattern.replace("{command}", "stop")
        assert f"`{pattern}`" in DOC, pattern
