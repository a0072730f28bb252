{#
    Per SQP week and ASIN: the ASIN's funnel summed over its search queries, with the rates of
    those sums. Reads the staging view (the intermediate layer never reads a mart), windowed
    exactly like search_query_performance, so a refresh re-sums only the weeks it rebuilt;
    asin_performance adds the current catalog on read.
#}
{{ config(**period_incremental_config('week_start', ['week_start', 'asin'])) }}

with

sqp_weeks as (

    select * from {{ ref('stg_sqp__search_query_performance') }}
    {%- if is_incremental() %}
    where {{ incremental_window_filter('week_start_at', as_utc_timestamp=true) }}
    {%- endif %}

),

asin_weeks as (

    select
        week_start,
        week_end,
        asin,
        max(parent_asin) as sqp_parent_asin,
        count(*) as search_queries,
        sum(asin_impression_count) as impressions,
        sum(asin_click_count) as clicks,
        sum(asin_cart_add_count) as cart_adds,
        sum(asin_purchase_count) as purchases
    from sqp_weeks
    group by
        week_start,
        week_end,
        asin

),

final as (

    select

        ---------- keys
        week_start,
        week_end,
        asin,

        ---------- ids
        sqp_parent_asin,

        ---------- summed metrics
        search_queries,
        impressions,
        clicks,
        cart_adds,
        purchases,

        ---------- rates from the sums
        {{ safe_ratio('clicks', 'impressions') }} as ctr,
        {{ safe_ratio('cart_adds', 'clicks') }} as cart_add_rate,
        {{ safe_ratio('purchases', 'clicks') }} as cvr,

        ---------- lineage
        cast('{{ invocation_id }}' as {{ dbt.type_string() }}) as _dbt_invocation_id

    from asin_weeks

)

select * from final
