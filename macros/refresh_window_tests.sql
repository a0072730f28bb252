{#
    During an incremental refresh (var refresh_days, refresh_weeks or refresh_start_date set,
    as the flow does), the tests of a windowed model or source check only the periods that
    refresh rebuilt or reloaded: rows outside them were tested when they were built and have
    not changed since. So the cost of `dbt build` follows the change, not the history. Without
    any of these vars (a full refresh, a manual or CI run) every test checks every row.

    A model is windowed when its meta holds `incremental_window` (period_incremental_config
    sets it; views and sources declare it in YAML):
        {column: <date or timestamp column>, grain: week | day,
         period: month | quarter | year (optional), column_type: timestamp (optional)}

    dbt calls get_where_subquery for the model a generic test runs on; this override keeps
    dbt's own `where` config and adds the window condition.
#}
{% macro get_where_subquery(relation) -%}
    {%- set conditions = [] -%}
    {%- set where = config.get('where') -%}
    {%- if where -%}
        {%- do conditions.append('(' ~ where ~ ')') -%}
    {%- endif -%}
    {%- set window_condition = refresh_window_condition(relation) -%}
    {%- if window_condition -%}
        {%- do conditions.append(window_condition) -%}
    {%- endif -%}
    {%- if not conditions -%}
        {{ return(relation) }}
    {%- endif -%}
    {%- set filtered -%}
        (select * from {{ relation }} where {{ conditions | join(' and ') }}) dbt_subquery
    {%- endset -%}
    {{ return(filtered) }}
{%- endmacro %}


{#
    The window condition for the windowed node the current test reads `relation` from, or
    none (none of refresh_days, refresh_weeks, refresh_start_date set, or the node is not windowed).
#}
{% macro refresh_window_condition(relation) -%}
    {%- if not execute -%}
        {{ return(none) }}
    {%- endif -%}
    {%- for unique_id in model.depends_on.nodes -%}
        {%- set node = graph.nodes.get(unique_id) or graph.sources.get(unique_id) -%}
        {%- set identifier = node.get('alias') or node.get('identifier') if node else none -%}
        {%- if node
            and (node.schema | lower) == (relation.schema | lower)
            and (identifier | lower) == (relation.identifier | lower) -%}
            {%- set window = node_incremental_window(node) -%}
            {%- if window -%}
                {{ return(refresh_window_predicate(
                    window, window.column, window.get('column_type') == 'timestamp'
                )) }}
            {%- endif -%}
        {%- endif -%}
    {%- endfor -%}
    {{ return(none) }}
{%- endmacro %}


{#
    The periods the current refresh rebuilt for data windowed by `window`, as a condition on
    `column`: the ranges of refresh_days or refresh_weeks (refresh_ranges, as the models'
    incremental_window_filter), else `column >= <first rebuilt period>` from
    refresh_start_date; none when neither is set (every row is tested).
#}
{% macro refresh_window_predicate(window, column, as_utc_timestamp=false) -%}
    {%- set refresh = refresh_ranges(window) -%}
    {%- if refresh is not none -%}
        {{ return(ranges_condition(column, refresh.ranges, as_utc_timestamp)) }}
    {%- endif -%}
    {%- set start = refresh_window_start(window) -%}
    {%- if start is none -%}
        {{ return(none) }}
    {%- endif -%}
    {{ return(column ~ ' >= ' ~ window_literal(start, as_utc_timestamp)) }}
{%- endmacro %}


{% macro node_incremental_window(node) -%}
    {%- set config_meta = (node.get('config') or {}).get('meta') or {} -%}
    {%- set node_meta = node.get('meta') or {} -%}
    {{ return(config_meta.get('incremental_window') or node_meta.get('incremental_window')) }}
{%- endmacro %}
