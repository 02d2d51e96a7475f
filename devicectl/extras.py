"""Optional parts of devicectl and the extra that installs each.

The device runtime (``pip install devicectl``) brings only what the daemon and its operator
commands use. Plotting, the web dashboard and the demo's embedded broker are extras; a command that
needs one checks for it first and, when it is missing, fails with one line naming the extra.
"""

from __future__ import annotations

import importlib

from devicectl.errors import DevicectlError

__all__ = ["EXTRAS", "MissingExtra", "require_extra"]

# extra -> the top-level modules it installs (the ones devicectl imports)
EXTRAS: dict[str, tuple[str, ...]] = {
    "report": ("matplotlib", "numpy"),
    "dashboard": ("starlette", "uvicorn"),
    "demo": ("amqtt", "matplotlib", "numpy", "starlette", "uvicorn"),
}


class MissingExtra(DevicectlError):
    """An optional dependency is not installed."""

    def __init__(self, feature: str, extra: str, module: str) -> None:
        self.feature, self.extra, self.module = feature, extra, module
        super().__init__(
            f"{feature} needs the optional [{extra}] dependencies ({module} is not installed): "
            f"pip install 'devicectl[{extra}]' (from a source tree: pip install '.[{extra}]')"
        )


def require_extra(extra: str, feature: str) -> None:
    """Raise :class:`MissingExtra` unless every module of ``extra`` imports."""
    for module in EXTRAS[extra]:
        try:
            importlib.import_module(module)
        except ImportError:
            raise MissingExtra(feature, extra, module) from None
