import pytest

from flows.core.errors import ConfigError, SchemaDriftError
from flows.core.type_mapping import diff_schema, map_schema, pg_column_name, pg_type


@pytest.mark.parametrize(
    ("bq", "pg"),
    [
        ("Total Same Day Shipping Cart Add Count", "total_same_day_shipping_cart_add_count"),
        ("ASIN", "asin"),
        ("Search Query", "search_query"),
        ("  Odd--Name__x ", "odd_name_x"),
        ("7 Day Sales", "c_7_day_sales"),
        ("Ümlaut Größe", "mlaut_gr_e"),
    ],
)
def test_column_name_rule(bq: str, pg: str) -> None:
    assert pg_column_name(bq) == pg


def test_column_name_rejects_empty_and_long() -> None:
    with pytest.raises(ConfigError):
        pg_column_name("!!!")
    with pytest.raises(ConfigError):
        pg_column_name("x" * 64)


@pytest.mark.parametrize(
    ("bq", "mode", "pg"),
    [
        ("STRING", "NULLABLE", "text"),
        ("INT64", "NULLABLE", "bigint"),
        ("INTEGER", "REQUIRED", "bigint"),
        ("FLOAT64", "NULLABLE", "double precision"),
        ("NUMERIC", "NULLABLE", "numeric(38,9)"),
        ("BIGNUMERIC", "NULLABLE", "numeric"),
        ("BOOL", "NULLABLE", "boolean"),
        ("TIMESTAMP", "NULLABLE", "timestamp with time zone"),
        ("DATE", "NULLABLE", "date"),
        ("DATETIME", "NULLABLE", "timestamp without time zone"),
        ("JSON", "NULLABLE", "jsonb"),
        ("RECORD", "NULLABLE", "jsonb"),
        ("STRING", "REPEATED", "jsonb"),
        ("BYTES", "NULLABLE", "bytea"),
    ],
)
def test_types(bq: str, mode: str, pg: str) -> None:
    assert pg_type(bq, mode) == pg


def test_numeric_with_declared_precision() -> None:
    assert pg_type("NUMERIC", "NULLABLE", 10, 2) == "numeric(10,2)"


def test_unknown_type_is_config_error() -> None:
    with pytest.raises(ConfigError, match="no Postgres mapping"):
        pg_type("WIDGET")


def test_collisions_and_reserved_names() -> None:
    with pytest.raises(ConfigError, match="both map to"):
        map_schema(
            [("A B", "STRING", "NULLABLE", None, None), ("a_b", "STRING", "NULLABLE", None, None)], "t"
        )
    # a source column named like a lineage column loses the underscore: no clash
    assert map_schema([("_loaded_at", "STRING", "NULLABLE", None, None)], "t")[0].name == "loaded_at"


def test_drift_new_column_added_retyped_and_dropped_fail() -> None:
    cols = map_schema([("A", "STRING", "NULLABLE", None, None), ("B", "INT64", "NULLABLE", None, None)], "t")
    diff = diff_schema("t", cols, {"a": "text", "_loaded_at": "timestamp with time zone"})
    assert [c.name for c in diff.added] == ["b"]
    with pytest.raises(SchemaDriftError, match="changed type"):
        diff_schema("t", cols, {"a": "text", "b": "text"})
    with pytest.raises(SchemaDriftError, match="dropped"):
        diff_schema("t", cols, {"a": "text", "b": "bigint", "c": "text"})
