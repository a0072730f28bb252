{#
    Incremental models here replace whole periods: each run rebuilds every period (day, week,
    month, quarter, year) that contains a day the current refresh may have changed, and
    deletes all old rows of each rebuilt period before inserting its new ones, so rows that
    vanished from a restated period vanish from the model too. (A period left with no rows at
    all keeps its old rows until a --full-refresh.)
#}

{#
    Config for a model whose rows are replaced by period.
    period_column: the date column naming the period (week_start, period_start, search_date).
    key_columns: the model's grain, period_column first.
    Postgres: delete+insert keyed on the period column, plus a unique index on the grain
    (leading period column, so the delete and the window filter use it too).
    BigQuery: insert_overwrite of day partitions on the period column, clustered by the rest
    of the grain.
#}
{% macro period_incremental_config(period_column, key_columns) -%}
    {%- if key_columns[0] != period_column -%}
        {{ exceptions.raise_compiler_error(
            "period_incremental_config: key_columns must start with " ~ period_column
        ) }}
    {%- endif -%}
    {%- set config = {
        'materialized': 'incremental',
        'on_schema_change': 'fail',
    } -%}
    {%- if target.type == 'bigquery' -%}
        {%- do config.update({
            'incremental_strategy': 'insert_overwrite',
            'partition_by': {'field': period_column, 'data_type': 'date', 'granularity': 'day'},
            'cluster_by': key_columns[1:],
        }) -%}
    {%- else -%}
        {%- do config.update({
            'incremental_strategy': 'delete+insert',
            'unique_key': period_column,
            'indexes': [{'columns': key_columns, 'unique': true}],
        }) -%}
    {%- endif -%}
    {{ return(config) }}
{%- endmacro %}


{#
    The var refresh_start_date as a 'YYYY-MM-DD' string, or none when unset or empty.
    It is templated into SQL, so anything else stops the run.
#}
{% macro refresh_start_date() -%}
    {%- set value = var('refresh_start_date', none) -%}
    {%- if value is none or (value | string | trim) == '' -%}
        {{ return(none) }}
    {%- endif -%}
    {%- set value = value | string | trim -%}
    {%- set invalid_msg = "var refresh_start_date must be a date 'YYYY-MM-DD', got '" ~ value ~ "'" -%}
    {%- if not modules.re.match('^[0-9]{4}-[0-9]{2}-[0-9]{2}$', value) -%}
        {{ exceptions.raise_compiler_error(invalid_msg) }}
    {%- endif -%}
    {#- Reject impossible dates such as 2024-02-30 here, with the message above. -#}
    {%- set year, month, day = value.split('-') | map('int') | list -%}
    {%- if year < 1 or month < 1 or month > 12 or day < 1 -%}
        {{ exceptions.raise_compiler_error(invalid_msg) }}
    {%- endif -%}
    {%- set days_in_month = 31 if month == 12 else (
        modules.datetime.date(year, month + 1, 1) - modules.datetime.timedelta(days=1)
    ).day -%}
    {%- if day > days_in_month -%}
        {{ exceptions.raise_compiler_error(invalid_msg) }}
    {%- endif -%}
    {{ return(value) }}
{%- endmacro %}


{#
    First period start to rebuild, as a SQL date literal; use inside is_incremental().
    watermark_column: the column of this model whose max() marks how far it is built.
    grain: 'week' for models fed by weekly SQP rows, 'day' for daily rows. With 'week' the
    start moves back 6 days so that a week containing the start date is rebuilt even when the
    date is not a week start; month/quarter/year windows may then take in one earlier period.
    period: none, or 'month' / 'quarter' / 'year' to widen the start to its period's start.
    The start is refresh_start_date when set, else var lookback_days before the watermark.
#}
{% macro incremental_window_start(watermark_column, grain='week', period=none) -%}
    {%- if grain not in ['week', 'day'] -%}
        {{ exceptions.raise_compiler_error("incremental_window_start: grain must be 'week' or 'day'") }}
    {%- endif -%}
    {%- if period not in [none, 'week', 'month', 'quarter', 'year'] -%}
        {{ exceptions.raise_compiler_error(
            "incremental_window_start: period must be week, month, quarter or year"
        ) }}
    {%- endif -%}
    {%- if not execute -%}
        {{ return("cast('0001-01-01' as date)") }}
    {%- endif -%}

    {%- set datetime = modules.datetime -%}
    {%- set requested = refresh_start_date() -%}
    {%- if requested is not none -%}
        {%- set start = datetime.datetime.strptime(requested, '%Y-%m-%d').date() -%}
        {%- set reason = 'refresh_start_date ' ~ requested -%}
    {%- else -%}
        {%- set lookback_days = var('lookback_days', 60) | string | trim -%}
        {%- if not lookback_days.isdigit() -%}
            {{ exceptions.raise_compiler_error(
                "var lookback_days must be a whole number of days, got '" ~ lookback_days ~ "'"
            ) }}
        {%- endif -%}
        {%- set watermark_sql -%}
            select max({{ watermark_column }}) as watermark from {{ this }}
        {%- endset -%}
        {%- set watermark = run_query(watermark_sql).columns[0].values()[0] -%}
        {%- if watermark is none -%}
            {{ log(this.identifier ~ ": target is empty, rebuilding everything", info=true) }}
            {{ return("cast('0001-01-01' as date)") }}
        {%- endif -%}
        {%- set watermark = datetime.date(watermark.year, watermark.month, watermark.day) -%}
        {%- set start = watermark - datetime.timedelta(days=lookback_days | int) -%}
        {%- set reason = lookback_days ~ ' days before max(' ~ watermark_column ~ ') ' ~ watermark -%}
    {%- endif -%}

    {%- if grain == 'week' -%}
        {#- A week starting up to 6 days earlier still contains the start date. -#}
        {%- set start = start - datetime.timedelta(days=6) -%}
    {%- endif -%}
    {%- if period == 'month' -%}
        {%- set start = start.replace(day=1) -%}
    {%- elif period == 'quarter' -%}
        {%- set start = start.replace(month=((start.month - 1) // 3) * 3 + 1, day=1) -%}
    {%- elif period == 'year' -%}
        {%- set start = start.replace(month=1, day=1) -%}
    {%- endif -%}

    {{ log(this.identifier ~ ": incremental window starts at " ~ start ~ " (" ~ reason ~ ")", info=true) }}
    {{ return("cast('" ~ start.isoformat() ~ "' as date)") }}
{%- endmacro %}
