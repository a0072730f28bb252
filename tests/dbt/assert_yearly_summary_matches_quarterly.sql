-- Every yearly summary row equals the sum of its quarters in quarterly_summary (with the
-- quarterly and monthly checks: the sum of its weeks).
{{ summary_rollup_mismatches('year', ref('yearly_summary'), ref('quarterly_summary')) }}
