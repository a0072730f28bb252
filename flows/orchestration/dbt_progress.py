"""dbt's progress while it runs, read from its log file: nodes done of the total and the
nodes running now (what `refresh run` shows beside the tables' progress)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from flows.core.settings import Settings
from flows.engine.transform import target_dir


def dbt_log_path(settings: Settings) -> Path:
    """Where dbt writes its log (under the state directory, flows.engine.transform.run_dbt)."""
    return target_dir(settings).parent / "logs" / "dbt.log"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# dbt's node lines: "12 of 131 START sql view model staging.stg_x .... [RUN]" when a node starts,
# "12 of 131 OK created sql view model ..." (PASS, WARN, FAIL, ERROR, SKIP, NO-OP) when it ends.
_DBT_NODE = re.compile(r"\b(\d+) of (\d+) (START|OK|PASS|WARN|FAIL|ERROR|SKIP|NO-OP)\b ?(.*?)(?: \.{2,}.*)?$")


@dataclass
class DbtLogProgress:
    """dbt's progress as its log file tells it, line by line: nodes done of the total, and the
    nodes running now. A new invocation ("Running with dbt=") starts the count again."""

    total: int = 0
    done: set[int] = field(default_factory=set)
    running: dict[int, str] = field(default_factory=dict)

    def feed(self, lines: Iterable[str]) -> None:
        for raw in lines:
            line = _ANSI.sub("", raw).rstrip()
            if "Running with dbt=" in line:
                self.total, self.done, self.running = 0, set(), {}
                continue
            m = _DBT_NODE.search(line)
            if m is None:
                continue
            index, self.total, event, rest = int(m[1]), int(m[2]), m[3], m[4].split()
            if event == "START":
                if index not in self.done:
                    self.running[index] = rest[-1].rsplit(".", 1)[-1] if rest else f"node {index}"
            else:
                self.done.add(index)
                self.running.pop(index, None)

    def describe(self, max_names: int = 2) -> str:
        names = [self.running[i] for i in sorted(self.running)]
        shown = ", ".join(names[:max_names]) + (
            f" +{len(names) - max_names}" if len(names) > max_names else ""
        )
        return f"{len(self.done)}/{self.total} nodes" + (f", running {shown}" if shown else "")


class DbtLogTail:
    """Reads what dbt appended to its log file since the run started (dbt writes it under the
    state directory, flows.engine.transform.run_dbt); a log dbt rotated is read from its start."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0
        self.partial = ""
        self.progress = DbtLogProgress()

    def poll(self) -> DbtLogProgress:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return self.progress
        if size < self.offset:
            self.offset, self.partial = 0, ""
        if size > self.offset:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                chunk = f.read(size - self.offset)
            self.offset = size
            lines = (self.partial + chunk.decode("utf-8", "replace")).split("\n")
            self.partial = lines.pop()
            self.progress.feed(lines)
        return self.progress
