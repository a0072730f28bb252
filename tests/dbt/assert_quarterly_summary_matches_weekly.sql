-- Every quarterly summary row equals the sum of its weeks in weekly_summary.
{{ summary_rollup_mismatches('quarter', ref('quarterly_summary')) }}
