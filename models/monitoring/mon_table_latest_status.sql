{{ config(materialized='view', schema='monitoring', enabled=target.type == 'postgres') }}

-- Per registered table: its latest refresh and its latest success.
with latest as (
    select distinct on (table_name)
        table_name,
        status as last_status,
        started_at as last_started_at,
        error as last_error
    from {{ source('refresh_control', 'table_refreshes') }}
    order by table_name asc, started_at desc
),

latest_success as (
    select distinct on (table_name)
        table_name,
        finished_at as last_success_at,
        rows_inserted as last_success_rows
    from {{ source('refresh_control', 'table_refreshes') }}
    where status = 'success'
    order by table_name asc, finished_at desc
)

select
    c.table_name,
    c.refresh_frequency_hours,
    c.next_refresh_at,
    l.last_status,
    l.last_started_at,
    l.last_error,
    s.last_success_at,
    s.last_success_rows,
    case when c.enabled then c.mode else 'disabled' end as mode
from {{ source('refresh_control', 'refresh_config') }} as c
left join latest as l on c.table_name = l.table_name
left join latest_success as s on c.table_name = s.table_name
