"""Time the synthetic generator: N SQP rows (default 1,000,000) into a throwaway emulator.

.venv/bin/python bench/generate_sample.py [--rows 1000000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from flows.core.settings import Settings
from flows.demo.local_stack import BigQueryEmulator, free_port
from flows.demo.sample_data import SQP_TABLE, SampleSpec, generate
from flows.engine.bigquery import make_clients


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--weeks", type=int, default=52)
    ap.add_argument("--asins", type=int, default=200)
    args = ap.parse_args()
    rest, grpc_port = free_port(), free_port()
    tmp = Path(tempfile.mkdtemp(prefix="sqp-bench-gen-"))
    emu = BigQueryEmulator(rest_port=rest, grpc_port=grpc_port, data_dir=None, log_file=tmp / "emu.log")
    emu.start()
    try:
        settings = Settings(local_bq_rest_port=rest, local_bq_grpc_port=grpc_port, state_dir=tmp)
        clients = make_clients(settings)
        spec = SampleSpec(sqp_rows=args.rows, weeks=args.weeks, asins=args.asins, daily_rows=args.rows // 10)
        t0 = time.perf_counter()
        generate(clients, spec, force=True)
        elapsed = time.perf_counter() - t0
        path = f"`{clients.project}.{clients.dataset}.{SQP_TABLE}`"
        count = next(iter(clients.rest.query(f"select count(*) from {path}").result()))[0]
        print(f"generated sqp_rows={count} daily_rows={spec.daily_rows} asins={spec.asins} in {elapsed:.1f}s")
        print(f"sqp_rows_per_second={count / elapsed:,.0f}")
        clients.close()
    finally:
        emu.stop()


if __name__ == "__main__":
    main()
