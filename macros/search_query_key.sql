{#
    The key of a search query: the md5 of its UTF-8 text as 32 lowercase hex characters.
    Search queries are free text of any length (exports carry pasted kilobytes), and a btree
    index entry is capped at ~2.7 KB, so uniqueness, unique_key, indexes and joins use this
    fixed-size key while the full text stays in search_query. The same bytes hash to the same
    key on Postgres and BigQuery.
#}
{% macro search_query_key(column) -%}
    {{ return(adapter.dispatch('search_query_key', 'sqp_refresh')(column)) }}
{%- endmacro %}

{% macro default__search_query_key(column) -%}
    md5({{ column }})
{%- endmacro %}

{% macro bigquery__search_query_key(column) -%}
    to_hex(md5({{ column }}))
{%- endmacro %}
