{#
    One row per day, ASIN and search query from the daily search-term table, with rates.
    Incremental: each run replaces the days on or after the refresh window start.
#}
{{ config(**period_incremental_config('search_date', ['search_date', 'asin', 'search_query_key'], grain='day')) }}

with

search_days as (

    select * from {{ ref('stg_sqp__daily_search_terms') }}
    {%- if is_incremental() %}
    where {{ incremental_window_filter('search_date') }}
    {%- endif %}

),

final as (

    select

        ---------- keys
        search_date,
        asin,
        search_query_key,
        search_query,

        ---------- counts
        impressions,
        clicks,
        purchases,

        ---------- amounts
        spend,
        sales,

        ---------- rates
        {{ safe_ratio('clicks', 'impressions') }} as ctr,
        {{ safe_ratio('purchases', 'clicks') }} as cvr,
        {{ safe_ratio('spend', 'sales') }} as acos,
        {{ safe_ratio('sales', 'spend') }} as roas,

        ---------- lineage
        _loaded_at,
        _run_id,
        cast('{{ invocation_id }}' as {{ dbt.type_string() }}) as _dbt_invocation_id

    from search_days

)

select * from final
