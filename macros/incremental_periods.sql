{#
    Incremental models here replace whole periods: each run rebuilds every period (day, week,
    month, quarter, year) that contains a day the current refresh may have changed, and
    deletes all old rows of each rebuilt period before inserting its new ones, so rows that
    vanished from a restated period vanish from the model too, and a period left with no rows
    at all vanishes whole (the delete covers the run's window, not only the periods of its new
    rows: macros/period_replace_strategy.sql).

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
    watermark_column: the column of this model whose max() marks how far it is built (the
    lookback's anchor when no refresh var is set); period_column unless given.
    Postgres: period_replace (macros/period_replace_strategy.sql) keyed on the period column,
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
    {%- do parse_iso_date(value, "var refresh_start_date must be a date 'YYYY-MM-DD', got '" ~ value ~ "'") -%}
    {{ return(value) }}
{%- endmacro %}


{#
    `value` ('YYYY-MM-DD') as a python date; anything else, including impossible dates such
    as 2024-02-30, stops the run with `invalid_msg`.
#}
{% macro parse_iso_date(value, invalid_msg) -%}
    {%- if not modules.re.match('^[0-9]{4}-[0-9]{2}-[0-9]{2}$', value) -%}
        {{ exceptions.raise_compiler_error(invalid_msg) }}
    {%- endif -%}
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
    {{ return(modules.datetime.date(year, month, day)) }}
{%- endmacro %}


{#
    The var refresh_weeks: the ISO weeks (Monday starts) whose data this refresh changed, as a
    sorted list of python dates; none when unset. Given as a list or a JSON list of
    'YYYY-MM-DD' strings (flows.orchestration.dbt_selection.dbt_build_args); an empty list means no week changed.
    It is templated into SQL, so anything else stops the run, as does setting it together
    with refresh_start_date (one says "these weeks", the other "everything from this day").
    The flow passes it as the environment variable SQP_REFRESH_WEEKS instead (the same JSON),
    read only while executing: vars that change every run make dbt re-parse the whole
    project, an env var read at execution is no parse input (flows.engine.transform.vars_to_env).
#}
{% macro refresh_weeks() -%}
    {%- set weeks = date_list_var('refresh_weeks', 'SQP_REFRESH_WEEKS', mondays=true) -%}
    {%- if weeks is not none and refresh_start_date() is not none -%}
        {{ exceptions.raise_compiler_error(
            "vars refresh_weeks and refresh_start_date exclude each other: set one of them"
        ) }}
    {%- endif -%}
    {{ return(weeks) }}
{%- endmacro %}


{#
    The var refresh_days: the days whose data this refresh changed (the UTC days of the cursor
    values the applied slices deleted or inserted, flows.engine.load), as a sorted list of python
    dates; none when unset. Same forms, validation and environment variable rule as
    refresh_weeks (here SQP_REFRESH_DAYS); excludes refresh_weeks and refresh_start_date.
#}
{% macro refresh_days() -%}
    {%- set days = date_list_var('refresh_days', 'SQP_REFRESH_DAYS') -%}
    {%- if days is not none and refresh_start_date() is not none -%}
        {{ exceptions.raise_compiler_error(
            "vars refresh_days and refresh_start_date exclude each other: set one of them"
        ) }}
    {%- endif -%}
    {%- if days is not none and refresh_weeks() is not none -%}
        {{ exceptions.raise_compiler_error(
            "vars refresh_days and refresh_weeks exclude each other: set one of them"
        ) }}
    {%- endif -%}
    {{ return(days) }}
{%- endmacro %}


{#
    The list of dates in var `var_name`, else (only while executing, see refresh_weeks) in the
    environment variable `env_name`, as sorted python dates; none when unset. A list or a JSON
    list of 'YYYY-MM-DD' strings (`mondays`: Monday dates only); anything else stops the run.
#}
{% macro date_list_var(var_name, env_name, mondays=false) -%}
    {%- set value = var(var_name, none) -%}
    {%- if value is none and execute -%}
        {%- set value = env_var(env_name, '') -%}
    {%- endif -%}
    {%- if value is none or (value is string and value | trim == '') -%}
        {{ return(none) }}
    {%- endif -%}
    {%- set invalid_msg = "var " ~ var_name ~ " must be a list of " ~ ("Monday dates" if mondays else "dates")
        ~ " 'YYYY-MM-DD', got '" ~ value ~ "'" -%}
    {%- if value is string -%}
        {%- set value = fromjson(value) -%}
    {%- endif -%}
    {%- if value is string or value is mapping or value is not iterable -%}
        {{ exceptions.raise_compiler_error(invalid_msg) }}
    {%- endif -%}
    {%- set dates = [] -%}
    {%- for item in value -%}
        {%- set day = parse_iso_date(item | string | trim, invalid_msg) -%}
        {%- if mondays and day.weekday() != 0 -%}
            {{ exceptions.raise_compiler_error(invalid_msg) }}
        {%- endif -%}
        {%- do dates.append(day) -%}
    {%- endfor -%}
    {{ return(dates | unique | sort) }}
{%- endmacro %}


{#
    The first day of the `period` (month, quarter or year) after the one containing `day`.
#}
{% macro next_period_start(day, period) -%}
    {%- set months = {'month': 1, 'quarter': 3, 'year': 12}[period] -%}
    {%- set index = day.year * 12 + ((day.month - 1) // months) * months + months -%}
    {{ return(modules.datetime.date(index // 12, index % 12 + 1, 1)) }}
{%- endmacro %}


{#
    The periods the current refresh rebuilds for a model windowed by `window`, from var
    refresh_days (daily runs) or refresh_weeks (by hand): {ranges (refresh_day_ranges), source
    (the var)}; none when neither is set. The models and the tests both use it.
#}
{% macro refresh_ranges(window) -%}
    {%- set days = refresh_days() -%}
    {%- if days is not none -%}
        {%- set spans = [] -%}
        {%- for day in days -%}
            {%- do spans.append((day, day + modules.datetime.timedelta(days=1))) -%}
        {%- endfor -%}
        {{ return({'ranges': refresh_day_ranges(spans, window), 'source': 'refresh_days'}) }}
    {%- endif -%}
    {%- set weeks = refresh_weeks() -%}
    {%- if weeks is not none -%}
        {{ return({'ranges': refresh_week_ranges(weeks, window), 'source': 'refresh_weeks'}) }}
    {%- endif -%}
    {{ return(none) }}
{%- endmacro %}


{#
    refresh_day_ranges of the ISO weeks `weeks` ([w, w+7) each): a week across a month end
    rebuilds both months.
#}
{% macro refresh_week_ranges(weeks, window) -%}
    {%- set spans = [] -%}
    {%- for week in weeks -%}
        {%- do spans.append((week, week + modules.datetime.timedelta(days=7))) -%}
    {%- endfor -%}
    {{ return(refresh_day_ranges(spans, window)) }}
{%- endmacro %}


{#
    The half-open date ranges [start, end) a model windowed by `window` rebuilds for the
    changed half-open day ranges `spans` (sorted by start), merged where they touch. The spans
    themselves for weekly and daily data (a row's period column is its cursor day); with a
    period, every month, quarter or year overlapping a span. Same rule as flows/engine/periods.py.
#}
{% macro refresh_day_ranges(spans, window) -%}
    {%- do check_window_grain(window.get('grain', 'week'), window.get('period')) -%}
    {%- set period = window.get('period') -%}
    {%- set ranges = [] -%}
    {%- for span in spans -%}
        {%- set start = span[0] -%}
        {%- set end = span[1] -%}
        {%- if period in ['month', 'quarter', 'year'] -%}
            {%- set start = widen_window_start(start, 'day', period) -%}
            {%- set end = next_period_start(end - modules.datetime.timedelta(days=1), period) -%}
        {%- endif -%}
        {%- if ranges and start <= ranges[-1][1] -%}
            {%- set last = ranges.pop() -%}
            {%- do ranges.append((last[0], [last[1], end] | max)) -%}
        {%- else -%}
            {%- do ranges.append((start, end)) -%}
        {%- endif -%}
    {%- endfor -%}
    {{ return(ranges) }}
{%- endmacro %}


{#
    SQL condition: `column` lies in one of `ranges` (half-open python date ranges); false for
    none. as_utc_timestamp: `column` is a timestamp (compared with the UTC start of each day).
#}
{% macro ranges_condition(column, ranges, as_utc_timestamp=false) -%}
    {%- if not ranges -%}
        {{ return('1 = 0') }}
    {%- endif -%}
    {%- set parts = [] -%}
    {%- for start, end in ranges -%}
        {%- do parts.append(
            '(' ~ column ~ ' >= ' ~ window_literal(start, as_utc_timestamp)
            ~ ' and ' ~ column ~ ' < ' ~ window_literal(end, as_utc_timestamp) ~ ')'
        ) -%}
    {%- endfor -%}
    {{ return('(' ~ parts | join(' or ') ~ ')') }}
{%- endmacro %}


{#
    The rows an incremental run of the current model (configured with
    period_incremental_config) reads from upstream, as a SQL condition on `filter_column`
    (rebuilt_periods_condition); logs the periods it rebuilds.
#}
{% macro incremental_window_filter(filter_column, as_utc_timestamp=false) -%}
    {{ return(rebuilt_periods_condition(filter_column, as_utc_timestamp, log_periods=true)) }}
{%- endmacro %}


{#
    The periods an incremental run of the current model (configured with
    period_incremental_config) rebuilds, as a SQL condition on `column`: the model reads its
    upstream rows with it (incremental_window_filter) and period_replace deletes its old rows
    with it (on the period column), so a period that lost every upstream row is deleted too.
    - var refresh_days (the flow's daily run) or refresh_weeks set: the changed days or
      weeks, or the months, quarters or years containing them (refresh_ranges);
    - else `column >= incremental_window_start()`: refresh_start_date (a backfill or an
      explicit date range) or the lookback from the model's watermark.
#}
{% macro rebuilt_periods_condition(column, as_utc_timestamp=false, log_periods=false) -%}
    {%- set window = config.meta_get('incremental_window') if execute else none -%}
    {%- set refresh = refresh_ranges(window or {}) if execute else none -%}
    {%- if refresh is none -%}
        {{ return(column ~ ' >= ' ~ incremental_window_start(as_utc_timestamp, log_start=log_periods)) }}
    {%- endif -%}
    {%- if not window -%}
        {{ exceptions.raise_compiler_error(
            "incremental window: configure " ~ this ~ " with period_incremental_config"
        ) }}
    {%- endif -%}
    {%- set ranges = refresh.ranges -%}
    {%- if log_periods -%}
        {{ log(this.identifier ~ ": rebuilding periods " ~ (ranges | map('join', '..') | join(', ') or 'none')
            ~ " (" ~ refresh.source ~ ")", info=true) }}
    {%- endif -%}
    {{ return(ranges_condition(column, ranges, as_utc_timestamp)) }}
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
    configured with period_incremental_config (its grain, period and watermark column come
    from there). as_utc_timestamp: compare a timestamp column (the UTC start of the first day).
    The start is refresh_start_date when set, else var lookback_days before the watermark.
#}
{% macro incremental_window_start(as_utc_timestamp=false, log_start=true) -%}
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
    {%- set watermark_column = window.get('watermark') or window.column -%}

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
            {%- if log_start -%}
                {{ log(this.identifier ~ ": target is empty, rebuilding everything", info=true) }}
            {%- endif -%}
            {{ return(window_literal(everything, as_utc_timestamp)) }}
        {%- endif -%}
        {%- set watermark = datetime.date(watermark.year, watermark.month, watermark.day) -%}
        {%- set start = watermark - datetime.timedelta(days=lookback_days | int) -%}
        {%- set reason = lookback_days ~ ' days before max(' ~ watermark_column ~ ') ' ~ watermark -%}
    {%- endif -%}

    {%- set start = widen_window_start(start, window.grain, window.period) -%}
    {%- if log_start -%}
        {{ log(this.identifier ~ ": incremental window starts at " ~ start ~ " (" ~ reason ~ ")", info=true) }}
    {%- endif -%}
    {{ return(window_literal(start, as_utc_timestamp)) }}
{%- endmacro %}
