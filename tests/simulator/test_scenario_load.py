"""Scenario files: loading, validation errors that name the step, and the shipped example."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulator.control import ClearFaults, Footswitch, InjectFault, SetInterlock
from simulator.scenario import ScenarioError, load_scenario, parse_scenario

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "scenarios"


def test_steps_load_in_order_with_string_or_list_commands() -> None:
    scenario = parse_scenario(
        """
        description = "two steps"
        [[step]]
        at = 0
        command = "footswitch down"
        [[step]]
        at = 1.5
        command = ["fault", "energy-drift", "1.3"]
        """,
        source="inline",
    )
    assert scenario.description == "two steps"
    assert [(s.at, s.command) for s in scenario.steps] == [
        (0.0, Footswitch(down=True)),
        (1.5, InjectFault("energy-drift", 1.3)),
    ]


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[[step]\n", "scenario inline: not valid TOML"),
        ("description = 'nothing'\n", "scenario inline: no [[step]] tables"),
        ("speed = 2\n[[step]]\nat = 0\ncommand = 'reboot'\n", "scenario inline: speed: Extra"),
        ("[[step]]\ncommand = 'reboot'\n", "scenario inline, step 1: at: Field required"),
        ("[[step]]\nat = -1\ncommand = 'reboot'\n", "scenario inline, step 1: at: Input should be"),
        ("[[step]]\nat = 0\n", "scenario inline, step 1: command: Field required"),
        (
            "[[step]]\nat = 0\ncommand = 'reboot'\n[[step]]\nat = 1\ncommand = 'footswich down'\n",
            "scenario inline, step 2: bad simulator command 'footswich down': unknown command",
        ),
        (
            "[[step]]\nat = 0\ncommand = 'reboot'\nwhen = 3\n",
            "scenario inline, step 1: when: Extra inputs are not permitted",
        ),
        (
            "[[step]]\nat = 2\ncommand = 'reboot'\n[[step]]\nat = 1\ncommand = 'status'\n",
            "scenario inline, step 2: at = 1 s comes before the previous step's 2 s",
        ),
        (
            "[[step]]\nat = 0\ncommand = 'fault drop-frames 3'\n",
            "scenario inline, step 1: bad simulator command 'fault drop-frames 3': P 3 is out",
        ),
    ],
)
def test_a_bad_file_is_refused_naming_the_step_and_cause(text: str, named: str) -> None:
    with pytest.raises(ScenarioError) as caught:
        parse_scenario(text, source="inline")
    assert named in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ScenarioError, match=r"nope\.toml: cannot read it"):
        load_scenario(missing)


def test_the_shipped_treatment_is_a_whole_session_with_a_fault() -> None:
    scenario = load_scenario(EXAMPLES / "treatment.toml")
    commands = [s.command for s in scenario.steps]
    assert Footswitch(down=True) in commands
    assert any(isinstance(c, InjectFault) for c in commands)
    assert ClearFaults() in commands
    assert commands[0] == SetInterlock("contact", open_=True)
    assert commands[-1] == Footswitch(down=False)
    times = [s.at for s in scenario.steps]
    assert times == sorted(times)
