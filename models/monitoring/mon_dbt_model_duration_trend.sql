{#
    Per dbt model and day: successful builds, their median and p95 time, and rows/s.
#}
{{ config(materialized='view', schema='monitoring', enabled=target.type == 'postgres') }}

with

dbt_node_runs as (

    select * from {{ source('refresh_control', 'dbt_node_runs') }}

),

dbt_invocations as (

    select * from {{ source('refresh_control', 'dbt_invocations') }}

),

successful_builds as (

    select
        dbt_node_runs.name as model_name,
        dbt_node_runs.execution_time_s,
        dbt_node_runs.rows_affected,
        date_trunc('day', dbt_invocations.started_at) as day
    from dbt_node_runs
    inner join dbt_invocations
        on dbt_node_runs.invocation_id = dbt_invocations.invocation_id
    where dbt_node_runs.resource_type = 'model' and dbt_node_runs.status = 'success'

),

final as (

    select
        model_name,
        day,
        count(*) as builds,
        percentile_cont(0.5) within group (order by execution_time_s) as p50_duration_s,
        percentile_cont(0.95) within group (order by execution_time_s) as p95_duration_s,
        sum(rows_affected) as rows_affected,
        round((sum(rows_affected) / nullif(sum(execution_time_s), 0))::numeric, 1) as rows_per_second
    from successful_builds
    group by model_name, day

)

select * from final
