"""jobqueue.location reads the URL and schema as pydantic-settings does, or defers to it."""

from __future__ import annotations

import os

import pytest

from jobqueue.db.connect import normalize
from jobqueue.errors import ConfigurationError
from jobqueue.location import Location, quick
from jobqueue.settings import Settings

URL = "postgresql://u@db.example:5433/q"


def settings_from(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Settings:
    for key in list(os.environ):
        if key.upper().startswith("JOBQ_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings()


@pytest.mark.parametrize("env", [
    {"JOBQ_DATABASE_URL": URL},
    {"JOBQ_DATABASE_URL": URL, "JOBQ_SCHEMA": "queue_x"},
    {"jobq_database_url": URL, "jobq_schema": "other"},  # pydantic-settings ignores the case
    {"Jobq_Database_Url": "postgres://u@h/d", "JOBQ_SCHEMA": "_s9"},
    {"JOBQ_DATABASE_URL": "postgresql+psycopg://u:pw@h/d", "JOBQ_CONCURRENCY": "7"},
], ids=["url", "url-schema", "lower-case", "mixed-case", "driver-suffix"])
def test_quick_agrees_with_settings(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    s = settings_from(monkeypatch, env)
    assert s.database_url is not None
    assert quick() == Location(normalize(s.database_url), s.schema_name)


@pytest.mark.parametrize("env", [
    {},  # the embedded server: its home and state come from Settings
    {"JOBQ_DATABASE_URL": ""},
    {"JOBQ_DATABASE_URL": URL, "JOBQ_SCHEMA": "Bad-Name"},  # Settings refuses it with its own message
    {"JOBQ_DATABASE_URL": URL, "JOBQ_SCHEMA": ""},
], ids=["no-url", "empty-url", "bad-schema", "empty-schema"])
def test_quick_defers_to_settings_when_unsure(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    settings_from(monkeypatch, {})
    assert quick(environ=env) is None


def test_the_option_wins_over_the_environment() -> None:
    assert quick("postgresql://opt@h/d", environ={"JOBQ_DATABASE_URL": URL}) == Location("postgresql://opt@h/d", "jobq")


def test_a_url_that_is_not_postgres_is_the_same_readable_error() -> None:
    with pytest.raises(ConfigurationError, match="not a PostgreSQL URL"):
        quick(environ={"JOBQ_DATABASE_URL": "mysql://u@h/d"})
