-- Every monthly summary row equals the sum of its weeks in weekly_summary.
{{ summary_rollup_mismatches('month', ref('monthly_summary'), ref('weekly_summary')) }}
