"""Run sqlfluff (dbt templater) against a throwaway embedded Postgres.

The dbt templater opens a database connection while compiling, so lint needs a Postgres: this
starts one on a free port in a temporary folder, points the profile at it, lints, and stops it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from flows.demo.local_stack import EmbeddedPostgres


def main() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    tmp = Path(tempfile.mkdtemp(prefix="sqp-lint-"))
    pg = EmbeddedPostgres(tmp / "pg", port)
    try:
        pg.start()
        env = {
            **os.environ,
            "DBT_PG_HOST": "127.0.0.1",
            "DBT_PG_PORT": str(port),
            "DBT_TARGET": "postgres",
            "PGPASSFILE": str(pg.passfile),
        }
        paths = sys.argv[1:] or ["models", "macros", "tests/dbt"]
        bin_dir = Path(sys.executable).parent
        return subprocess.call([str(bin_dir / "sqlfluff"), "lint", *paths], env=env)
    finally:
        pg.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
