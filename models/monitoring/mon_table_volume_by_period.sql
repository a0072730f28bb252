{#
    Rows per loaded period (slice) of each table, against the average of the periods before it.
    A period whose rows drop by more than var('volume_drop_threshold') of that average is
    flagged: a week of source data that came in short.
#}
{{ config(materialized='view', schema='monitoring', enabled=target.type == 'postgres') }}

with

checkpoints as (

    select * from {{ source('refresh_control', 'checkpoints') }}

),

periods as (

    select
        table_name,
        -- a whole-table (full_replace) load is stored as -infinity..infinity: no period
        case when isfinite(slice_start) then slice_start end as period_start,
        case when isfinite(slice_start) then slice_end end as period_end,
        rows_loaded,
        avg(rows_loaded) over (
            partition by table_name order by slice_start
            rows between {{ var('volume_baseline_periods', 4) }} preceding and 1 preceding
        ) as previous_avg_rows
    from checkpoints

),

final as (

    select
        table_name,
        period_start,
        period_end,
        rows_loaded,
        previous_avg_rows,
        case
            when previous_avg_rows > 0 then round(rows_loaded / previous_avg_rows - 1, 4)
        end as change_vs_previous,
        coalesce(
            previous_avg_rows > 0
            and rows_loaded < (1 - {{ var('volume_drop_threshold', 0.5) }}) * previous_avg_rows,
            false
        ) as volume_drop
    from periods

)

select * from final
