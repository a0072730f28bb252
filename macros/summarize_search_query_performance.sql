{#
    The config of weekly/monthly/quarterly/yearly_summary: replaced by period, one row per
    (period_start, search_query, asin), keyed on search_query_key (the full text can exceed
    what an index entry holds).
#}
{% macro summary_config(period) -%}
    {{ return(period_incremental_config(
        'period_start', ['period_start', 'search_query_key', 'asin'], period=period, watermark_column='last_week_start'
    )) }}
{%- endmacro %}


{#
    The body of weekly/monthly/quarterly/yearly_summary: search_query_performance rolled up
    to one row per (period_start, search_query, asin), with the measures of summary_measures
    (macros/summary_measures.sql): counts are sums of the weekly ASIN counts (and of the query
    totals), ratios come from the period's sums, active_weeks counts the weeks with impressions.
    A week belongs to the period of its week_start. Incremental runs read only the weeks of
    the periods being rebuilt, always whole periods, so every replaced period is complete.

    weekly_summary projects search_query_performance row by row: its unique index on (week_start,
    asin, search_query_key) makes every (week, query, ASIN) group one row, so the week's sum
    of a count is the count itself (typed as sum() types it) and active_weeks is 0 or 1. Each
    longer period sums the next finer summary (month: weekly, quarter: monthly, year:
    quarterly), whose periods nest in it: a sum of sums over the nested periods equals the sum
    over the weeks, and active_weeks add up to the distinct active weeks (each week lies in one
    nested period, once per query and ASIN by the unique indexes). This reads the wide weekly
    table once instead of four times, each rollup reads fewer rows than the one before, and no
    count(distinct) forces a sort (docs/dbt.md, "Cost at scale").
#}
{% macro summarize_search_query_performance(period) %}

{%- if period not in ['week', 'month', 'quarter', 'year'] -%}
    {{ exceptions.raise_compiler_error(
        "summarize_search_query_performance: period must be week, month, quarter or year, got " ~ period
    ) }}
{%- endif -%}

{#- Each longer period sums the next finer summary: months nest in quarters, quarters in years. -#}
{%- set finer_summary = {'month': 'weekly_summary', 'quarter': 'monthly_summary', 'year': 'quarterly_summary'} -%}
{%- set measures = summary_measures() -%}

with

{% if period == 'week' -%}

period_sums as (

    select
        week_start as period_start,
        week_end as period_end,
        search_query_key,
        search_query,
        asin,
        {%- for summed, weekly in measures.counts %}
        {{ sum_of_one(weekly) }} as {{ summed }},
        {%- endfor %}
        cast(case when asin_impression_count > 0 then 1 else 0 end as {{ dbt.type_bigint() }}) as active_weeks,
        week_start as last_week_start
    from {{ ref('search_query_performance') }}
    {%- if is_incremental() %}
    where {{ incremental_window_filter('week_start') }}
    {%- endif %}

),

{%- else -%}

finer_periods as (

    select
        period_start as finer_period_start,
        search_query_key,
        search_query,
        asin,
        {%- for summed in measures.summed %}
        {{ summed }},
        {%- endfor %}
        last_week_start
    from {{ ref(finer_summary[period]) }}
    {%- if is_incremental() %}
    where {{ incremental_window_filter('period_start') }}
    {%- endif %}

),

finer_in_periods as (

    select
        cast({{ dbt.date_trunc(period, 'finer_period_start') }} as date) as period_start,
        {{ dbt.last_day('finer_period_start', period) }} as period_end,
        finer_periods.*
    from finer_periods

),

period_sums as (

    select
        period_start,
        period_end,
        search_query_key,
        search_query,
        asin,
        {%- for summed, _ in measures.counts %}
        sum({{ summed }}) as {{ summed }},
        {%- endfor %}
        cast(sum(active_weeks) as {{ dbt.type_bigint() }}) as active_weeks,
        max(last_week_start) as last_week_start
    from finer_in_periods
    group by
        period_start,
        period_end,
        search_query_key,
        search_query,
        asin

),

{%- endif %}

final as (

    select

        ---------- keys
        period_start,
        period_end,
        search_query_key,
        search_query,
        asin,

        ---------- counts: the ASIN funnel, then the query totals (summary_measures)
        {%- for summed, _ in measures.counts %}
        {{ summed }},
        {%- endfor %}

        ---------- rates, then the shares of the query totals, from the sums
        {%- for name, numerator, denominator in measures.ratios %}
        {{ safe_ratio(numerator, denominator) }} as {{ name }},
        {%- endfor %}

        ---------- weeks
        active_weeks,
        last_week_start,

        ---------- lineage
        cast('{{ invocation_id }}' as {{ dbt.type_string() }}) as _dbt_invocation_id

    from period_sums

)

select * from final

{% endmacro %}


{#
    sum() of a single value of a BIGINT column, typed as sum() types it: NUMERIC on Postgres,
    the column's own INT64 on BigQuery.
#}
{% macro sum_of_one(column) -%}
    {{ return(adapter.dispatch('sum_of_one', 'sqp_refresh')(column)) }}
{%- endmacro %}

{% macro default__sum_of_one(column) -%}
    {{ column }}
{%- endmacro %}

{% macro postgres__sum_of_one(column) -%}
    cast({{ column }} as numeric)
{%- endmacro %}
