{#
    For singular tests: rows of a monthly/quarterly/yearly summary whose counts differ from
    the sum of the rows of the same period, query and ASIN in the summary it is built from,
    `finer_relation` (month: weekly_summary, quarter: monthly_summary, year:
    quarterly_summary), or that exist on one side only. Catches periods an incremental run
    built wrong. Over every period (a full refresh, `dbt test`) the three checks chain: each
    month equals its weeks, each quarter its months, each year its quarters, so every
    summary equals the sum of its weeks. During an incremental refresh only the periods it
    rebuilt are compared (see macros/refresh_window_tests.sql), each against the finer
    summary's rows of the same periods, so the check reads a period's worth of the next
    finer summary, not every week of a rebuilt year; that the finer periods a refresh
    rebuilt had their longer periods rebuilt with them is checked by
    summary_periods_not_rebuilt (tests/dbt/assert_summary_periods_rebuilt_with_their_weeks.sql).
#}
{% macro summary_rollup_mismatches(period, summary_relation, finer_relation) %}

{%- set compared_columns = summary_measures().summed -%}
{%- set window_condition = refresh_window_predicate({'grain': 'week', 'period': period}, 'period_start') if execute else none -%}
{%- set in_window -%}
    {%- if window_condition is not none %}
    where {{ window_condition }}
    {%- endif -%}
{%- endset -%}

with

finer as (

    select
        cast({{ dbt.date_trunc(period, 'period_start') }} as date) as period_start,
        search_query_key,
        asin,
        {%- for column in compared_columns %}
        {{ column }}{{ "," if not loop.last }}
        {%- endfor %}
    from {{ finer_relation }}{{ in_window }}

),

finer_rolled_up as (

    select
        period_start,
        search_query_key,
        asin,
        {%- for column in compared_columns %}
        sum({{ column }}) as {{ column }}{{ "," if not loop.last }}
        {%- endfor %}
    from finer
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
        coalesce(summary.period_start, finer_rolled_up.period_start) as period_start,
        coalesce(summary.search_query_key, finer_rolled_up.search_query_key) as search_query_key,
        coalesce(summary.asin, finer_rolled_up.asin) as asin
    from summary
    full outer join finer_rolled_up
        on
            summary.period_start = finer_rolled_up.period_start
            and summary.search_query_key = finer_rolled_up.search_query_key
            and summary.asin = finer_rolled_up.asin
    where
        summary.asin is null
        or finer_rolled_up.asin is null
        {%- for column in compared_columns %}
        or summary.{{ column }} is distinct from finer_rolled_up.{{ column }}
        {%- endfor %}

)

select * from mismatches

{% endmacro %}


{#
    For a singular test: the months, quarters and years that hold a week this dbt invocation
    rebuilt in weekly_summary but were not rebuilt by it too (a row of the period built by
    another invocation, or no row at all). The rollup checks compare each rebuilt period with
    the finer summary's rows of the same period; this is what makes sure no longer period was
    left out when its weeks changed, without reading every week of a rebuilt year.
    Outside a build that rebuilt weeks (`dbt test` alone: another invocation) it finds no
    rebuilt week and passes; the rollup checks over every period then cover the whole chain.
#}
{% macro summary_periods_not_rebuilt() %}

{%- set summaries = [
    ('month', ref('monthly_summary')),
    ('quarter', ref('quarterly_summary')),
    ('year', ref('yearly_summary')),
] -%}
{%- set week_window = refresh_window_predicate({'grain': 'week'}, 'period_start') if execute else none -%}

with

rebuilt_weeks as (

    select distinct period_start as week_start
    from {{ ref('weekly_summary') }}
    where
        _dbt_invocation_id = '{{ invocation_id }}'
        {%- if week_window is not none %}
        and {{ week_window }}
        {%- endif %}

),
{%- for period, relation in summaries %}

{{ period }}_expected as (

    select distinct cast({{ dbt.date_trunc(period, 'week_start') }} as date) as period_start
    from rebuilt_weeks

),

{{ period }}_built as (

    select
        period_start,
        sum(case when _dbt_invocation_id = '{{ invocation_id }}' then 0 else 1 end) as rows_of_other_builds
    from {{ relation }}
    where
        period_start in (select period_start from {{ period }}_expected)
        {#- the periods this refresh rebuilt, through the index: a superset of the expected #}
        {%- set period_window = refresh_window_predicate({'grain': 'week', 'period': period}, 'period_start') if execute else none %}
        {%- if period_window is not none %}
        and {{ period_window }}
        {%- endif %}
    group by period_start

),

{{ period }}_not_rebuilt as (

    select
        '{{ period }}' as period,
        {{ period }}_expected.period_start
    from {{ period }}_expected
    left join {{ period }}_built
        on {{ period }}_expected.period_start = {{ period }}_built.period_start
    where
        {{ period }}_built.period_start is null
        or {{ period }}_built.rows_of_other_builds > 0

),
{%- endfor %}

not_rebuilt as (

    {%- for period, _ in summaries %}
    select * from {{ period }}_not_rebuilt
    {%- if not loop.last %}
    union all
    {%- endif %}
    {%- endfor %}

)

select * from not_rebuilt

{% endmacro %}
