"""What only serves the local demo: the embedded stack (Postgres + BigQuery emulator) and the
generated sample data. Product code does not import it at module level; the CLI's `demo`,
`generate` and `stack` commands (and `--with-stack`) import it when they run."""
