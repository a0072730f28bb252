"""Emulator memory after interrupted reads: RSS of a throwaway emulator before and after N
Storage read sessions that are each abandoned after their first batch (a killed run).

.venv/bin/python bench/emulator_memory.py [--rows 60000] [--reads 15]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from flows.core.settings import Settings
from flows.demo.local_stack import BigQueryEmulator, free_port
from flows.demo.sample_data import SQP_TABLE, SampleSpec, generate
from flows.engine.bigquery import make_clients
from flows.engine.extract import ReadStats, read_storage


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=60_000)
    ap.add_argument("--reads", type=int, default=15)
    args = ap.parse_args()
    rest, grpc_port = free_port(), free_port()
    tmp = Path(tempfile.mkdtemp(prefix="sqp-bench-mem-"))
    emu = BigQueryEmulator(rest_port=rest, grpc_port=grpc_port, data_dir=None, log_file=tmp / "emu.log")
    emu.start()
    assert emu.process is not None
    try:
        settings = Settings(local_bq_rest_port=rest, local_bq_grpc_port=grpc_port, state_dir=tmp)
        clients = make_clients(settings)
        try:
            generate(clients, SampleSpec(sqp_rows=args.rows, weeks=4, asins=50, daily_rows=100))
            print(f"after generating {args.rows} rows: {rss_mb(emu.process.pid):.0f} MB")
            for i in range(1, args.reads + 1):
                batches = read_storage(clients, SQP_TABLE, "TRUE", ReadStats())
                next(batches)
                batches.close()  # the run dies here: the session is never read to its end
                if i % 5 == 0:
                    print(f"after {i} interrupted reads: {rss_mb(emu.process.pid):.0f} MB")
        finally:
            clients.close()
    finally:
        emu.stop()


if __name__ == "__main__":
    main()
