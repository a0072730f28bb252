{#
    The periods the current refresh rebuilds for a windowed model, from the refresh vars
    (macros/incremental/refresh_vars.sql), as python date ranges and as SQL conditions: the
    models' upstream read, the period_replace delete and the test scoping all use them.
#}

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
