"""Scenario files: a timed script of simulator commands, played by ``devicectl sim --scenario``.

A scenario is TOML: an optional ``description`` and a list of ``[[step]]`` tables, each with
``at`` (seconds from the start of the simulator, non-decreasing from step to step) and ``command``
(the words of ``devicectl sim-control``, as one string or a list of words)::

    description = "a forehead pass, then the door opens"

    [[step]]
    at = 0.5
    command = "interlock contact close"

    [[step]]
    at = 2.0
    command = ["footswitch", "down"]

Everything is checked at load time: a bad step is a :class:`ScenarioError` naming the file, the
step (1-based, as an engineer counts them in the file) and the cause.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocols.bounded import BoundedInputError, decode_utf8, loads_toml, printable
from protocols.errors import DevicectlError
from simulator.control import CommandError, SimCommand, parse_command

__all__ = ["Scenario", "ScenarioError", "ScenarioStep", "load_scenario", "parse_scenario"]


class ScenarioError(DevicectlError):
    """A scenario file that cannot be played; ``step`` is 1-based, None for the file as a whole."""

    def __init__(self, source: str, step: int | None, reason: str) -> None:
        self.source, self.step, self.reason = source, step, reason
        where = f"scenario {printable(source, 120)}" + (
            f", step {step}" if step is not None else ""
        )
        super().__init__(f"{where}: {printable(reason, 240)}")  # one line, whatever the file holds


@dataclass(frozen=True, slots=True)
class ScenarioStep:
    at: float
    command: SimCommand


@dataclass(frozen=True, slots=True)
class Scenario:
    source: str
    description: str
    steps: tuple[ScenarioStep, ...]


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # strict: ``at = true`` is a typo, not 1 s; an integer number of seconds is a fine time
    at: float = Field(ge=0, allow_inf_nan=False, strict=True)
    command: str | list[str]


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = ""
    step: list[dict[str, Any]] = Field(min_length=1)


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"{where}: {first['msg']}" if where else str(first["msg"])


def parse_scenario(text: str, *, source: str = "<string>") -> Scenario:
    """The scenario in TOML ``text``; ScenarioError naming the step if anything is wrong."""
    try:
        data = loads_toml(text.encode())  # at most 1 MiB and 16 levels deep
    except BoundedInputError as exc:
        raise ScenarioError(source, None, exc.reason) from None
    try:
        model = _File.model_validate(data)
    except ValidationError as exc:
        if any(e["loc"] == ("step",) and e["type"] == "missing" for e in exc.errors()):
            raise ScenarioError(source, None, "no [[step]] tables") from exc
        raise ScenarioError(source, None, _first_error(exc)) from exc
    steps: list[ScenarioStep] = []
    for number, raw in enumerate(model.step, start=1):
        try:
            step = _Step.model_validate(raw)
            command = parse_command(step.command)
        except ValidationError as exc:
            raise ScenarioError(source, number, _first_error(exc)) from exc
        except CommandError as exc:
            raise ScenarioError(source, number, str(exc)) from exc
        if steps and step.at < steps[-1].at:
            raise ScenarioError(
                source,
                number,
                f"at = {step.at:g} s comes before the previous step's {steps[-1].at:g} s "
                "(steps must be in time order)",
            )
        steps.append(ScenarioStep(step.at, command))
    return Scenario(source, model.description, tuple(steps))


def load_scenario(path: Path) -> Scenario:
    """The scenario in the TOML file at ``path``; ScenarioError if it cannot be played."""
    if not str(path).strip() or str(path) == ".":
        raise ScenarioError(str(path), None, "an empty path is refused")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ScenarioError(str(path), None, f"cannot read it: {exc.strerror or exc}") from None
    try:
        text = decode_utf8(data)
    except BoundedInputError as exc:
        raise ScenarioError(str(path), None, exc.reason) from None
    return parse_scenario(text, source=str(path))


async def play_scenario(
    scenario: Scenario,
    apply: Callable[[SimCommand], object],
    *,
    clock: Callable[[], float] | None = None,
    log: Any = None,
) -> int:
    """Apply every step of ``scenario`` at its time from now; return how many steps failed.

    ``apply`` applies one command (usually ``functools.partial(apply_command, runner)``); a step
    the board refuses is logged and the scenario goes on, as a script on a real bench would.
    ``clock`` reads seconds (the running loop's clock by default).
    """
    log = log if log is not None else structlog.get_logger("simulator.scenario")
    now = clock if clock is not None else asyncio.get_running_loop().time
    start = now()
    failed = 0
    log.info("scenario_started", source=scenario.source, steps=len(scenario.steps))
    for number, step in enumerate(scenario.steps, start=1):
        delay = start + step.at - now()
        if delay > 0:
            await asyncio.sleep(delay)
        words = " ".join(step.command.words())
        try:
            apply(step.command)
        except (DevicectlError, ValueError) as exc:
            failed += 1
            log.warning("scenario_step_refused", step=number, command=words, error=str(exc))
        else:
            log.info("scenario_step", step=number, at=step.at, command=words)
    log.info("scenario_finished", source=scenario.source, failed=failed)
    return failed
