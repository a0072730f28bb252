-- Every yearly summary row equals the sum of its weeks in weekly_summary.
{{ summary_rollup_mismatches('year', ref('yearly_summary')) }}
