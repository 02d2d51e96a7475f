"""``devicectl demo``: the whole system on one machine, playing one scripted treatment.

An embedded MQTT broker (amqtt) unless one is named, the daemon with the in-process simulator, the
dashboard, and a session played end to end with one injected breach (docs/demo.md):

- :mod:`.script` — the scripted session (:class:`TreatmentScript`), its phases and parameters;
- :mod:`.broker` — :class:`EmbeddedBroker`;
- :mod:`.run` — :class:`DemoStack`, which owns broker, daemon and dashboard and plays the script;
- :mod:`.outcome` — :func:`check_session`: did the log record what the script did?
- :mod:`.view` — the live terminal panel and the closing lines.
"""

from devicectl.demo.broker import EmbeddedBroker
from devicectl.demo.outcome import EXPECTED_BREACH, SessionCheck, check_session
from devicectl.demo.run import (
    DemoOptions,
    DemoResult,
    DemoStack,
    InProcessControls,
    configure_demo_logging,
    default_demo_dir,
    demo_users,
    write_demo_policy,
)
from devicectl.demo.script import (
    DemoControls,
    DemoError,
    DemoProgress,
    DemoUsers,
    Phase,
    ScriptRecord,
    TreatmentScript,
    demo_params,
    plan_phases,
)

__all__ = [
    "EXPECTED_BREACH",
    "DemoControls",
    "DemoError",
    "DemoOptions",
    "DemoProgress",
    "DemoResult",
    "DemoStack",
    "DemoUsers",
    "EmbeddedBroker",
    "InProcessControls",
    "Phase",
    "ScriptRecord",
    "SessionCheck",
    "TreatmentScript",
    "check_session",
    "configure_demo_logging",
    "default_demo_dir",
    "demo_params",
    "demo_users",
    "plan_phases",
    "write_demo_policy",
]
