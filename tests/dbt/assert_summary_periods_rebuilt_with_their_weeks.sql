-- Every month, quarter and year holding a week this build rebuilt was rebuilt by it too.
{{ summary_periods_not_rebuilt() }}
