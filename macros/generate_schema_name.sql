{#
    Models land in exactly the schema configured for their folder (staging, marts, summaries)
    instead of dbt's default <target_schema>_<custom_schema>. Nodes without a custom schema
    (seeds, test failures) use the target's schema. The shadow build (flows.engine.transform) sets
    var schema_suffix '_shadow': staging_shadow, marts_shadow, summaries_shadow ...
#}
{% macro generate_schema_name(custom_schema_name, node) -%}
    {%- if custom_schema_name is none -%}
        {{ target.schema | trim }}
    {%- else -%}
        {{ custom_schema_name | trim }}{{ var('schema_suffix', '') | trim }}
    {%- endif -%}
{%- endmacro %}
