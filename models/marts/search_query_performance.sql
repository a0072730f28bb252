{#
    One row per SQP week, ASIN and search query with every funnel metric. Incremental:
    each run replaces the weeks that contain a day on or after the refresh window start.
    The window filters the source timestamp (week_start_at), not the date derived from it,
    so the raw table's index on its cursor column serves it.
#}
{{ config(**period_incremental_config('week_start', ['week_start', 'asin', 'search_query_key'])) }}

with

sqp_weeks as (

    select * from {{ ref('stg_sqp__search_query_performance') }}
    {%- if is_incremental() %}
    where {{ incremental_window_filter('week_start_at', as_utc_timestamp=true) }}
    {%- endif %}

),

final as (

    select

        ---------- keys
        week_start,
        week_end,
        asin,
        search_query_key,
        search_query,

        ---------- ids
        parent_asin,
        child_asin,

        ---------- query metrics
        search_query_score,
        search_query_volume,

        ---------- impression funnel stage
        total_query_impression_count,
        asin_impression_count,
        asin_impression_share,

        ---------- click funnel stage
        total_click_count,
        total_click_rate,
        asin_click_count,
        asin_click_share,
        total_median_click_price_amount,
        asin_median_click_price_amount,
        total_same_day_shipping_click_count,
        total_one_day_shipping_click_count,
        total_two_day_shipping_click_count,

        ---------- cart add funnel stage
        total_cart_add_count,
        total_cart_add_rate,
        asin_cart_add_count,
        asin_cart_add_share,
        total_median_cart_add_price_amount,
        asin_median_cart_add_price_amount,
        total_same_day_shipping_cart_add_count,
        total_one_day_shipping_cart_add_count,
        total_two_day_shipping_cart_add_count,

        ---------- purchase funnel stage
        total_purchase_count,
        total_purchase_rate,
        asin_purchase_count,
        asin_purchase_share,
        total_median_purchase_price_amount,
        asin_median_purchase_price_amount,
        total_same_day_shipping_purchase_count,
        total_one_day_shipping_purchase_count,
        total_two_day_shipping_purchase_count,

        ---------- lineage
        _loaded_at,
        _run_id,
        cast('{{ invocation_id }}' as {{ dbt.type_string() }}) as _dbt_invocation_id

    from sqp_weeks

)

select * from final
