{#
    Per registered table: its latest refresh and its latest success.
#}
{{ config(materialized='view', schema='monitoring', enabled=target.type == 'postgres') }}

with

refresh_config as (

    select * from {{ source('refresh_control', 'refresh_config') }}

),

-- read twice below: not materialized, so each read keeps the table's indexes
table_refreshes as not materialized (

    select * from {{ source('refresh_control', 'table_refreshes') }}

),

latest as (

    select distinct on (table_name)
        table_name,
        status as last_status,
        started_at as last_started_at,
        error as last_error
    from table_refreshes
    order by table_name asc, started_at desc

),

latest_success as (

    select distinct on (table_name)
        table_name,
        finished_at as last_success_at,
        rows_inserted as last_success_rows
    from table_refreshes
    where status = 'success'
    order by table_name asc, finished_at desc

),

final as (

    select
        refresh_config.table_name,
        refresh_config.refresh_frequency_hours,
        refresh_config.next_refresh_at,
        latest.last_status,
        latest.last_started_at,
        latest.last_error,
        latest_success.last_success_at,
        latest_success.last_success_rows,
        case when refresh_config.enabled then refresh_config.mode else 'disabled' end as mode
    from refresh_config
    left join latest on refresh_config.table_name = latest.table_name
    left join latest_success on refresh_config.table_name = latest_success.table_name

)

select * from final
