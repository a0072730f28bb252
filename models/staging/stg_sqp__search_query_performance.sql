with

source as (

    select * from {{ source('sqp', 'search_query_performance') }}

),

renamed as (

    select

        ----------  ids
        asin,
        parent_asin,
        child_asin,
        search_query,
        {{ search_query_key('search_query') }} as search_query_key,

        ---------- week
        date as week_start_at,
        {{ to_utc_date('date') }} as week_start,

        ---------- query metrics
        cast(search_query_score as bigint) as search_query_score,
        cast(search_query_volume as bigint) as search_query_volume,

        ---------- impression funnel stage
        cast(total_query_impression_count as bigint) as total_query_impression_count,
        cast(asin_impression_count as bigint) as asin_impression_count,
        cast(asin_impression_share as numeric) as asin_impression_share,

        ---------- click funnel stage
        cast(total_click_count as bigint) as total_click_count,
        cast(total_click_rate as numeric) as total_click_rate,
        cast(asin_click_count as bigint) as asin_click_count,
        cast(asin_click_share as numeric) as asin_click_share,
        cast(total_median_click_price_amount as numeric) as total_median_click_price_amount,
        cast(asin_median_click_price_amount as numeric) as asin_median_click_price_amount,
        cast(total_same_day_shipping_click_count as bigint) as total_same_day_shipping_click_count,
        cast(total_one_day_shipping_click_count as bigint) as total_one_day_shipping_click_count,
        cast(total_two_day_shipping_click_count as bigint) as total_two_day_shipping_click_count,

        ---------- cart add funnel stage
        cast(total_cart_add_count as bigint) as total_cart_add_count,
        cast(total_cart_add_rate as numeric) as total_cart_add_rate,
        cast(asin_cart_add_count as bigint) as asin_cart_add_count,
        cast(asin_cart_add_share as numeric) as asin_cart_add_share,
        cast(total_median_cart_add_price_amount as numeric) as total_median_cart_add_price_amount,
        cast(asin_median_cart_add_price_amount as numeric) as asin_median_cart_add_price_amount,
        cast(total_same_day_shipping_cart_add_count as bigint) as total_same_day_shipping_cart_add_count,
        cast(total_one_day_shipping_cart_add_count as bigint) as total_one_day_shipping_cart_add_count,
        cast(total_two_day_shipping_cart_add_count as bigint) as total_two_day_shipping_cart_add_count,

        ---------- purchase funnel stage
        cast(total_purchase_count as bigint) as total_purchase_count,
        cast(total_purchase_rate as numeric) as total_purchase_rate,
        cast(asin_purchase_count as bigint) as asin_purchase_count,
        cast(asin_purchase_share as numeric) as asin_purchase_share,
        cast(total_median_purchase_price_amount as numeric) as total_median_purchase_price_amount,
        cast(asin_median_purchase_price_amount as numeric) as asin_median_purchase_price_amount,
        cast(total_same_day_shipping_purchase_count as bigint) as total_same_day_shipping_purchase_count,
        cast(total_one_day_shipping_purchase_count as bigint) as total_one_day_shipping_purchase_count,
        cast(total_two_day_shipping_purchase_count as bigint) as total_two_day_shipping_purchase_count,

        ---------- lineage
        _loaded_at,
        _run_id,
        _slice_start

    from source

),

final as (

    select
        *,
        cast({{ dbt.dateadd('day', 6, 'week_start') }} as date) as week_end
    from renamed

)

select * from final
