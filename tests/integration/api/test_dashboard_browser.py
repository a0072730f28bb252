"""The dashboard in a real headless Chromium against a real `refresh api` (uvicorn) after a
real refresh: what a person sees, and a screenshot kept (SQP_UPDATE_SCREENSHOT=1 copies it to docs/img/dashboard.png for the README)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flows.core.settings import PROJECT_ROOT

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
TABLES = ("search_query_performance", "daily_search_terms", "products")


@pytest.fixture
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists() or not Path(CHROMEDRIVER).exists():
        pytest.fail("chromium and chromium-driver are needed (`make test` installs them with apt)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1500"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_dashboard_shows_tables_statuses_and_charts(
    api_url: str, browser: Any, api_tokens: dict[str, str], tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    browser.get(api_url + "/")
    # reads need a token here: the page asks for one
    form = wait.until(ec.visibility_of_element_located((By.ID, "token-form")))
    assert "bearer token" in browser.find_element(By.ID, "problem").text
    browser.find_element(By.ID, "token").send_keys(api_tokens["read"])
    form.submit()
    wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, "#tables tbody"), "products"))
    rows = {
        r.find_elements(By.TAG_NAME, "td")[0].text: [td.text for td in r.find_elements(By.TAG_NAME, "td")]
        for r in browser.find_elements(By.CSS_SELECTOR, "#tables tbody tr")
    }
    assert set(rows) == set(TABLES)
    for cells in rows.values():
        assert cells[1:4] == ["live", "success", "fresh"]
    assert browser.find_element(By.ID, "health").text == "healthy"
    # plotly drew the charts (its SVG root), from the script the app serves
    for chart in ("timeline", "trend-tables", "trend-models"):
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, f"#{chart} .main-svg")))
    legend = browser.find_element(By.CSS_SELECTOR, "#trend-tables").text
    assert all(t in legend for t in TABLES)
    assert "no failures" in browser.find_element(By.ID, "failures").text
    # the trigger button with a read-only token: the API's refusal is shown, nothing starts
    browser.find_element(By.ID, "trigger").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "trigger-result"), "403"))
    assert browser.execute_script("return typeof Plotly") == "object"
    # the only failed requests are the two the test caused: the first read without a token
    # (401) and the trigger with a read token (403)
    errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert all(" 401 " in m or " 403 " in m for m in errors), errors
    shot = tmp_path / "dashboard.png"
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    # The README's picture is refreshed on request only: a test run leaves the checkout clean.
    if os.environ.get("SQP_UPDATE_SCREENSHOT"):
        docs_img = PROJECT_ROOT / "docs" / "img"
        docs_img.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, docs_img / "dashboard.png")
