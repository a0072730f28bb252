"""Which Prefect API the user configured (flows.demo.local_prefect.configured_prefect_api): the
environment, else the active profile; read without importing Prefect."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flows.demo.local_prefect import configured_prefect_api

PROFILES = """active = "mine"
[profiles.mine]
PREFECT_API_URL = "http://prefect.example:4200/api"
[profiles.ephemeral]
"""


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var in ("PREFECT_API_URL", "PREFECT_PROFILE", "PREFECT_PROFILES_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    return tmp_path


def test_none_without_environment_or_profile(home: Path) -> None:
    assert configured_prefect_api() is None
    (home / "profiles.toml").write_text("not toml [")
    assert configured_prefect_api() is None


def test_the_active_profile_and_the_environment_over_it(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (home / "profiles.toml").write_text(PROFILES)
    assert configured_prefect_api() == "http://prefect.example:4200/api"
    monkeypatch.setenv("PREFECT_PROFILE", "ephemeral")
    assert configured_prefect_api() is None
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9999/api")
    assert configured_prefect_api() == "http://127.0.0.1:9999/api"


def test_it_does_not_import_prefect(home: Path) -> None:
    (home / "profiles.toml").write_text(PROFILES)
    code = (
        "import sys; from flows.demo.local_prefect import configured_prefect_api as c; "
        "print(c(), 'prefect' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["http://prefect.example:4200/api", "False"], done.stderr
