{#
    Incremental models here replace whole periods: each run rebuilds every period (day, week,
    month, quarter, year) that contains a day the current refresh may have changed, and
    deletes all old rows of each rebuilt period before inserting its new ones, so rows that
    vanished from a restated period vanish from the model too. (A period left with no rows at
    all keeps its old rows until a --full-refresh.)

    A model declares how it is windowed once, in period_incremental_config; the window macros
    below and the test scoping (macros/refresh_window_tests.sql) read that declaration from
    the model's meta key `incremental_window`.
#}

{#
    Config for a model whose rows are replaced by period.
    period_column: the date column naming the period (week_start, period_start, search_date).
    key_columns: the model's grain, period_column first.
    grain: 'week' for models fed by weekly SQP rows, 'day' for daily rows.
    period: none, or 'month' / 'quarter' / 'year' when period_column starts such a period.
    Postgres: period_replace (macros/period_replace_strategy.sql) keyed on the period column,
    plus a unique index on the grain (leading period column, so the delete and the window
    filter use it too).
    BigQuery: insert_overwrite of day partitions on the period column, clustered by the rest
    of the grain.
#}
{% macro period_incremental_config(period_column, key_columns, grain='week', period=none) -%}
    {%- if key_columns[0] != period_column -%}
        {{ exceptions.raise_compiler_error(
            "period_incremental_config: key_columns must start with " ~ period_column
        ) }}
    {%- endif -%}
    {%- do check_window_grain(grain, period) -%}
    {%- set config = {
        'materialized': 'incremental',
        'on_schema_change': 'fail',
        'meta': {'incremental_window': {'column': period_column, 'grain': grain, 'period': period}},
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
        }) -%}
    {%- endif -%}
    {{ return(config) }}
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
    The first period start to rebuild for a first changed day `start` (a python date).
    With grain 'week' the start moves back 6 days, so that a week containing the day is rebuilt
    even when the day is not a week start; month/quarter/year windows may then take in one
    earlier period. With a period, the start widens to that period's start.
#}
{% macro widen_window_start(start, grain, period) -%}
    {%- do check_window_grain(grain, period) -%}
    {%- if grain == 'week' -%}
        {%- set start = start - modules.datetime.timedelta(days=6) -%}
    {%- endif -%}
    {%- if period == 'month' -%}
        {%- set start = start.replace(day=1) -%}
    {%- elif period == 'quarter' -%}
        {%- set start = start.replace(month=((start.month - 1) // 3) * 3 + 1, day=1) -%}
    {%- elif period == 'year' -%}
        {%- set start = start.replace(month=1, day=1) -%}
    {%- endif -%}
    {{ return(start) }}
{%- endmacro %}


{#
    The first period start the current refresh rebuilds for a model windowed by `window`
    (its meta incremental_window), from var refresh_start_date alone; none when it is unset.
#}
{% macro refresh_window_start(window) -%}
    {%- set requested = refresh_start_date() -%}
    {%- if requested is none -%}
        {{ return(none) }}
    {%- endif -%}
    {%- set start = modules.datetime.datetime.strptime(requested, '%Y-%m-%d').date() -%}
    {{ return(widen_window_start(start, window.get('grain', 'week'), window.get('period'))) }}
{%- endmacro %}


{#
    A python date as a SQL literal: a date, or the start of that day in UTC as a timestamp
    (to compare a timestamp column without wrapping the column in a function, so its index
    is used).
#}
{% macro window_literal(day, as_utc_timestamp=false) -%}
    {%- if as_utc_timestamp -%}
        {{ return(adapter.dispatch('utc_day_start', 'sqp_refresh')(day.isoformat())) }}
    {%- endif -%}
    {{ return("cast('" ~ day.isoformat() ~ "' as date)") }}
{%- endmacro %}

{% macro default__utc_day_start(iso_day) -%}
    cast('{{ iso_day }} 00:00:00+00' as timestamp)
{%- endmacro %}

{% macro postgres__utc_day_start(iso_day) -%}
    cast('{{ iso_day }} 00:00:00+00' as timestamp with time zone)
{%- endmacro %}


{#
    First period start to rebuild, as a SQL literal; use inside is_incremental() of a model
    configured with period_incremental_config (its grain and period come from there).
    watermark_column: the column of this model whose max() marks how far it is built.
    as_utc_timestamp: compare a timestamp column (the UTC start of the first day).
    The start is refresh_start_date when set, else var lookback_days before the watermark.
#}
{% macro incremental_window_start(watermark_column, as_utc_timestamp=false) -%}
    {%- set datetime = modules.datetime -%}
    {%- set everything = datetime.date(1, 1, 1) -%}
    {#- At parse time config.meta_get answers nothing; the SQL is not run then. -#}
    {%- if not execute -%}
        {{ return(window_literal(everything, as_utc_timestamp)) }}
    {%- endif -%}
    {%- set window = config.meta_get('incremental_window') -%}
    {%- if not window -%}
        {{ exceptions.raise_compiler_error(
            "incremental_window_start: configure " ~ this ~ " with period_incremental_config"
        ) }}
    {%- endif -%}

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
        {#- The newest week lies in the newest period: read it through the period column's
            index instead of scanning the whole table for max(watermark). -#}
        {%- set watermark_sql -%}
            select max({{ watermark_column }}) as watermark
            from {{ this }}
            {%- if watermark_column != window.column %}
            where {{ window.column }} = (select max({{ window.column }}) from {{ this }})
            {%- endif %}
        {%- endset -%}
        {%- set watermark = run_query(watermark_sql).columns[0].values()[0] -%}
        {%- if watermark is none -%}
            {{ log(this.identifier ~ ": target is empty, rebuilding everything", info=true) }}
            {{ return(window_literal(everything, as_utc_timestamp)) }}
        {%- endif -%}
        {%- set watermark = datetime.date(watermark.year, watermark.month, watermark.day) -%}
        {%- set start = watermark - datetime.timedelta(days=lookback_days | int) -%}
        {%- set reason = lookback_days ~ ' days before max(' ~ watermark_column ~ ') ' ~ watermark -%}
    {%- endif -%}

    {%- set start = widen_window_start(start, window.grain, window.period) -%}
    {{ log(this.identifier ~ ": incremental window starts at " ~ start ~ " (" ~ reason ~ ")", info=true) }}
    {{ return(window_literal(start, as_utc_timestamp)) }}
{%- endmacro %}
