"""The dbt layering rule of docs/dbt.md: an intermediate model reads staging or intermediate
models only, never a mart or a summary."""

from __future__ import annotations

import re

from flows.core.settings import PROJECT_ROOT

MODELS = PROJECT_ROOT / "models"
REF = re.compile(r"""ref\(\s*['"]([A-Za-z0-9_]+)['"]\s*\)""")


def layer_of() -> dict[str, str]:
    return {path.stem: path.parent.name for path in MODELS.rglob("*.sql")}


def test_intermediate_models_read_staging_or_intermediate_only() -> None:
    layers = layer_of()
    intermediate = sorted((MODELS / "intermediate").glob("*.sql"))
    assert intermediate, "no intermediate model found"
    for path in intermediate:
        refs = REF.findall(path.read_text())
        assert refs, f"{path.name} refs nothing"
        wrong = [r for r in refs if layers.get(r) not in ("staging", "intermediate")]
        assert not wrong, f"{path.name} reads {wrong} ({[layers.get(r) for r in wrong]})"
