{#
    Fails for every row where a funnel stage exceeds a stage before it, e.g.
    columns [impressions, clicks, cart_adds, purchases]. A NULL stage is "not reported": it is
    not compared, and the stages on either side of it are still compared with each other
    (every reported stage against every reported earlier stage).
#}
{% test funnel_non_increasing(model, columns) %}

{%- if columns | length < 2 -%}
    {{ exceptions.raise_compiler_error("funnel_non_increasing needs at least two columns") }}
{%- endif %}

select *
from {{ model }}
where
    {%- for later in columns[1:] %}
        {%- set later_index = loop.index %}
        {%- for earlier in columns[:later_index] %}
        {{ "or " if not (later_index == 1 and loop.first) }}{{ later }} > {{ earlier }}
        {%- endfor %}
    {%- endfor %}

{% endtest %}
