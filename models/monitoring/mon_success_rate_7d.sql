{{ config(materialized='view', schema='monitoring', enabled=target.type == 'postgres') }}

-- Per table over the last 7 days: refreshes that ran (dry-run plans and skipped tables are
-- not refreshes), how many succeeded, and the rate.
select
    table_name,
    count(*) as refreshes,
    count(*) filter (where status = 'success') as succeeded,
    count(*) filter (where status = 'failed') as failed,
    round(count(*) filter (where status = 'success')::numeric / count(*), 4) as success_rate
from {{ source('refresh_control', 'table_refreshes') }}
where
    started_at >= now() - interval '7 days'
    and status in ('success', 'failed')
group by table_name
