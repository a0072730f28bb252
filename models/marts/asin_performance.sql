{#
    Per SQP week and ASIN: the ASIN's funnel summed over its search queries, with catalog
    attributes. A table rebuilt each run (one row per ASIN and week, small next to
    search_query_performance), so titles always come from the current catalog.
#}
with

sqp_weeks as (

    select * from {{ ref('search_query_performance') }}

),

products as (

    select * from {{ ref('stg_sqp__products') }}

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
        asin_weeks.week_start as start_date,
        asin_weeks.week_end as end_date,
        asin_weeks.asin,

        ---------- catalog
        coalesce(products.parent_asin, asin_weeks.sqp_parent_asin) as parent_asin,
        products.title,
        products.brand,

        ---------- summed metrics
        asin_weeks.search_queries,
        asin_weeks.impressions,
        asin_weeks.clicks,
        asin_weeks.cart_adds,
        asin_weeks.purchases,

        ---------- rates from the sums
        {{ safe_ratio('asin_weeks.clicks', 'asin_weeks.impressions') }} as ctr,
        {{ safe_ratio('asin_weeks.cart_adds', 'asin_weeks.clicks') }} as cart_add_rate,
        {{ safe_ratio('asin_weeks.purchases', 'asin_weeks.clicks') }} as cvr

    from asin_weeks
    left join products
        on asin_weeks.asin = products.asin

)

select * from final
