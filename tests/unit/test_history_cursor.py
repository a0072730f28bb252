"""History cursors (flows.control.history.HistoryCursor), property-based: whatever text a
client sends as `cursor`, decoding gives a cursor or refuses it by name, and every cursor the
API gives out decodes to itself."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flows.control.history import HistoryCursor
from flows.core.errors import ConfigError

REFUSED = "cursor is not one this API gave out"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decodes_or_refuses(text: str) -> None:
    try:
        cursor = HistoryCursor.decode(text)
    except ConfigError as exc:
        assert REFUSED in str(exc)
        return
    assert cursor.started_at.tzinfo is not None


@given(st.text(max_size=200))
def test_any_text_decodes_or_is_refused_by_name(text: str) -> None:
    _decodes_or_refuses(text)


@given(json_values)
def test_any_json_value_decodes_or_is_refused_by_name(value: object) -> None:
    _decodes_or_refuses(_b64(json.dumps(value).encode()))


ZONES = st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=8))])
# Either half well formed and the other anything: each half is checked on its own.
timestamps = st.datetimes(timezones=ZONES).map(datetime.isoformat) | json_values
run_ids = st.uuids().map(str) | json_values


@given(timestamps, run_ids)
def test_any_pair_decodes_or_is_refused_by_name(started_at: object, run_id: object) -> None:
    _decodes_or_refuses(_b64(json.dumps([started_at, run_id]).encode()))


@given(st.datetimes(timezones=ZONES), st.uuids())
def test_every_cursor_given_out_decodes_to_itself(at: datetime, run_id: object) -> None:
    cursor = HistoryCursor(at, run_id)  # type: ignore[arg-type]
    assert HistoryCursor.decode(cursor.encode()) == cursor


@pytest.mark.parametrize(
    "crafted",
    [
        # ["2024-01-01T00:00:00+00:00", 1]: a number where the run id goes (a 400, not a 500)
        "WyIyMDI0LTAxLTAxVDAwOjAwOjAwKzAwOjAwIiwgMV0",
        _b64(b'["2024-01-01T00:00:00+00:00", {"a": 1}]'),
        _b64(b'[1, "00000000-0000-0000-0000-000000000001"]'),
        _b64(b'{"started_at": "2024-01-01T00:00:00+00:00"}'),
        _b64(b'["2024-01-01T00:00:00+00:00", "00000000-0000-0000-0000-000000000001", 3]'),
        _b64(b"[" * 5000),
        _b64(b"\xff\xfe"),
    ],
)
def test_crafted_cursors_are_refused_by_name(crafted: str) -> None:
    with pytest.raises(ConfigError, match=REFUSED):
        HistoryCursor.decode(crafted)
