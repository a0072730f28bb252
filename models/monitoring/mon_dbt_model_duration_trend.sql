{{ config(materialized='view', schema='monitoring', enabled=target.type == 'postgres') }}

-- Per dbt model and day: successful builds, their median and p95 time, and rows/s.
with builds as (
    select
        n.name as model_name,
        n.execution_time_s,
        n.rows_affected,
        date_trunc('day', i.started_at) as day
    from {{ source('refresh_control', 'dbt_node_runs') }} as n
    inner join {{ source('refresh_control', 'dbt_invocations') }} as i
        on n.invocation_id = i.invocation_id
    where n.resource_type = 'model' and n.status = 'success'
)

select
    model_name,
    day,
    count(*) as builds,
    percentile_cont(0.5) within group (order by execution_time_s) as p50_duration_s,
    percentile_cont(0.95) within group (order by execution_time_s) as p95_duration_s,
    sum(rows_affected) as rows_affected,
    round((sum(rows_affected) / nullif(sum(execution_time_s), 0))::numeric, 1) as rows_per_second
from builds
group by model_name, day
