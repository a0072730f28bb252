{#
    Per SQP week, ASIN and search query: the ASIN's funnel counts and the rates derived from
    them. Incremental like search_query_performance, which it reads. A summary, so its file
    lives with the summaries; built in the marts schema (marts.search_performance_summary),
    where the API exposure, the benches and analysts read it.
#}
{{ config(
    schema='marts',
    **period_incremental_config('week_start', ['week_start', 'asin', 'search_query_key'])
) }}

with

sqp_weeks as (

    select * from {{ ref('search_query_performance') }}
    {%- if is_incremental() %}
    where {{ incremental_window_filter('week_start') }}
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

        ---------- funnel counts
        search_query_volume,
        asin_impression_count as impressions,
        asin_click_count as clicks,
        asin_cart_add_count as cart_adds,
        asin_purchase_count as purchases,

        ---------- derived rates
        {{ safe_ratio('asin_click_count', 'asin_impression_count') }} as asin_click_rate,
        {{ safe_ratio('asin_cart_add_count', 'asin_click_count') }} as cart_add_rate,
        {{ safe_ratio('asin_purchase_count', 'asin_click_count') }} as purchase_conversion,

        ---------- lineage
        cast('{{ invocation_id }}' as {{ dbt.type_string() }}) as _dbt_invocation_id

    from sqp_weeks

)

select * from final
