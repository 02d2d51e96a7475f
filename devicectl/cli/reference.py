"""``docs/cli.md``, generated from the command tree itself: ``devicectl cli-reference``.

A hidden command, so that the reference is made by the same code that parses the arguments;
``tests/test_cli_reference.py`` fails when the committed page differs from what it prints.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.main

from devicectl.cli.app import app

__all__ = ["render_reference"]

_HEAD = """\
# Command-line reference

Generated from the command tree by `devicectl cli-reference --out docs/cli.md`; a test fails
when this page and the CLI differ. Every command also explains itself with `--help`, and
`devicectl --install-completion` installs shell completion.

Exit codes, for every command: **0** success, **1** refused (a safety limit, a state; the message
names the rule, the value and the bound), **2** usage error (a bad option or value), **3** cannot
reach the daemon or the device.

Output: a command that prints a result prints readable text on a terminal, and JSON with `--json`
or whenever its output is not a terminal (a pipe, a file, a script).

Environment: every setting of the daemon's config file is also a `DEVICECTL_*` variable, nested
keys joined by `__` (`DEVICECTL_MQTT__URL`); variables rank above the file, flags above both. The
file is `--config FILE`, else `$DEVICECTL_CONFIG`, else `/etc/devicectl/devicectl.toml` when it
exists. Client commands find the daemon's control socket from `--control`, `$DEVICECTL_CONTROL`,
or the same config. The control socket's own protocol is docs/control-api.md.

Where these commands refine the original design, docs/design-notes.md ("Section 7: command line")
says what holds: `port` defaults to `sim`, `sim-control --socket` defaults to the path `sim` uses,
`stop` exits 3 when the device cannot confirm. `config show`, `dashboard`, the fleet recorder's
`recorder` and `fleet`, `users`, `kernel-workers` (a root job of the device's, beside the daemon)
and the simulator's `--max-rate`, `--serial` and `--seed` are additions.
"""


# Options typer adds itself (their wording follows typer's version): described once, above.
_TYPER_OWN = frozenset({"help", "install_completion", "show_completion"})


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _default(param: Any) -> str:
    show = getattr(param, "show_default", None)
    if isinstance(show, str):
        return show
    if getattr(param, "is_flag", False) and not getattr(param, "secondary_opts", None):
        return ""
    default = param.default
    if default is None or (isinstance(default, list | tuple) and not default):
        return ""
    if callable(default):
        return ""
    if isinstance(default, bool):
        name: str = param.opts[0] if default else (param.secondary_opts or [""])[0]
        return name
    return str(getattr(default, "value", default))


def _range(param: Any) -> str:
    low, high = getattr(param, "min", None), getattr(param, "max", None)
    if low is None and high is None:
        return ""
    return f"{low if low is not None else ''}–{high if high is not None else ''}"


def _options(command: Any, ctx: Any) -> list[str]:
    rows = ["| option | value | default | meaning |", "|---|---|---|---|"]
    arguments = []
    for param in command.get_params(ctx):
        if getattr(param, "hidden", False) or param.name in _TYPER_OWN:
            continue
        if param.param_type_name == "argument":
            arguments.append(param)
            continue
        names = " / ".join(f"`{o}`" for o in [*param.opts, *param.secondary_opts])
        value = param.metavar or ""
        span = _range(param)
        value = f"{value} ({span})" if span else value
        note = param.help or ""
        if getattr(param, "required", False):
            note += " (required)"
        if getattr(param, "multiple", False) and "repeatable" not in note:
            note += " (repeatable)"
        envvar = param.envvar if isinstance(param.envvar, str) else None
        if envvar and envvar not in note:
            note += f" Environment: `{envvar}`."
        default = _default(param)
        rows.append(
            f"| {names} | {_cell(value)} | {_cell(f'`{default}`' if default else '')} "
            f"| {_cell(note)} |"
        )
    lines: list[str] = []
    if arguments:
        lines += ["| argument | meaning |", "|---|---|"]
        for arg in arguments:
            lines.append(f"| `{arg.metavar or arg.name.upper()}` | {_cell(arg.help or '')} |")
        lines.append("")
    return lines + rows


def _section(command: Any, path: list[str], parent: Any) -> list[str]:
    ctx = command.context_class(command, info_name=path[-1], parent=parent)
    name = " ".join(path)
    doc = inspect.cleandoc(command.help or "")
    lines = [f"## `{name}`", ""]
    if doc:
        lines += [doc, ""]
    lines += ["```", f"{name} {' '.join(command.collect_usage_pieces(ctx))}", "```", ""]
    if command.epilog:
        lines += [inspect.cleandoc(command.epilog), ""]
    options = _options(command, ctx)
    if len(options) > 2:
        lines += [*options, ""]
    subcommands = getattr(command, "commands", {})
    for sub_name in sorted(subcommands):
        sub = subcommands[sub_name]
        if not getattr(sub, "hidden", False):
            lines += _section(sub, [*path, sub_name], ctx)
    return lines


def render_reference() -> str:
    """The whole reference, as Markdown."""
    root = typer.main.get_command(app)
    return _HEAD + "\n" + "\n".join(_section(root, ["devicectl"], None)).rstrip() + "\n"


@app.command("cli-reference", hidden=True)
def cli_reference(
    out: Annotated[
        Path | None, typer.Option("--out", metavar="FILE", help="Write here, not to stdout.")
    ] = None,
) -> None:
    """Print the command-line reference (docs/cli.md) as Markdown.

    Example: devicectl cli-reference --out docs/cli.md
    """
    text = render_reference()
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.write_text(text, encoding="utf-8")
