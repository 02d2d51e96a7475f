"""The ``devicectl`` console script."""

from devicectl.cli import commands  # noqa: F401  (registers every command on the app)
from devicectl.cli.app import app


def main() -> None:
    app()


__all__ = ["app", "main"]
