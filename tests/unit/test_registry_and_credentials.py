import json
from pathlib import Path

import pytest

from flows.core.errors import ConfigError
from flows.core.settings import PROJECT_ROOT, Settings
from flows.core.table_config import TableConfig, load_file, target_schema
from flows.engine.bigquery import load_service_account_info


def test_checked_in_registry_is_valid() -> None:
    tables = {t.table_name: t for t in load_file(PROJECT_ROOT / "config" / "tables.yml")}
    assert tables["search_query_performance"].lookback_days == 60
    assert tables["products"].write_strategy.value == "full_replace"


def test_registry_errors_name_table_and_field(tmp_path: Path) -> None:
    f = tmp_path / "t.yml"
    f.write_text(
        "tables:\n  bad:\n    source_table: x\n    priority: 5000\n    mode: maybe\n"
        "  nocursor:\n    source_table: y\n"
    )
    with pytest.raises(ConfigError) as e:
        load_file(f)
    msg = str(e.value)
    assert (
        "bad: " in msg
        and "priority" in msg
        and "mode" in msg
        and "nocursor" in msg
        and "cursor_column" in msg
    )


def test_registry_rejects_bad_names(tmp_path: Path) -> None:
    f = tmp_path / "t.yml"
    f.write_text("tables:\n  ok:\n    source_table: 'x.y'\n    write_strategy: full_replace\n")
    with pytest.raises(ConfigError, match="source_table"):
        load_file(f)


def test_priority_names() -> None:
    t = TableConfig(table_name="a", source_table="a", priority="critical", write_strategy="full_replace")  # type: ignore[arg-type]
    assert t.priority == 100


def test_inline_credentials_with_literal_newlines() -> None:
    key = "-----BEGIN PRIVATE KEY-----\\nABC\\n-----END PRIVATE KEY-----\\n"
    raw = json.dumps(
        {"type": "service_account", "client_email": "a@b.iam", "token_uri": "https://x", "private_key": key}
    )
    info = load_service_account_info(raw)
    assert info["private_key"].startswith("-----BEGIN PRIVATE KEY-----\nABC\n")


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ("{not json", "not valid JSON"),
        ('{"type": "user"}', "service-account"),
        ('{"type": "service_account"}', "lacks"),
    ],
)
def test_bad_inline_credentials(raw: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_service_account_info(raw)


@pytest.mark.parametrize(
    ("mode", "schema"),
    [("shadow", "sqp_raw_shadow"), ("live", "sqp_raw"), ("dry_run", "sqp_raw"), ("disabled", "sqp_raw")],
)
def test_target_schema_is_the_shadow_schema_for_a_shadow_table_only(mode: str, schema: str) -> None:
    """A shadow table writes beside raw, so the live raw table is untouched until cutover."""
    cfg = TableConfig(table_name="t", source_table="t", mode=mode, write_strategy="full_replace")
    assert target_schema(Settings(raw_schema="sqp_raw"), cfg) == schema
