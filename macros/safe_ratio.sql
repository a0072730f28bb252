{#
    numerator / denominator as NUMERIC with exactly 6 decimals, rounded half away from zero;
    NULL when either side is NULL or the denominator is 0. Callers pass the period's sums,
    never averages of ratios.

    Exact for any BIGINT (or NUMERIC) inputs: round(n / d, 6) would let the database pick the
    quotient's scale first, so at counts near 1e15 the quotient is already rounded and the
    6-decimal result can be one unit off. Instead the rounding is integer arithmetic:
        sign(n) * sign(d) * floor((|n| * 1e6 + |d| / 2) / |d|) / 1e6
      = sign(n) * sign(d) * div(|n| * 2000000 + |d|, 2 * |d|) / 1e6
    in a type wide enough for |n| * 2e6 (BIGINT would overflow).
#}
{% macro safe_ratio(numerator, denominator) -%}
    {{ return(adapter.dispatch('safe_ratio', 'sqp_refresh')(numerator, denominator)) }}
{%- endmacro %}

{#- Postgres NUMERIC: div() truncates exactly; * 0.000001 keeps the scale at 6 (n.nnnnnn). -#}
{% macro default__safe_ratio(numerator, denominator) -%}
    {%- set n = 'cast(' ~ numerator ~ ' as numeric)' -%}
    {%- set d = 'cast(nullif(' ~ denominator ~ ', 0) as numeric)' -%}
    (sign({{ n }}) * sign({{ d }}) * div(abs({{ n }}) * 2000000 + abs({{ d }}), 2 * abs({{ d }})) * 0.000001)
{%- endmacro %}

{#- BigQuery: BIGNUMERIC holds |n| * 2e6 for any INT64 or NUMERIC n; the 6-decimal result fits NUMERIC. -#}
{% macro bigquery__safe_ratio(numerator, denominator) -%}
    {%- set n = 'cast(' ~ numerator ~ ' as bignumeric)' -%}
    {%- set d = 'cast(nullif(' ~ denominator ~ ', 0) as bignumeric)' -%}
    cast(sign({{ n }}) * sign({{ d }}) * div(abs({{ n }}) * 2000000 + abs({{ d }}), 2 * abs({{ d }})) / 1000000 as numeric)
{%- endmacro %}
