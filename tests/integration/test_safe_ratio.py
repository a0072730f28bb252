"""macros/safe_ratio.sql against Python's Decimal: exact to 6 decimals, ties away from zero.

The macro is compiled by dbt (Postgres and BigQuery targets) and evaluated in real Postgres
and the BigQuery emulator on counts near 1e15, BIGINT extremes and hand-picked half-way
cases. `round(cast(n as numeric) / d, 6)` fails here: Postgres gives the quotient about 16
significant digits first, so a quotient near 1e15 keeps only ~4 decimals
((1e15 + 1) / 3 = 333333333333333.6667, which then "rounds" to .666700, not .666667).
"""

from __future__ import annotations

import random
import tempfile
from decimal import ROUND_HALF_UP, Decimal, localcontext
from pathlib import Path
from typing import Any

import psycopg

from flows.core.settings import Settings
from flows.engine.transform import dbt_env, invoke_dbt, profiles_dir

SIX_PLACES = Decimal("0.000001")
BIGINT_MAX = 2**63 - 1


def reference(numerator: int | None, denominator: int | None) -> Decimal | None:
    """numerator / denominator exactly, rounded to 6 places half away from zero; NULL when
    either side is NULL or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    with localcontext() as ctx:
        ctx.prec = 80
        # ROUND_HALF_UP in decimal rounds ties away from zero, for negative values too.
        return (Decimal(numerator) / Decimal(denominator)).quantize(SIX_PLACES, rounding=ROUND_HALF_UP)


def cases() -> list[tuple[int | None, int | None]]:
    rng = random.Random(20261129)
    near = 10**15
    out: list[tuple[int | None, int | None]] = [
        # Large quotients, which round(n / d, 6) pre-rounds to ~16 significant digits.
        (near + 1, 3),
        (near + 2, 7),
        (2 * near + 1, 2_000_000_000_000_001),
        # Just below a tie
        (333_333_499_999_999, near),
        (333_333_500_000_000, near),  # an exact tie at 1e15
        (666_666_499_999_999_999, 10**18),
        # Ties: n * 1e6 / d ends in exactly .5
        (1, 2_000_000),
        (3, 2_000_000),
        (5, 8_000_000),
        (666_667 * 200_000_000, 400_000_000_000_000),  # 0.3333335 at d = 4e14
        (-1, 2_000_000),
        (1, -2_000_000),
        (-3, -2_000_000),
        # Extremes and the NULL rule
        (BIGINT_MAX, 3),
        (BIGINT_MAX, BIGINT_MAX - 1),
        (BIGINT_MAX - 1, BIGINT_MAX),
        (-BIGINT_MAX, 7),
        (1, BIGINT_MAX),
        (0, 5),
        (5, 0),
        (None, 5),
        (5, None),
        (None, None),
        (2, 3),
        (1, 7),
    ]
    for _ in range(300):
        d = rng.randint(near - 10**9, near)
        out.append((rng.randint(0, d), d))
    for _ in range(100):
        out.append((rng.randint(near, 2 * near), rng.randint(1, 10**9)))
    for _ in range(100):
        d = rng.randint(1, BIGINT_MAX)
        out.append((rng.randint(-BIGINT_MAX, BIGINT_MAX), d))
    return out


def compiled_expression(settings: Settings, numerator: str, denominator: str, env: dict[str, str]) -> str:
    """safe_ratio(numerator, denominator) rendered by dbt for env's target."""
    with tempfile.TemporaryDirectory(prefix="sqp-safe-ratio-") as tmp:
        res = invoke_dbt(
            settings.dbt_project_dir,
            ["compile", "--inline", f"{{{{ safe_ratio('{numerator}', '{denominator}') }}}}"],
            profiles_dir=profiles_dir(settings),
            target_path=Path(tmp),
            env=env,
        )
    assert res.success, res.exception
    code: str = res.result.results[0].node.compiled_code
    return code.strip()


def mismatches(
    got: dict[int, Any], cases_: list[tuple[int | None, int | None]], scale: bool = True
) -> list[Any]:
    """Cases whose value differs from the reference (or, with scale, lacks exactly 6 decimals)."""
    return [
        (n, d, reference(n, d), got[i])
        for i, (n, d) in enumerate(cases_)
        if got[i] != reference(n, d) or (scale and got[i] is not None and got[i].as_tuple().exponent != -6)
    ]


def test_reference_rounds_ties_away_from_zero() -> None:
    assert reference(1, 2_000_000) == Decimal("0.000001")
    assert reference(-1, 2_000_000) == Decimal("-0.000001")
    assert reference(333_333_499_999_999, 10**15) == Decimal("0.333333")
    assert reference(2, 3) == Decimal("0.666667") and reference(5, 0) is None


def test_safe_ratio_is_exact_in_postgres(settings: Settings, pg: psycopg.Connection) -> None:
    expr = compiled_expression(settings, "n", "d", dbt_env(settings))
    all_cases = cases()
    rows = pg.execute(
        f"select i, {expr} from unnest(%s::bigint[], %s::bigint[]) with ordinality as c(n, d, i)",
        ([n for n, _ in all_cases], [d for _, d in all_cases]),
    ).fetchall()
    got = {i - 1: value for i, value in rows}
    wrong = mismatches(got, all_cases)
    assert not wrong, f"{len(wrong)} of {len(all_cases)} differ (n, d, expected, got): {wrong[:5]}"


def test_old_round_of_quotient_is_off_at_1e15(pg: psycopg.Connection) -> None:
    """Why the macro does not use round(n / d, 6): the quotient is rounded before round()."""
    old = pg.execute(
        "select round(cast(%s::bigint as numeric) / nullif(%s::bigint, 0), 6)", (10**15 + 1, 3)
    ).fetchone()
    assert old is not None and old[0] == Decimal("333333333333333.666700")
    assert reference(10**15 + 1, 3) == Decimal("333333333333333.666667")


def test_safe_ratio_bigquery_variant_compiles(settings: Settings) -> None:
    """The BigQuery rendering computes in BIGNUMERIC with DIV (INT64 * 2e6 would overflow).

    Only rendered here: the emulator runs BigQuery SQL on DuckDB with NUMERIC as DECIMAL(18, 3)
    and loses the precedence of `a * div(x, y)`, so it cannot check the values;
    `make check-dbt` compiles every model for BigQuery against it.
    """
    env = dbt_env(settings) | {
        "DBT_TARGET": "bigquery_emulator",
        "DBT_BQ_API_ENDPOINT": str(settings.rest_endpoint),
        "DBT_BQ_PROJECT": settings.project,
    }
    expr = compiled_expression(settings, "n", "d", env)
    assert expr.startswith("cast(") and expr.endswith("as numeric)"), expr
    assert expr.count("as bignumeric)") == 5 and "div(abs(" in expr and "round(" not in expr, expr
