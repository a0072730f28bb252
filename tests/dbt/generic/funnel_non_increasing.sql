{#
    Fails for every row where a funnel stage exceeds the stage before it, e.g.
    columns [impressions, clicks, cart_adds, purchases]. NULL stages are not compared.
#}
{% test funnel_non_increasing(model, columns) %}

{%- if columns | length < 2 -%}
    {{ exceptions.raise_compiler_error("funnel_non_increasing needs at least two columns") }}
{%- endif %}

select *
from {{ model }}
where
    {%- for column in columns[1:] %}
        {{ "or " if not loop.first }}{{ column }} > {{ columns[loop.index0] }}
    {%- endfor %}

{% endtest %}
