{#
    The calendar date, in UTC, of a timestamp with time zone. SQP weeks are identified by the
    UTC date of their start timestamp, whatever the session time zone is.
#}
{% macro to_utc_date(column) -%}
    {{ return(adapter.dispatch('to_utc_date', 'sqp_refresh')(column)) }}
{%- endmacro %}

{% macro default__to_utc_date(column) -%}
    cast({{ column }} as date)
{%- endmacro %}

{% macro postgres__to_utc_date(column) -%}
    cast({{ column }} at time zone 'UTC' as date)
{%- endmacro %}

{% macro bigquery__to_utc_date(column) -%}
    date({{ column }}, 'UTC')
{%- endmacro %}
