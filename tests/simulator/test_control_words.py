"""The simulator's command words: every command parses, every bad word is named in the error."""

from __future__ import annotations

import pytest

from simulator.control import (
    FAULT_NAMES,
    ClearFaults,
    CommandError,
    Footswitch,
    InjectFault,
    Reboot,
    SetInterlock,
    Status,
    parse_command,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("footswitch down", Footswitch(down=True)),
        ("footswitch up", Footswitch(down=False)),
        *[
            (f"interlock {name} {action}", SetInterlock(name, open_=action == "open"))
            for name in ("estop", "door", "key", "contact", "cooling")
            for action in ("open", "close")
        ],
        ("fault energy-drift 1.3", InjectFault("energy-drift", 1.3)),
        ("fault stuck-shutter", InjectFault("stuck-shutter", None)),
        ("fault overheat", InjectFault("overheat", None)),
        ("fault line-noise 1e-4", InjectFault("line-noise", 1e-4)),
        ("fault drop-frames 0.1", InjectFault("drop-frames", 0.1)),
        ("fault slow-replies 40", InjectFault("slow-replies", 40.0)),
        ("fault hang", InjectFault("hang", None)),
        ("clear-faults", ClearFaults()),
        ("reboot", Reboot()),
        ("status", Status()),
    ],
)
def test_every_command_parses_and_prints_back_as_its_words(text: str, expected: object) -> None:
    command = parse_command(text)
    assert command == expected
    assert parse_command(text.split()) == expected
    # The canonical words parse back to the same command (what the control socket echoes).
    assert parse_command(command.words()) == expected


def test_every_fault_name_is_covered() -> None:
    assert set(FAULT_NAMES) == {
        "energy-drift",
        "stuck-shutter",
        "overheat",
        "line-noise",
        "drop-frames",
        "slow-replies",
        "hang",
    }


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("", "no command given"),
        ("footswich down", "unknown command 'footswich'"),
        ("footswitch", "footswitch down|up"),
        ("footswitch sideways", "unknown footswitch position 'sideways'"),
        ("footswitch down now", "footswitch down|up"),
        ("interlock window open", "unknown interlock 'window'"),
        ("interlock door opened", "unknown action 'opened'"),
        ("interlock door", "interlock estop|door|key|contact|cooling open|close"),
        ("fault", "fault NAME"),
        ("fault meltdown", "unknown fault 'meltdown'"),
        ("fault energy-drift", "fault energy-drift FACTOR"),
        ("fault energy-drift lots", "FACTOR must be a number, not 'lots'"),
        ("fault energy-drift -1", "FACTOR -1 is out of range"),
        ("fault energy-drift nan", "FACTOR nan is out of range"),
        ("fault energy-drift 0", "FACTOR 0 is out of range above 0..10"),
        ("fault line-noise 2", "BER 2 is out of range 0..1"),
        ("fault drop-frames 1.5", "P 1.5 is out of range 0..1"),
        ("fault slow-replies -3", "MS -3 is out of range"),
        ("fault hang 3", "expected `fault hang`"),
        ("status now", "expected `status`"),
        ("reboot please", "expected `reboot`"),
        ("clear-faults all", "expected `clear-faults`"),
    ],
)
def test_bad_words_are_refused_with_the_cause_in_one_line(text: str, named: str) -> None:
    with pytest.raises(CommandError) as caught:
        parse_command(text)
    message = str(caught.value)
    assert named in message
    assert "\n" not in message
    assert caught.value.words == tuple(text.split())
