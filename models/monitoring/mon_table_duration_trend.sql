{#
    Per table and day: successful refreshes, their median and p95 duration, and rows/s.
#}
{{ config(materialized='view', schema='monitoring', enabled=target.type == 'postgres') }}

with

table_refreshes as (

    select * from {{ source('refresh_control', 'table_refreshes') }}

),

successful_refreshes as (

    select
        table_name,
        rows_read,
        date_trunc('day', started_at) as day,
        extract(epoch from finished_at - started_at) as duration_s
    from table_refreshes
    where status = 'success'

),

final as (

    select
        table_name,
        day,
        count(*) as refreshes,
        percentile_cont(0.5) within group (order by duration_s) as p50_duration_s,
        percentile_cont(0.95) within group (order by duration_s) as p95_duration_s,
        sum(rows_read) as rows_read,
        round(sum(rows_read) / nullif(sum(duration_s), 0), 1) as rows_per_second
    from successful_refreshes
    group by table_name, day

)

select * from final
