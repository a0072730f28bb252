"""Deterministic synthetic source data, written through the real BigQuery client.

Three tables, as SPEC.md describes: the weekly SQP export (column names with spaces), a small
product catalog, and a daily search-term table. Rows are produced by set-based SQL
(`INSERT ... SELECT` over generated arrays), so one million SQP rows take seconds, and every
value is a pure function of the row number: the same parameters give the same data.

Funnels are consistent by construction: each count is derived from the stage above it and
capped by it (`least(...)`), so impressions >= clicks >= cart adds >= purchases, both for
the ASIN and for the query totals, and every share is a ratio of an ASIN count to its total.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from datetime import date, timedelta

from google.api_core import exceptions as gexc
from google.cloud import bigquery

from flows.core.identifiers import bq_table_path
from flows.engine.bigquery import BigQueryClients

SQP_TABLE = "search_query_performance"
PRODUCTS_TABLE = "products"
DAILY_TABLE = "daily_search_terms"
GENERATOR_VERSION = 1

S = bigquery.SchemaField
STAGES = ("Click", "Cart Add", "Purchase")


def sqp_schema() -> list[bigquery.SchemaField]:
    fields = [
        S("Date", "TIMESTAMP", description="Start of the SQP week"),
        S("Parent ASIN", "STRING"),
        S("Child ASIN", "STRING"),
        S("ASIN", "STRING"),
        S("Search Query", "STRING"),
        S("Search Query Score", "INT64"),
        S("Search Query Volume", "INT64"),
        S("Total Query Impression Count", "INT64"),
        S("ASIN Impression Count", "INT64"),
        S("ASIN Impression Share", "NUMERIC"),
    ]
    for x in STAGES:
        fields += [
            S(f"Total {x} Count", "INT64"),
            S(f"Total {x} Rate", "NUMERIC"),
            S(f"ASIN {x} Count", "INT64"),
            S(f"ASIN {x} Share", "NUMERIC"),
            S(f"Total Median {x} Price Amount", "NUMERIC"),
            S(f"ASIN Median {x} Price Amount", "NUMERIC"),
            S(f"Total Same Day Shipping {x} Count", "INT64"),
            S(f"Total One Day Shipping {x} Count", "INT64"),
            S(f"Total Two Day Shipping {x} Count", "INT64"),
        ]
    return fields


def products_schema() -> list[bigquery.SchemaField]:
    return [
        S("ASIN", "STRING"),
        S("Parent ASIN", "STRING"),
        S("Title", "STRING"),
        S("Brand", "STRING"),
        S("Updated At", "TIMESTAMP"),
    ]


def daily_schema() -> list[bigquery.SchemaField]:
    return [
        S("date", "DATE"),
        S("asin", "STRING"),
        S("search_query", "STRING"),
        S("impressions", "INT64"),
        S("clicks", "INT64"),
        S("purchases", "INT64"),
        S("spend", "NUMERIC"),
        S("sales", "NUMERIC"),
    ]


@dataclass(frozen=True)
class SampleSpec:
    """What to generate. `sqp_rows` is exact; weeks end at `last_week` (a Sunday)."""

    sqp_rows: int = 20_000
    weeks: int = 26
    asins: int = 50
    daily_rows: int = 10_000
    last_week: date = date(2026, 11, 22)

    def __post_init__(self) -> None:
        if self.sqp_rows < 1 or self.weeks < 1 or self.asins < 1 or self.daily_rows < 0:
            raise ValueError("sqp_rows, weeks and asins must be >= 1, daily_rows >= 0")

    @property
    def first_week(self) -> date:
        return self.last_week - timedelta(weeks=self.weeks - 1)

    @property
    def rows_per_week(self) -> int:
        return math.ceil(self.sqp_rows / self.weeks)

    def fingerprint(self) -> str:
        d = asdict(self)
        d["last_week"] = self.last_week.isoformat()
        d["generator"] = GENERATOR_VERSION
        return json.dumps(d, sort_keys=True)


class _Hashes:
    """Pseudo-random integers in [0, m) from the row number: pure arithmetic, so the same SQL
    gives the same data on BigQuery and on the emulator. Each one becomes a column of the base
    CTE, and later expressions only combine columns (the emulator's SQL translation loses the
    precedence of `a * mod(x, m)`)."""

    def __init__(self, var: str) -> None:
        self.var = var
        self.defs: dict[str, str] = {}

    def __call__(self, salt: int, m: int) -> str:
        name = f"h{salt}_{m}"
        self.defs[name] = f"mod({self.var} * {2 * salt + 7919} + {salt * 104729 + 13}, {m})"
        return name

    def columns(self) -> str:
        return "".join(f", {expr} as {name}" for name, expr in self.defs.items())


_QUERY_WORDS = [
    "running shoes",
    "zapatillas de running",
    "chaussures d'été",
    "laufschuhe größe 42",
    "跑步鞋",
    "ランニングシューズ",
    "кроссовки для бега",
    "wireless earbuds",
    "yoga mat",
    "café en grano",
    "protein powder",
    "🏃 trail shoes",
]


def _case(expr: str, values: list[str]) -> str:
    whens = " ".join(f"when {i} then '{v.replace(chr(39), chr(92) + chr(39))}'" for i, v in enumerate(values))
    return f"case {expr} {whens} end"


def _numbers(count: int) -> str:
    """Row numbers 0..count-1 as `n`, from two small arrays (BigQuery caps one array's size)."""
    hi = max(1, math.ceil(count / 1000))
    return (
        "(select b * 1000 + a as n from unnest(generate_array(0, 999)) as a "
        f"cross join unnest(generate_array(0, {hi - 1})) as b where b * 1000 + a < {count})"
    )


def _asin(expr: str) -> str:
    return f"concat('B0', lpad(cast({expr} as string), 8, '0'))"


def _parent(expr: str) -> str:
    return f"concat('P0', lpad(cast(div({expr}, 4) as string), 8, '0'))"


def _query_text(expr: str) -> str:
    return f"concat({_case(f'mod({expr}, {len(_QUERY_WORDS)})', _QUERY_WORDS)}, ' ', cast({expr} as string))"


def sqp_insert_sql(path: str, spec: SampleSpec) -> str:
    """INSERT ... SELECT that fills the SQP table; columns in the order of sqp_schema()."""
    rpw = spec.rows_per_week
    a = spec.asins
    _h = _Hashes("n")
    # Each stage derives from the one above and is capped by it.
    funnel = f"""
      select *,
        div(total_imp * (10 + {_h(4, 100)}), 1000) as total_click
      from (
        select *,
          volume * (2 + {_h(2, 5)}) as total_imp
        from (select *, 1000 + {_h(1, 50000)} as volume from base)
      )
    """
    stage2 = f"""
      select *,
        div(total_click * (10 + {_h(5, 50)}), 100) as total_cart,
        div(total_imp * {_h(3, 300)}, 1000) as asin_imp
      from funnel
    """
    stage3 = f"""
      select *,
        div(total_cart * (20 + {_h(6, 60)}), 100) as total_purchase,
        least(div(total_click * {_h(7, 400)}, 1000), asin_imp) as asin_click
      from stage2
    """
    stage4 = f"""
      select *,
        least(div(total_cart * {_h(8, 400)}, 1000), asin_click) as asin_cart
      from stage3
    """
    stage5 = f"""
      select *,
        least(div(total_purchase * {_h(9, 400)}, 1000), asin_cart) as asin_purchase
      from stage4
    """

    def ratio(num: str, den: str) -> str:
        return f"round(safe_divide(cast({num} as numeric), cast({den} as numeric)), 4)"

    def price(salt: int) -> str:
        # NULL now and then, as the real export has for thin queries.
        return f"if({_h(salt, 23)} = 0, null, cast(299 + {_h(salt + 1, 9000)} as numeric) / 100)"

    stage_cols: list[str] = []
    for key, total, asin_c, salt in (
        ("click", "total_click", "asin_click", 20),
        ("cart", "total_cart", "asin_cart", 30),
        ("purchase", "total_purchase", "asin_purchase", 40),
    ):
        stage_cols += [
            total,
            ratio(total, "total_imp" if key == "click" else "total_click"),
            asin_c,
            ratio(asin_c, total),
            price(salt),
            price(salt + 2),
            f"div({total} * {_h(salt + 4, 20)}, 100)",
            f"div({total} * {_h(salt + 5, 30)}, 100)",
            f"div({total} * {_h(salt + 6, 40)}, 100)",
        ]
    select_cols = [
        f"timestamp_add(timestamp '{spec.first_week.isoformat()} 00:00:00+00', interval w * 7 day)",
        f"if({_h(11, 50)} = 0, null, {_parent('ai')})",
        _asin("ai"),
        _asin("ai"),
        _query_text("qi"),
        f"1 + {_h(12, 100)}",
        "volume",
        "total_imp",
        "asin_imp",
        ratio("asin_imp", "total_imp"),
        *stage_cols,
    ]
    base = f"""
      select n,
        div(n, {rpw}) as w,
        mod(mod(n, {rpw}), {a}) as ai,
        div(mod(n, {rpw}), {a}) as qi{_h.columns()}
      from {_numbers(spec.sqp_rows)}
    """
    names = ", ".join(f"`{f.name}`" for f in sqp_schema())
    return (
        f"insert into {path} ({names})\n"
        f"with base as ({base}), funnel as ({funnel}), stage2 as ({stage2}), "
        f"stage3 as ({stage3}), stage4 as ({stage4}), stage5 as ({stage5})\n"
        f"select {', '.join(select_cols)} from stage5"
    )


def products_insert_sql(path: str, spec: SampleSpec) -> str:
    brands = ["Acme", "Nordlicht", "Sakura", "Élan", "Zenith"]
    names = ", ".join(f"`{f.name}`" for f in products_schema())
    return (
        f"insert into {path} ({names})\n"
        f"select {_asin('n')}, {_parent('n')}, "
        f"concat('Product ', cast(n as string), ' – ', {_case('mod(n, 3)', ['basic', 'pro', 'max'])}), "
        f"{_case(f'mod(n, {len(brands)})', brands)}, "
        f"timestamp '{spec.last_week.isoformat()} 12:00:00+00'\n"
        f"from {_numbers(spec.asins)}"
    )


def daily_insert_sql(path: str, spec: SampleSpec) -> str:
    days = spec.weeks * 7
    per_day = math.ceil(spec.daily_rows / days)
    names = ", ".join(f"`{f.name}`" for f in daily_schema())
    _h = _Hashes("n")
    imp = f"100 + {_h(54, 5000)}"
    clk = f"div(imp * {_h(55, 20)}, 100)"
    select = (
        f"date_add(date '{spec.first_week.isoformat()}', interval div(n, {per_day}) day), "
        f"{_asin(f'mod(mod(n, {per_day}), {spec.asins})')}, "
        f"{_query_text(f'div(mod(n, {per_day}), {spec.asins})')}, "
        f"imp, clk, least(div(clk * {_h(51, 30)}, 100), clk), "
        f"cast(clk * (10 + {_h(52, 90)}) as numeric) / 100, "
        f"cast(clk * (50 + {_h(53, 400)}) as numeric) / 100"
    )
    return (
        f"insert into {path} ({names})\n"
        f"select {select}\n"
        f"from (select *, {clk} as clk from (select *, {imp} as imp from "
        f"(select n{_h.columns()} from {_numbers(spec.daily_rows)})))"
    )


@dataclass(frozen=True)
class GeneratedTable:
    table: str
    rows: int
    skipped: bool


def _fill(
    clients: BigQueryClients,
    table: str,
    schema: list[bigquery.SchemaField],
    sql_for: object,
    spec: SampleSpec,
    rows: int,
    force: bool,
) -> GeneratedTable:
    client = clients.rest
    table_id = f"{clients.project}.{clients.dataset}.{table}"
    fingerprint = spec.fingerprint()
    if not force:
        try:
            existing = client.get_table(table_id)
        except gexc.NotFound:
            existing = None
        if existing is not None and existing.description == fingerprint:
            return GeneratedTable(table, rows, skipped=True)
    client.delete_table(table_id, not_found_ok=True)
    t = bigquery.Table(table_id, schema=schema)
    t.description = fingerprint
    client.create_table(t)
    if rows:
        path = bq_table_path(clients.project, clients.dataset, table)
        client.query(sql_for(path, spec), job_config=clients.query_config()).result()  # type: ignore[operator]
    return GeneratedTable(table, rows, skipped=False)


def generate(clients: BigQueryClients, spec: SampleSpec, force: bool = False) -> list[GeneratedTable]:
    """Create the dataset and fill the three tables; tables already holding `spec` are kept."""
    ds = bigquery.Dataset(f"{clients.project}.{clients.dataset}")
    ds.location = clients.settings.bq_location
    clients.rest.create_dataset(ds, exists_ok=True)
    return [
        _fill(clients, SQP_TABLE, sqp_schema(), sqp_insert_sql, spec, spec.sqp_rows, force),
        _fill(clients, PRODUCTS_TABLE, products_schema(), products_insert_sql, spec, spec.asins, force),
        _fill(clients, DAILY_TABLE, daily_schema(), daily_insert_sql, spec, spec.daily_rows, force),
    ]
