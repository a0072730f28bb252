{#
    For tests/dbt/generic/unique_combination_of_columns.sql: the relation (schema.name) of the
    model the current test is attached to, when the target is Postgres and the model's config
    declares a unique index on exactly `columns`; else none. `model` is the test node here.
#}
{% macro unique_index_relation(columns) -%}
    {%- if target.type != 'postgres' -%}
        {{ return(none) }}
    {%- endif -%}
    {%- set node = graph.nodes.get(model.get('attached_node') or '') -%}
    {%- if not node or node.get('resource_type') != 'model' -%}
        {{ return(none) }}
    {%- endif -%}
    {%- for index in node.config.get('indexes') or [] -%}
        {%- if index.get('unique') and (index.get('columns') | sort) == (columns | sort) -%}
            {{ return(api.Relation.create(schema=node.schema, identifier=node.alias)) }}
        {%- endif -%}
    {%- endfor -%}
    {{ return(none) }}
{%- endmacro %}
