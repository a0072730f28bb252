{#
    Incremental models here replace whole periods: each run rebuilds every period (day, week,
    month, quarter, year) that contains a day the current refresh may have changed, and
    deletes all old rows of each rebuilt period before inserting its new ones, so rows that
    vanished from a restated period vanish from the model too, and a period left with no rows
    at all vanishes whole (the delete covers the run's window, not only the periods of its new
    rows: macros/incremental/period_replace_strategy.sql).

    A model declares how it is windowed once, in period_incremental_config (this file); the
    window macros (macros/incremental/rebuilt_periods.sql, upstream_window.sql) and the test
    scoping (macros/refresh_window_tests.sql) read that declaration from the model's meta key
    `incremental_window`. What the current refresh changed comes from the vars read in
    macros/incremental/refresh_vars.sql.
#}

{#
    Config for a model whose rows are replaced by period.
    period_column: the date column naming the period (week_start, period_start, search_date).
    key_columns: the model's grain, period_column first.
    grain: 'week' for models fed by weekly SQP rows, 'day' for daily rows.
    period: none, or 'month' / 'quarter' / 'year' when period_column starts such a period.
    watermark_column: the column of this model whose max() marks how far it is built (the
    lookback's anchor when no refresh var is set); period_column unless given.
    Postgres: period_replace (macros/incremental/period_replace_strategy.sql) keyed on the period column,
    plus a unique index on the grain (leading period column, so the delete and the window
    filter use it too); the build's transaction gets more sort and index memory
    (model_session_settings) and ends with ANALYZE, so the tests and the models read from it
    are planned on its real size (a table fresh from CREATE TABLE AS has no statistics).
    BigQuery: insert_overwrite of day partitions on the period column, clustered by the rest
    of the grain.
#}
{% macro period_incremental_config(period_column, key_columns, grain='week', period=none, watermark_column=none) -%}
    {%- if key_columns[0] != period_column -%}
        {{ exceptions.raise_compiler_error(
            "period_incremental_config: key_columns must start with " ~ period_column
        ) }}
    {%- endif -%}
    {%- do check_window_grain(grain, period) -%}
    {%- set config = {
        'materialized': 'incremental',
        'on_schema_change': 'fail',
        'meta': {'incremental_window': {
            'column': period_column, 'grain': grain, 'period': period,
            'watermark': watermark_column or period_column,
        }},
    } -%}
    {%- if target.type == 'bigquery' -%}
        {%- do config.update({
            'incremental_strategy': 'insert_overwrite',
            'partition_by': {'field': period_column, 'data_type': 'date', 'granularity': 'day'},
            'cluster_by': key_columns[1:],
        }) -%}
    {%- else -%}
        {%- do config.update({
            'incremental_strategy': 'period_replace',
            'unique_key': period_column,
            'indexes': [{'columns': key_columns, 'unique': true}],
            'pre_hook': [model_session_settings()],
            'post_hook': ['analyze {{ this }}'],
        }) -%}
    {%- endif -%}
    {{ return(config) }}
{%- endmacro %}


{#
    SET LOCAL statements for an incremental model's build transaction (Postgres): memory for
    its sorts and hashes (work_mem, var dbt_work_mem) and for building its unique index
    (maintenance_work_mem, var dbt_maintenance_work_mem). The defaults (4MB, 64MB) make a
    first load of millions of rows sort on disk. Only this transaction gets them, so they
    bound what one dbt thread adds to Postgres' memory.
#}
{% macro model_session_settings() -%}
    {%- set statements = [] -%}
    {%- for setting, var_name, default in [
        ('work_mem', 'dbt_work_mem', '64MB'),
        ('maintenance_work_mem', 'dbt_maintenance_work_mem', '256MB'),
    ] -%}
        {%- set value = var(var_name, default) | string | trim -%}
        {%- if not modules.re.match('^[0-9]{1,7}(kB|MB|GB)$', value) -%}
            {{ exceptions.raise_compiler_error(
                "var " ~ var_name ~ " must be a size such as '64MB' (kB, MB or GB), got '" ~ value ~ "'"
            ) }}
        {%- endif -%}
        {%- do statements.append("set local " ~ setting ~ " = '" ~ value ~ "'") -%}
    {%- endfor -%}
    {{ return(statements | join('; ')) }}
{%- endmacro %}


{% macro check_window_grain(grain, period) -%}
    {%- if grain not in ['week', 'day'] -%}
        {{ exceptions.raise_compiler_error("incremental window: grain must be 'week' or 'day', got " ~ grain) }}
    {%- endif -%}
    {%- if period not in [none, 'week', 'month', 'quarter', 'year'] -%}
        {{ exceptions.raise_compiler_error(
            "incremental window: period must be week, month, quarter or year, got " ~ period
        ) }}
    {%- endif -%}
{%- endmacro %}
