with

source as (

    select * from {{ source('sqp', 'daily_search_terms') }}

),

renamed as (

    select

        ----------  ids
        asin,
        search_query,
        {{ search_query_key('search_query') }} as search_query_key,

        ---------- day
        cast(date as date) as search_date,

        ---------- counts
        cast(impressions as bigint) as impressions,
        cast(clicks as bigint) as clicks,
        cast(purchases as bigint) as purchases,

        ---------- amounts
        cast(spend as numeric) as spend,
        cast(sales as numeric) as sales,

        ---------- lineage
        _loaded_at,
        _run_id,
        _slice_start

    from source

)

select * from renamed
