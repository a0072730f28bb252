{#
    Freshness against each table's own frequency: fresh, aging (> 1x), stale (> 2x), never.
    The same rule as flows/control/monitoring.py (the API computes it there).
#}
{{ config(materialized='view', schema='monitoring', enabled=target.type == 'postgres') }}

with

latest_status as (

    select * from {{ ref('mon_table_latest_status') }}

),

final as (

    select
        table_name,
        mode,
        refresh_frequency_hours,
        last_success_at,
        extract(epoch from now() - last_success_at) / 3600.0 as hours_since_success,
        case
            when last_success_at is null then 'never'
            when now() - last_success_at > 2 * refresh_frequency_hours * interval '1 hour' then 'stale'
            when now() - last_success_at > refresh_frequency_hours * interval '1 hour' then 'aging'
            else 'fresh'
        end as freshness
    from latest_status

)

select * from final
