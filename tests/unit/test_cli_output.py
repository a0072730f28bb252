"""The CLI's dbt progress, read from dbt's log lines as dbt 1.11 writes them (colours included)."""

from __future__ import annotations

from pathlib import Path
from uuid import uuid4

import pytest

from flows.orchestration.dbt_progress import DbtLogProgress, DbtLogTail

ESC = "\x1b"
LOG = [
    f"{ESC}[0m04:39:50.653538 [info ] [MainThread]: Running with dbt=1.11.16",
    f"{ESC}[0m04:39:53.485297 [info ] [Thread-11 ]: 1 of 5 START test source_not_null_sqp_products_asin "
    "................ [RUN]",
    f"{ESC}[0m04:39:53.500096 [info ] [Thread-12 ]: 2 of 5 START sql view model staging.stg_sqp__products "
    "................ [RUN]",
    f"{ESC}[0m04:39:53.571880 [info ] [Thread-11 ]: 1 of 5 PASS source_not_null_sqp_products_asin "
    f".............. [{ESC}[32mPASS{ESC}[0m in 0.06s]",
    f"{ESC}[0m04:39:53.572536 [info ] [Thread-11 ]: 3 of 5 START sql incremental model marts.asin_weekly "
    "..... [RUN]",
    f"{ESC}[0m04:39:54.079614 [debug] [Thread-12 ]: SQL status: CREATE VIEW in 0.012 seconds",
]


def test_dbt_log_lines_give_nodes_done_of_total_and_the_nodes_running() -> None:
    progress = DbtLogProgress()
    progress.feed(LOG)
    assert (len(progress.done), progress.total) == (1, 5)
    assert progress.describe() == "1/5 nodes, running stg_sqp__products, asin_weekly"
    progress.feed(
        [
            f"{ESC}[0m04:39:55.0 [info ] [Thread-12 ]: 2 of 5 OK created sql view model "
            f"staging.stg_sqp__products .. [{ESC}[32mCREATE VIEW{ESC}[0m in 0.26s]",
            "04:39:56.0 [error] [Thread-11 ]: 3 of 5 ERROR creating sql incremental model marts.asin_weekly "
            "..... [ERROR in 0.3s]",
            "04:39:56.1 [info ] [Thread-11 ]: 4 of 5 SKIP relation marts.asin_performance ..... [SKIP]",
            "04:39:56.2 [info ] [Thread-12 ]: 5 of 5 START test unique_asin_performance .... [RUN]",
        ]
    )
    assert progress.describe() == "4/5 nodes, running unique_asin_performance"


def test_many_running_nodes_are_counted_not_listed() -> None:
    progress = DbtLogProgress()
    progress.feed([f"x: {i} of 9 START test t{i} ..... [RUN]" for i in range(1, 6)])
    assert progress.describe() == "0/9 nodes, running t1, t2 +3"


def test_the_log_is_read_from_where_the_run_started_and_again_after_rotation(tmp_path: Path) -> None:
    log = tmp_path / "dbt.log"
    log.write_text("1 of 2 START test old ... [RUN]\n1 of 2 PASS old ... [PASS]\n")
    tail = DbtLogTail(log)  # a previous invocation's lines are not this run's
    assert tail.poll().total == 0
    with log.open("a") as f:
        f.write(LOG[0] + "\n" + LOG[1] + "\n" + LOG[2][:40])  # dbt is mid-way through a line
    assert tail.poll().describe() == "0/5 nodes, running source_not_null_sqp_products_asin"
    with log.open("a") as f:
        f.write(LOG[2][40:] + "\n")
    assert "stg_sqp__products" in tail.poll().describe()
    log.write_text(LOG[0] + "\n")  # rotated: a new, shorter file
    assert tail.poll().total == 0


def test_a_run_that_needed_no_dbt_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli.run import _print_summary
    from flows.control import runs
    from flows.core.settings import Settings

    quiet = runs.RunSummary("r1", runs.RunStatus.SUCCESS, "3 table(s) refreshed").to_dict()
    _print_summary(quiet, Settings(), 1.0)
    assert "dbt: not run: nothing it models changed and no rebuild was owed" in capsys.readouterr().out
    built = {**quiet, "dbt_invocation_id": "inv", "dbt_models_built": 18, "dbt_nodes": 154}
    _print_summary(built, Settings(), 1.0)
    assert "dbt: 18 models built, 154 nodes run, 0 failed, 0 skipped" in capsys.readouterr().out


def test_a_resumed_table_says_how_many_slices_it_did_not_read_again(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from flows.cli.run import _print_summary
    from flows.control.statuses import TableStatus
    from flows.control.tables import TableOutcome
    from flows.core.settings import Settings
    from flows.orchestration import run_summary

    resumed = TableOutcome("sqp", TableStatus.SUCCESS, "live", slices_done=34, slices_skipped=18)
    fresh = TableOutcome("products", TableStatus.SUCCESS, "live", slices_done=1)
    summary = run_summary.summarise(uuid4(), [resumed, fresh], None, False)
    _print_summary(summary.to_dict(), Settings(), 1.0)
    printed = capsys.readouterr().out
    assert "sqp: resumed: 18 slice(s) an interrupted attempt committed were not read again" in printed
    assert "products: resumed" not in printed


def test_outside_text_prints_literally_without_control_characters(capsys: pytest.CaptureFixture[str]) -> None:
    import typer
    from rich.console import Console

    from flows.cli.common import fail, plain

    hostile = "[/] [red]x[/red]\x1b[2J\x1b]0;t\x07\x9b1m\nnext\tcol\\"
    console = Console(record=True, width=200)
    console.print(plain(hostile))
    shown = console.export_text()
    assert shown.startswith("[/] [red]x[/red][2J]0;t1m next col\\"), shown
    with pytest.raises(typer.Exit):
        fail(hostile)
    err = capsys.readouterr().err
    assert "[/] [red]x" in err and "\x1b" not in err and "\x07" not in err
