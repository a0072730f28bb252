"""`refresh docs`: dbt docs (lineage), generated and served."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from flows.cli.common import PG_HINT, fail, load_settings, out
from flows.core.settings import PROJECT_ROOT


def docs(
    port: Annotated[int, typer.Option()] = 8080,
    serve: Annotated[bool, typer.Option("--serve/--no-serve")] = True,
) -> None:
    """Generate dbt docs (lineage) and serve them locally."""
    settings = load_settings()
    from flows.engine.transform import dbt_env, profiles_dir, with_project_vars

    env = {**os.environ, **dbt_env(settings)}
    base = [sys.executable, "-m", "dbt.cli.main"]
    common = ["--project-dir", str(PROJECT_ROOT), "--profiles-dir", str(profiles_dir(settings))]
    # The catalog reads the raw tables from the schema this installation loads into.
    rc = subprocess.call([*base, *with_project_vars(settings, ["docs", "generate", *common])], env=env)
    if rc != 0:
        fail("dbt docs generate failed", PG_HINT)
    out.print(f"docs written to {Path(settings.dbt_project_dir) / 'target' / 'index.html'}")
    if serve:
        subprocess.call([*base, "docs", "serve", "--port", str(port), "--no-browser", *common], env=env)
