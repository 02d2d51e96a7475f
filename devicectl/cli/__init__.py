"""The ``devicectl`` console script."""

from devicectl.cli.app import app


def main() -> None:
    # Importing the command modules registers their commands on ``app``.
    from devicectl.cli import commands  # noqa: F401

    app()


__all__ = ["app", "main"]
