{#
    Per table over the last 7 days: refreshes that ran (dry-run plans and skipped tables are
    not refreshes), how many succeeded, and the rate.
#}
{{ config(materialized='view', schema='monitoring', enabled=target.type == 'postgres') }}

with

table_refreshes as (

    select * from {{ source('refresh_control', 'table_refreshes') }}

),

refreshes_that_ran as (

    select
        table_name,
        status
    from table_refreshes
    where
        started_at >= now() - interval '7 days'
        and status in ('success', 'failed')

),

final as (

    select
        table_name,
        count(*) as refreshes,
        count(*) filter (where status = 'success') as succeeded,
        count(*) filter (where status = 'failed') as failed,
        round(count(*) filter (where status = 'success')::numeric / count(*), 4) as success_rate
    from refreshes_that_ran
    group by table_name

)

select * from final
