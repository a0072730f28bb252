{#
    numerator / denominator as NUMERIC rounded to 6 decimals; NULL when the denominator is 0
    or NULL. Callers pass the period's sums, never averages of ratios.
#}
{% macro safe_ratio(numerator, denominator) -%}
    round(cast({{ numerator }} as numeric) / nullif({{ denominator }}, 0), 6)
{%- endmacro %}
