"""Summary checks: the dbt summaries against raw (check `matches_raw`): per summary and
period, the sums of the ASIN counts equal those of the raw SQP weeks in that period.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from uuid import UUID

import psycopg
from psycopg import sql

from flows.control import dq
from flows.core.planning import to_ts

SUMMARY_SCHEMA = "summaries"
SUMMARY_PERIODS = {
    "week": "weekly_summary",
    "month": "monthly_summary",
    "quarter": "quarterly_summary",
    "year": "yearly_summary",
}
# raw column -> its sum's column in every summary
SUMMARY_MEASURES = {
    "asin_impression_count": "impressions",
    "asin_click_count": "clicks",
    "asin_cart_add_count": "cart_adds",
    "asin_purchase_count": "purchases",
}


@dataclass(frozen=True)
class SummaryCheck:
    summary: str
    period_start: date
    raw: tuple[int, ...]
    summary_sums: tuple[int, ...]

    @property
    def passed(self) -> bool:
        return self.raw == self.summary_sums


def check_summaries(
    conn: psycopg.Connection, raw_schema: str, sqp_table: str = "search_query_performance"
) -> list[SummaryCheck]:
    """Per summary and period: the sums of the ASIN counts in the summary equal those of raw
    for the SQP weeks in that period (a week belongs to the period of its UTC start date)."""
    week = sql.SQL("({} at time zone 'UTC')::date").format(sql.Identifier("date"))
    raw_sums, summary_sums = (
        sql.SQL(", ").join(
            sql.SQL("sum({}) as {}").format(sql.Identifier(c), sql.Identifier(f"m{i}"))
            for i, c in enumerate(names)
        )
        for names in (list(SUMMARY_MEASURES), list(SUMMARY_MEASURES.values()))
    )
    n = len(SUMMARY_MEASURES)
    pick = sql.SQL(", ").join(
        sql.SQL("{}.{}").format(sql.Identifier(side), sql.Identifier(f"m{i}"))
        for side in "rs"
        for i in range(n)
    )
    out: list[SummaryCheck] = []
    for period, summary in SUMMARY_PERIODS.items():
        bucket = (
            week
            if period == "week"
            else sql.SQL("date_trunc({}, {})::date").format(sql.Literal(period), week)
        )
        rows = conn.execute(
            sql.SQL(
                "with r as (select {bucket} as p, {raw_sums} from {raw} group by 1), "
                "s as (select period_start as p, {summary_sums} from {summary} group by 1) "
                "select coalesce(r.p, s.p), {pick} from r full join s on r.p = s.p order by 1"
            ).format(
                bucket=bucket,
                raw_sums=raw_sums,
                summary_sums=summary_sums,
                raw=sql.Identifier(raw_schema, sqp_table),
                summary=sql.Identifier(SUMMARY_SCHEMA, summary),
                pick=pick,
            )
        ).fetchall()
        for r in rows:
            values = [int(x or 0) for x in r[1:]]
            out.append(SummaryCheck(summary, r[0], tuple(values[:n]), tuple(values[n:])))
    return out


def record_summary_checks(
    conn: psycopg.Connection, control_schema: str, checks: list[SummaryCheck], run_id: UUID | None = None
) -> None:
    """One dq_results row per summary period (check `matches_raw`; expected/observed: the
    purchase sums of raw / the summary); `validation.failed` when any differs."""
    rows = [
        dq.DqRow(
            c.summary,
            "matches_raw",
            to_ts(c.period_start),
            "pass" if c.passed else "fail",
            c.raw[-1],
            c.summary_sums[-1],
            {
                "raw": dict(zip(SUMMARY_MEASURES, c.raw, strict=True)),
                "summary": dict(zip(SUMMARY_MEASURES.values(), c.summary_sums, strict=True)),
            },
        )
        for c in checks
    ]
    failed: dict[str, list[str]] = {}
    for c in checks:
        if not c.passed:
            failed.setdefault(c.summary, []).append(str(c.period_start))
    dq.record_per_relation(conn, control_schema, rows, "matches_raw", failed, run_id)
