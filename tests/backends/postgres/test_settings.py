"""The PostgreSQL engine's URL handling and SQL files: no server needed."""

from __future__ import annotations

import pytest
from psycopg.conninfo import conninfo_to_dict

import keel
from keel.backends import _sql
from keel.backends.postgres.connection import PostgresSettings
from keel.backends.postgres.migrate import MIGRATIONS, QUERIES, SCHEMA_VERSION


def test_keel_parameters_are_read_and_removed_before_libpq_sees_the_url() -> None:
    settings = PostgresSettings.from_url(
        "postgresql://u:pw@127.0.0.1:5433/db?pool_max_size=3&options=-csearch_path%3Dapp&pool_timeout_s=2.5"
        "&pool_min_size=0&query_timeout_s=4"
    )
    params = conninfo_to_dict(settings.conninfo)
    assert (settings.pool_min_size, settings.pool_max_size) == (0, 3)
    assert (settings.pool_timeout_s, settings.query_timeout_s) == (2.5, 4.0)
    assert not {"pool_max_size", "pool_min_size", "pool_timeout_s", "query_timeout_s"} & set(params)
    assert (params["host"], params["port"], params["dbname"], params["user"]) == ("127.0.0.1", "5433", "db", "u")
    # keel's statement timeout comes first, so a statement_timeout in the URL's own options would win.
    assert params["options"] == "-c statement_timeout=4000 -csearch_path=app"
    assert settings.masked_url.startswith("postgresql://u:***@127.0.0.1:5433/db?")


def test_defaults_are_added_unless_the_url_sets_them() -> None:
    default = conninfo_to_dict(PostgresSettings.from_url("postgresql://127.0.0.1/db").conninfo)
    assert default["connect_timeout"] == "5"
    assert default["keepalives"] == "1"
    assert default["application_name"] == "keel"
    assert default["options"] == "-c statement_timeout=15000"
    own = PostgresSettings.from_url("postgresql://127.0.0.1/db?connect_timeout=2&application_name=mine")
    assert own.connect_timeout_s == 2.0
    assert conninfo_to_dict(own.conninfo)["application_name"] == "mine"


@pytest.mark.parametrize(
    "url", ["postgres://127.0.0.1/db", "postgresql+psycopg://127.0.0.1/db", "POSTGRESQL://127.0.0.1/db"]
)
def test_scheme_spellings_are_accepted(url: str) -> None:
    assert conninfo_to_dict(PostgresSettings.from_url(url).conninfo)["dbname"] == "db"


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("pool_max_size=0", "pool_max_size"),
        ("pool_max_size=2.5", "pool_max_size"),
        ("pool_min_size=-1", "pool_min_size"),
        ("pool_min_size=5&pool_max_size=2", "pool_max_size must not be below pool_min_size"),
        ("pool_timeout_s=soon", "pool_timeout_s"),
        ("query_timeout_s=0", "query_timeout_s"),
        ("query_timeout_s=nan", "query_timeout_s"),
        ("connect_timeout=soon", "connect_timeout"),
        ("no_such_option=1", "no_such_option"),
    ],
)
def test_bad_url_parameters_are_configuration_errors(query: str, message: str) -> None:
    with pytest.raises(keel.ConfigurationError, match=message) as caught:
        PostgresSettings.from_url(f"postgresql://u:hunter2@127.0.0.1/db?{query}")
    assert "hunter2" not in str(caught.value)


def test_sql_sections_are_parsed_by_name_without_their_description() -> None:
    text = "-- a file header\n\n-- one --\n-- The first.\nSELECT 1\n\n-- two --\n-- The second.\nSELECT 2;\n"
    assert _sql.parse(text) == {"one": "SELECT 1", "two": "SELECT 2;"}


@pytest.mark.parametrize(
    "text",
    [
        "-- one --\nSELECT 1\n",  # no description
        "-- one --\n-- Described, but empty.\n",
        "-- one --\n-- A.\nSELECT 1\n-- one --\n-- B.\nSELECT 2\n",  # twice
    ],
)
def test_malformed_sql_files_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="one"):
        _sql.parse(text)


def test_shipped_sql_files_hold_every_statement_the_engine_runs() -> None:
    expected = {"lock_schema", "schema_version", "record_schema_version", "get", "current"}
    assert expected | {"create", "swap", "history"} <= set(QUERIES)
    assert len(MIGRATIONS) == SCHEMA_VERSION >= 1
    assert all(not statement.startswith("--") for statement in QUERIES.values())
