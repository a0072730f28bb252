{#
    During an incremental refresh (var refresh_start_date set, as the flow does), the tests of
    a windowed model or source check only the periods that refresh rebuilt or reloaded: rows
    outside the window were tested when they were built and have not changed since. So the
    cost of `dbt build` follows the change, not the history. Without refresh_start_date (a
    full refresh, a manual or CI run) every test checks every row.

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
    `<column> >= <first rebuilt period>` for the windowed node the current test reads
    `relation` from, or none (no refresh_start_date, or the node is not windowed).
#}
{% macro refresh_window_condition(relation) -%}
    {%- if not execute or refresh_start_date() is none -%}
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
                {%- set start = refresh_window_start(window) -%}
                {%- set literal = window_literal(start, window.get('column_type') == 'timestamp') -%}
                {{ return(window.column ~ ' >= ' ~ literal) }}
            {%- endif -%}
        {%- endif -%}
    {%- endfor -%}
    {{ return(none) }}
{%- endmacro %}


{% macro node_incremental_window(node) -%}
    {%- set config_meta = (node.get('config') or {}).get('meta') or {} -%}
    {%- set node_meta = node.get('meta') or {} -%}
    {{ return(config_meta.get('incremental_window') or node_meta.get('incremental_window')) }}
{%- endmacro %}
