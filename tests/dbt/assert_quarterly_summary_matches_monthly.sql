-- Every quarterly summary row equals the sum of its months in monthly_summary (with the
-- monthly check: the sum of its weeks).
{{ summary_rollup_mismatches('quarter', ref('quarterly_summary'), ref('monthly_summary')) }}
