{#
    For singular tests: rows of a monthly/quarterly/yearly summary whose counts differ from
    the sum of the weekly_summary rows of the same period, query and ASIN (or that exist on
    one side only). Catches periods an incremental run failed to rebuild after a restatement.
    During an incremental refresh only the periods it rebuilt are compared (see
    macros/refresh_window_tests.sql).
#}
{% macro summary_rollup_mismatches(period, summary_relation) %}

{%- set compared_columns = [
    'impressions', 'clicks', 'cart_adds', 'purchases',
    'total_query_impressions', 'total_query_clicks', 'total_query_cart_adds',
    'total_query_purchases', 'active_weeks',
] -%}
{%- set window_condition = refresh_window_predicate({'grain': 'week', 'period': period}, 'period_start') if execute else none -%}
{%- set in_window -%}
    {%- if window_condition is not none %}
    where {{ window_condition }}
    {%- endif -%}
{%- endset -%}

with

weekly as (

    select
        cast({{ dbt.date_trunc(period, 'period_start') }} as date) as period_start,
        search_query_key,
        asin,
        {%- for column in compared_columns %}
        {{ column }}{{ "," if not loop.last }}
        {%- endfor %}
    from {{ ref('weekly_summary') }}{{ in_window }}

),

weeks_rolled_up as (

    select
        period_start,
        search_query_key,
        asin,
        {%- for column in compared_columns %}
        sum({{ column }}) as {{ column }}{{ "," if not loop.last }}
        {%- endfor %}
    from weekly
    group by
        period_start,
        search_query_key,
        asin

),

summary as (

    select * from {{ summary_relation }}{{ in_window }}

),

mismatches as (

    select
        coalesce(summary.period_start, weeks_rolled_up.period_start) as period_start,
        coalesce(summary.search_query_key, weeks_rolled_up.search_query_key) as search_query_key,
        coalesce(summary.asin, weeks_rolled_up.asin) as asin
    from summary
    full outer join weeks_rolled_up
        on
            summary.period_start = weeks_rolled_up.period_start
            and summary.search_query_key = weeks_rolled_up.search_query_key
            and summary.asin = weeks_rolled_up.asin
    where
        summary.asin is null
        or weeks_rolled_up.asin is null
        {%- for column in compared_columns %}
        or summary.{{ column }} is distinct from weeks_rolled_up.{{ column }}
        {%- endfor %}

)

select * from mismatches

{% endmacro %}
