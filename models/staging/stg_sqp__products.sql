with

source as (

    select * from {{ source('sqp', 'products') }}

),

renamed as (

    select

        ----------  ids
        asin,
        parent_asin,

        ---------- text
        title,
        brand,

        ---------- timestamps
        updated_at,

        ---------- lineage
        _loaded_at,
        _run_id

    from source

)

select * from renamed
