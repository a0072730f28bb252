{#
    The config of weekly/monthly/quarterly/yearly_summary: replaced by period, one row per
    (period_start, search_query, asin), keyed on search_query_key (the full text can exceed
    what an index entry holds).
#}
{% macro summary_config(period) -%}
    {{ return(period_incremental_config('period_start', ['period_start', 'search_query_key', 'asin'], period=period)) }}
{%- endmacro %}


{#
    The body of weekly/monthly/quarterly/yearly_summary: search_query_performance rolled up
    to one row per (period_start, search_query, asin), with the metric definitions of
    SPEC.md: counts are sums of the weekly ASIN counts (and of the query totals), ratios come
    from the period's sums, active_weeks counts the weeks with impressions.
    A week belongs to the period of its week_start. Incremental runs read only the weeks of
    the periods being rebuilt, always whole periods, so every replaced period is complete.
#}
{% macro summarize_search_query_performance(period) %}

{%- if period not in ['week', 'month', 'quarter', 'year'] -%}
    {{ exceptions.raise_compiler_error(
        "summarize_search_query_performance: period must be week, month, quarter or year, got " ~ period
    ) }}
{%- endif -%}

{%- if period == 'week' -%}
    {%- set period_start = 'week_start' -%}
    {%- set period_end = 'week_end' -%}
{%- else -%}
    {%- set period_start = 'cast(' ~ dbt.date_trunc(period, 'week_start') ~ ' as date)' -%}
    {%- set period_end = dbt.last_day('week_start', period) -%}
{%- endif %}

with

sqp_weeks as (

    select * from {{ ref('search_query_performance') }}
    {%- if is_incremental() %}
    where {{ incremental_window_filter('week_start', 'last_week_start') }}
    {%- endif %}

),

weeks_in_periods as (

    select
        {{ period_start }} as period_start,
        {{ period_end }} as period_end,
        search_query_key,
        search_query,
        asin,
        week_start,
        asin_impression_count,
        asin_click_count,
        asin_cart_add_count,
        asin_purchase_count,
        total_query_impression_count,
        total_click_count,
        total_cart_add_count,
        total_purchase_count
    from sqp_weeks

),

period_sums as (

    select
        period_start,
        period_end,
        search_query_key,
        search_query,
        asin,
        sum(asin_impression_count) as impressions,
        sum(asin_click_count) as clicks,
        sum(asin_cart_add_count) as cart_adds,
        sum(asin_purchase_count) as purchases,
        sum(total_query_impression_count) as total_query_impressions,
        sum(total_click_count) as total_query_clicks,
        sum(total_cart_add_count) as total_query_cart_adds,
        sum(total_purchase_count) as total_query_purchases,
        count(distinct case when asin_impression_count > 0 then week_start end) as active_weeks,
        max(week_start) as last_week_start
    from weeks_in_periods
    group by
        period_start,
        period_end,
        search_query_key,
        search_query,
        asin

),

final as (

    select

        ---------- keys
        period_start,
        period_end,
        search_query_key,
        search_query,
        asin,

        ---------- ASIN funnel counts
        impressions,
        clicks,
        cart_adds,
        purchases,

        ---------- query totals
        total_query_impressions,
        total_query_clicks,
        total_query_cart_adds,
        total_query_purchases,

        ---------- rates
        {{ safe_ratio('clicks', 'impressions') }} as ctr,
        {{ safe_ratio('cart_adds', 'clicks') }} as cart_add_rate,
        {{ safe_ratio('purchases', 'clicks') }} as cvr,

        ---------- shares of the query totals
        {{ safe_ratio('impressions', 'total_query_impressions') }} as impression_share,
        {{ safe_ratio('clicks', 'total_query_clicks') }} as click_share,
        {{ safe_ratio('cart_adds', 'total_query_cart_adds') }} as cart_add_share,
        {{ safe_ratio('purchases', 'total_query_purchases') }} as purchase_share,

        ---------- weeks
        active_weeks,
        last_week_start,

        ---------- lineage
        cast('{{ invocation_id }}' as {{ dbt.type_string() }}) as _dbt_invocation_id

    from period_sums

)

select * from final

{% endmacro %}
