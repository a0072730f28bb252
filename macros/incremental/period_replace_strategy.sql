{#
    Incremental strategy `period_replace` (Postgres), used by period_incremental_config:
    delete the target's rows of every period the run rebuilds, then insert the new rows.

    The periods deleted are the model's window (rebuilt_periods_condition on the period
    column: the same periods its upstream read covered) plus any period present in the new
    rows. The window, not only the new rows' periods: a period whose upstream rows all
    vanished (a week withdrawn at the source) has no new row, and must go too.

    dbt's delete+insert deletes `where <period> in (select distinct <period> from <new rows>)`.
    Postgres cannot estimate that subquery, plans a hash join and scans the whole target on
    every run, so the cost grows with the history. The window's date ranges and the new rows'
    periods as literals let the planner use the unique index (period column first) and touch
    only the rebuilt periods. arg_dict is dbt's: unique_key is the period column.
#}
{% macro get_incremental_period_replace_sql(arg_dict) %}

{%- set target = arg_dict['target_relation'] -%}
{%- set new_rows = arg_dict['temp_relation'] -%}
{%- set period_column = arg_dict['unique_key'] -%}
{%- set columns_csv = get_quoted_csv(arg_dict['dest_columns'] | map(attribute='name')) -%}
{%- set periods_sql -%}
    select distinct {{ period_column }} from {{ new_rows }} order by 1
{%- endset -%}
{%- set periods = run_query(periods_sql).columns[0].values() if execute else [] -%}

delete from {{ target }}
where {{ rebuilt_periods_condition(period_column) }}
{%- if periods | length > 0 %}
    or {{ period_column }} in (
    {%- for period in periods %}
        cast('{{ period }}' as date){{ "," if not loop.last }}
    {%- endfor %}
    )
{%- endif %};

insert into {{ target }} ({{ columns_csv }})
select {{ columns_csv }}
from {{ new_rows }}

{% endmacro %}
