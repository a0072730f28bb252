{#
    The measures of the period summaries (weekly/monthly/quarterly/yearly_summary), defined
    once: summarize_search_query_performance builds them, summary_rollup_mismatches compares
    them with the finer summary, and a test checks that every summary exposes exactly these
    (tests/integration/test_dbt_models.py). The definitions are SPEC.md's.
    - counts: (summary column, search_query_performance column it sums over the period's
      weeks), in column order: the ASIN funnel, then the query totals;
    - ratios: (summary column, numerator, denominator), from the period's sums (safe_ratio):
      the funnel rates, then the shares of the query totals;
    - summed: every column a longer period sums from the next finer summary: the counts and
      active_weeks (the weeks whose impressions are reported and > 0).
#}
{% macro summary_measures() -%}
    {%- set counts = [
        ('impressions', 'asin_impression_count'),
        ('clicks', 'asin_click_count'),
        ('cart_adds', 'asin_cart_add_count'),
        ('purchases', 'asin_purchase_count'),
        ('total_query_impressions', 'total_query_impression_count'),
        ('total_query_clicks', 'total_click_count'),
        ('total_query_cart_adds', 'total_cart_add_count'),
        ('total_query_purchases', 'total_purchase_count'),
    ] -%}
    {%- set ratios = [
        ('ctr', 'clicks', 'impressions'),
        ('cart_add_rate', 'cart_adds', 'clicks'),
        ('cvr', 'purchases', 'clicks'),
        ('impression_share', 'impressions', 'total_query_impressions'),
        ('click_share', 'clicks', 'total_query_clicks'),
        ('cart_add_share', 'cart_adds', 'total_query_cart_adds'),
        ('purchase_share', 'purchases', 'total_query_purchases'),
    ] -%}
    {{ return({
        'counts': counts,
        'ratios': ratios,
        'summed': counts | map(attribute=0) | list + ['active_weeks'],
    }) }}
{%- endmacro %}
