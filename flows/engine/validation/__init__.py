"""Exact BigQuery-vs-Postgres validation: per-period row counts and order-independent checksums.

Both sides are fingerprinted the same way (flows.engine.normal_form, flows.engine.fingerprinting;
change detection uses them too). One module per check:
  source_match   a raw table against its BigQuery source, period by period (`validate-data`)
  bisection      the rows behind a period that differs
  after_refresh  the periods a live run committed, right after the run
  shadow_match   shadow dbt models against live ones
  summary_checks the dbt summaries against raw
docs/benchmarks.md ("Exact validation vs count(*)") has what each choice costs.
"""
