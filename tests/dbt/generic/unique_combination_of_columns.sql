{#
    Fails for every combination of combination_of_columns that occurs more than once
    (dbt_utils.unique_combination_of_columns, which is not installed here).

    On Postgres, when the tested model declares a unique index on exactly these columns
    (period_incremental_config does), the index already makes a duplicate impossible: the test
    then checks that the index exists, is valid and still covers exactly these columns, instead
    of grouping every row (the costliest test of a first load at 10M rows). NULL keys, which
    a unique index lets repeat, are the not_null tests' concern.

    The macro takes the tested relation from kwargs rather than a `model` argument, so that
    `model` stays dbt's context variable: the test node, whose attached_node is the model.
#}
{% test unique_combination_of_columns(combination_of_columns) %}

{%- set relation = kwargs['model'] %}
{%- set columns_csv = combination_of_columns | join(', ') %}
{%- set indexed = unique_index_relation(combination_of_columns) if execute else none %}

{%- if indexed is not none %}

select '{{ indexed }} ({{ columns_csv }})' as missing_unique_index
where not exists (
    select 1
    from pg_catalog.pg_index as ix
    where
        ix.indrelid = to_regclass('{{ indexed }}')
        and ix.indisunique
        and ix.indisvalid
        and ix.indpred is null
        and ix.indexprs is null
        and ix.indnkeyatts = {{ combination_of_columns | length }}
        and (
            select array_agg(cast(att.attname as text) order by att.attname)
            from pg_catalog.pg_attribute as att
            where att.attrelid = ix.indrelid and att.attnum = any(ix.indkey)
        ) = array[{% for column in combination_of_columns | sort %}'{{ column }}'{{ ", " if not loop.last }}{% endfor %}]
)

{%- else %}

select
    {{ columns_csv }},
    count(*) as occurrences
from {{ relation }}
group by {{ columns_csv }}
having count(*) > 1

{%- endif %}

{% endtest %}

