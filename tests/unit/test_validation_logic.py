"""Pure parts of validation: period roll-up, pairing of differing rows, SQL building."""

from __future__ import annotations

from datetime import date

import pytest

from flows.control.fingerprints import Fingerprint
from flows.core.errors import ConfigError
from flows.core.table_config import SliceSize
from flows.engine.extract import SourceColumn
from flows.engine.fingerprinting import by_period
from flows.engine.normal_form import Col, bq_row_hash, pg_row_hash
from flows.engine.validation.bisection import _pair


def col(name: str, ftype: str = "STRING", mode: str = "NULLABLE") -> Col:
    from flows.core.type_mapping import pg_column_name

    return Col(SourceColumn(name, ftype, mode, None, None), pg_column_name(name))


def test_days_sum_into_iso_weeks_and_months() -> None:
    days = {
        date(2026, 11, 1): Fingerprint(2, 10),  # a Sunday: week of Oct 26
        date(2026, 11, 2): Fingerprint(3, 20),  # Monday
        date(2026, 11, 8): Fingerprint(1, 1),  # Sunday of the same week
    }
    assert by_period(days, SliceSize.WEEK) == {
        date(2026, 10, 26): Fingerprint(2, 10),
        date(2026, 11, 2): Fingerprint(4, 21),
    }
    assert by_period(days, SliceSize.MONTH) == {date(2026, 11, 1): Fingerprint(6, 31)}
    assert by_period({None: Fingerprint(5, 5)}, None) == {None: Fingerprint(5, 5)}


def test_pairing_by_key_names_changed_columns_and_splits_the_rest() -> None:
    cols = [col("id", "INT64"), col("Name"), col("Amount", "NUMERIC")]
    bq_only = [("h1", "1", "a", "1.000000000"), ("h2", "2", "b", "2.000000000")]
    pg_only = [("h3", "1", "a", "1.000000001"), ("h4", "3", "c", "3.000000000")]
    diff = _pair(cols, [0], bq_only, pg_only)
    assert diff.different == [
        {
            "key": {"id": "1"},
            "columns": ["amount"],
            "bigquery": {"amount": "1.000000000"},
            "postgres": {"amount": "1.000000001"},
        }
    ]
    assert diff.missing_in_postgres == [{"key": {"id": "2"}}]
    assert diff.extra_in_postgres == [{"key": {"id": "3"}}]
    # Without a key every differing row is reported whole, as missing or extra.
    nokey = _pair(cols, [], bq_only[:1], pg_only[:1])
    assert nokey.different == [] and len(nokey.missing_in_postgres) == len(nokey.extra_in_postgres) == 1


def test_sql_quotes_source_names_and_rejects_unquotable_ones() -> None:
    cols = [col("Search Query"), col("Date", "TIMESTAMP"), col("tags", "STRING", "REPEATED")]
    bq = bq_row_hash(cols)
    assert "`Search Query`" in bq and "unix_micros(`Date`)" in bq and "if(`tags` is null" in bq
    assert pg_row_hash(cols).as_string(None).count('"search_query"') == 2
    with pytest.raises(ConfigError):
        bq_row_hash([col("bad`name")])
