{#
    ASIN performance per SQP week: the ASIN's funnel over all its search queries
    (int_asin_weekly_funnel, incremental) with parent ASIN, title and brand from the current
    catalog. A view, so catalog changes show at once and a refresh never rewrites history.
#}
{{ config(materialized='view') }}

with

asin_weeks as (

    select * from {{ ref('int_asin_weekly_funnel') }}

),

products as (

    select * from {{ ref('stg_sqp__products') }}

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
        asin_weeks.ctr,
        asin_weeks.cart_add_rate,
        asin_weeks.cvr

    from asin_weeks
    left join products
        on asin_weeks.asin = products.asin

)

select * from final
