"""The telemetry publisher uses its libraries' public APIs only: no private attribute of aiomqtt or
paho (``client._client``, ``_sock_close``), so that a minor release of either cannot break it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "devicectl" / "telemetry"


def _private_accesses(path: Path) -> list[str]:
    """``x._name`` where ``x`` is not ``self``/``cls``, and ``getattr(x, "_name")``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and not (isinstance(node.value, ast.Name) and node.value.id in {"self", "cls"})
        ):
            found.append(f"{path.name}:{node.lineno}: .{node.attr}")
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in {"getattr", "setattr", "hasattr"}
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and str(node.args[1].value).startswith("_")
        ):
            found.append(f"{path.name}:{node.lineno}: {node.func.id}(..., {node.args[1].value!r})")
    return found


@pytest.mark.parametrize("module", ["publisher.py", "connection.py"])
def test_no_private_attribute_of_another_object(module: str) -> None:
    assert _private_accesses(PACKAGE / module) == []
