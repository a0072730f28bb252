import pytest
from psycopg import sql

from flows.core.db import qualified
from flows.core.errors import ConfigError
from flows.core.identifiers import (
    bq_quote,
    bq_table_path,
    validate_dataset,
    validate_pg_identifier,
    validate_project,
)


@pytest.mark.parametrize("bad", ["sqp.", "sqp..x", "a'b", 'a"b', "a`b", "a b", "", "sqp;drop"])
def test_bad_dataset_names(bad: str) -> None:
    with pytest.raises(ConfigError, match="invalid BigQuery dataset"):
        validate_dataset(bad)


@pytest.mark.parametrize("bad", ["My-Project", "proj.", "ab", "proj'x", "1project"])
def test_bad_projects(bad: str) -> None:
    with pytest.raises(ConfigError):
        validate_project(bad)


def test_good_names() -> None:
    assert validate_project("sqp-demo") == "sqp-demo"
    assert validate_project("example.com:my-proj") == "example.com:my-proj"
    assert bq_table_path("sqp-demo", "sqp", "products") == "`sqp-demo.sqp.products`"
    assert bq_quote("Search Query") == "`Search Query`"


def test_quote_rejects_backtick() -> None:
    with pytest.raises(ConfigError):
        bq_quote("a`b")


def test_pg_identifier() -> None:
    assert validate_pg_identifier("raw_shadow") == "raw_shadow"
    for bad in ["Raw", "a-b", 'x"; drop', "a" * 64]:
        with pytest.raises(ConfigError):
            validate_pg_identifier(bad)


def test_qualified_names_a_control_table_quoted() -> None:
    assert qualified("refresh_control", "refresh_runs") == sql.Identifier("refresh_control", "refresh_runs")
    assert qualified("refresh_control", "refresh_runs").as_string() == '"refresh_control"."refresh_runs"'


@pytest.mark.parametrize(("schema", "name"), [('ctl"; drop', "refresh_runs"), ("ctl", "Runs"), ("", "x")])
def test_qualified_refuses_a_name_that_is_no_identifier(schema: str, name: str) -> None:
    with pytest.raises(ConfigError, match=r"invalid (schema|table) name"):
        qualified(schema, name)
