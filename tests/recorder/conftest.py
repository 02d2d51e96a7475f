"""The recorder's tests run against both engines: every test taking ``db_url`` runs twice, on
the embedded SQLite default and on a throwaway PostgreSQL database (tests/postgres.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'recorder.sqlite'}"
    url: str = request.getfixturevalue("postgres_url")
    return url
