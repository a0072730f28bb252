{#
    The vars (or their environment variables) that say what the current refresh changed:
    refresh_start_date, refresh_weeks, refresh_days, each validated before it is templated
    into SQL.
#}

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
    'YYYY-MM-DD' strings (flows.orchestration.runbook.dbt_build_args); an empty list means no week changed.
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
