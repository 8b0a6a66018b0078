"""The viewer in a real headless browser (Debian's chromium, driven by Selenium through
chromedriver; `scripts/setup.sh` installs both): open the listing, filter it, open a run,
and read what a person sees: the target marked in the ranking, the tool calls in order."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from starrec.api.viewer import viewer_app
from starrec.evaluation.runs import load_runs
from tests.test_viewer import files, on_loopback  # noqa: F401  (the fixture is used by name)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="chromium / chromedriver not installed (scripts/setup.sh "
                                       "installs them with apt-get where it can)")


def browser(profile: Path):
    """Headless chromium with no network beyond loopback to try (this machine has none)."""
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
                 "--window-size=1280,1600"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def test_a_person_filters_opens_a_run_and_sees_the_target_and_the_tool_calls(files):  # noqa: F811
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    # an element read while the page is being replaced goes stale: look again
    retry = (StaleElementReferenceException,)

    trajectories, records, _ = files
    runs = load_runs([trajectories, records])
    best = runs[0]
    with on_loopback(viewer_app(runs)) as base, tempfile.TemporaryDirectory() as profile:
        driver = browser(Path(profile))
        try:
            driver.get(base + "/")
            assert len(driver.find_elements(By.CSS_SELECTOR, "tr.run")) == 5
            Select(driver.find_element(By.NAME, "system")).select_by_visible_text("mars")
            driver.find_element(By.CSS_SELECTOR, "form.filters button").click()
            # the filter submits the form: wait for the new page, not the old one's rows
            WebDriverWait(driver, 20, ignored_exceptions=retry).until(
                lambda d: "3 of 5 runs" in d.find_element(By.ID, "count").text)
            shown = driver.find_elements(By.CSS_SELECTOR, "tr.run")
            assert len(shown) == 3 and "3 of 5 runs" in driver.find_element(By.ID, "count").text
            driver.find_element(By.CSS_SELECTOR, f'tr.run[data-key="{best.key}"] a').click()

            target = WebDriverWait(driver, 20, ignored_exceptions=retry).until(
                lambda d: d.find_element(By.CSS_SELECTOR, "#ranking tr.target"))
            assert best.target in target.text and target.is_displayed()
            calls = driver.find_elements(By.CSS_SELECTOR, ".tool-call .tool-name")
            assert [c.text for c in calls] == ["next_items", "sequence_candidates",
                                               "candidate_evidence"]
            # an LLM's markup stays text on the page of the malicious run
            driver.get(f"{base}/runs/{runs[1].key}")
            assert driver.find_elements(By.CSS_SELECTOR, "#steps script") == []
            assert "<script>" in driver.find_element(By.ID, "steps").get_attribute("textContent")
        finally:
            driver.quit()
