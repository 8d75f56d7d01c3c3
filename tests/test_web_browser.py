"""The search page in a real browser: Debian's headless Chromium driven by selenium, against
the real stack, workers and `mmrag serve` (the session fixtures of tests/conftest.py).

What a person does: ingest a folder and watch the bar reach done; type a question and see
thumbnails and a cited answer (sources first); upload an image and get that image first;
and with another tenant's key, fail to load this tenant's previews. Screenshots go to
artifacts/web/ (gitignored) for a person to look at.

Chromium and chromium-driver are Debian packages: `make test` installs them as root
(scripts/apt-deps.sh) and prints the command otherwise; this test never skips.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait

from settings import REPO_ROOT
from starters.synthetic_corpus import write_corpus, write_pdf, write_video
from tests.conftest import WebServer, make_api_key
from tests.helpers import wait_searchable
from tests.llm_server import LlmTestServer

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = REPO_ROOT / "artifacts" / "web"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1400,1000",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    for path in (CHROMIUM, CHROMEDRIVER):
        assert Path(path).exists(), (
            f"{path} is missing: install Debian's chromium and chromium-driver "
            "(`sh scripts/apt-deps.sh` as root; `make test` does it)"
        )
    profile = tempfile.mkdtemp(prefix="mmrag-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(60)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(autouse=True)
def server_log(web: WebServer) -> Iterator[None]:
    """The server's log beside the screenshots, for a person reading a failure."""
    yield
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "server.log").write_text(web.log())


@pytest.fixture(scope="module")
def shop(web: WebServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Tenant web-shop's images, a PDF and a video, ingested through the API."""
    folder = tmp_path_factory.mktemp("shop")
    write_corpus(folder, per_class=1, seed=21)
    write_pdf(folder / "report.pdf")
    write_video(folder / "clip.mp4")
    key = make_api_key("web-shop", "writer")
    headers = {"Authorization": f"Bearer {key}"}
    started = httpx.post(
        web.url + "/v1/ingest", json={"sources": [folder.as_uri()]}, headers=headers, timeout=30
    ).json()
    deadline = time.monotonic() + 240
    while True:
        status = httpx.get(
            web.url + f"/v1/ingest/{started['id']}", headers=headers, timeout=30
        ).json()
        if status["status"] != "running":
            break
        assert time.monotonic() < deadline
        time.sleep(0.3)
    assert status["status"] == "done", status
    wait_searchable("web-shop", status["result"]["vectors"])
    assets = httpx.get(web.url + "/v1/assets", headers=headers, timeout=30).json()["assets"]
    return {"key": key, "folder": folder, "assets": {Path(a["display"]).name: a for a in assets}}


def open_page(driver: WebDriver, web: WebServer, key: str, tenant: str) -> None:
    """The page, with the key in the link's fragment as the demo prints it."""
    driver.get("about:blank")
    driver.get(f"{web.url}/#key={key}")
    wait(driver).until(lambda d: d.find_element(By.ID, "who").text.startswith(f"tenant {tenant} "))
    assert "key=" not in driver.current_url  # taken from the address bar at once


def wait(driver: WebDriver, timeout: float = 90) -> WebDriverWait[WebDriver]:
    return WebDriverWait(driver, timeout, poll_frequency=0.2)


def shot(driver: WebDriver, name: str) -> Path:
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


def texts(driver: WebDriver, selector: str) -> str:
    """The text of every element ``selector`` matches, read at once (the page re-renders)."""
    return str(
        driver.execute_script(
            "return [...document.querySelectorAll(arguments[0])].map(e => e.textContent)"
            ".join(' | ')",
            selector,
        )
    )


def all_thumbnails_loaded(driver: WebDriver) -> bool:
    cards = len(driver.find_elements(By.CSS_SELECTOR, "#results .card"))
    return cards > 0 and loaded_thumbnails(driver) == cards


def loaded_thumbnails(driver: WebDriver) -> int:
    return int(
        driver.execute_script(
            "return [...document.querySelectorAll('#results img')]"
            ".filter(i => i.complete && i.naturalWidth > 0 && i.src.startsWith('blob:')).length"
        )
    )


def test_ingest_a_folder_and_watch_progress_reach_done(
    browser: WebDriver, web: WebServer, tmp_path: Path
):
    write_corpus(tmp_path, per_class=2, seed=8)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot a png")
    open_page(browser, web, make_api_key("web-ingest", "writer"), "web-ingest")
    box = browser.find_element(By.ID, "ingest-uris")
    box.send_keys(tmp_path.as_uri())
    browser.find_element(By.ID, "ingest-btn").click()
    status = browser.find_element(By.ID, "ingest-text")
    try:
        wait(browser, 300).until(
            lambda d: status.get_attribute("data-status") in ("done", "failed")
        )
    finally:
        shot(browser, "ingest-done")
    assert status.get_attribute("data-status") == "done", status.text
    assert status.text.startswith("done: 36 ingested, 0 unchanged, 1 failed")
    bar = browser.find_element(By.ID, "ingest-progress")
    assert bar.get_attribute("value") == bar.get_attribute("max") == "37"
    rows = browser.find_elements(By.CSS_SELECTOR, "#failures tbody tr")
    assert len(rows) == 1 and "broken.png" in rows[0].text
    link = browser.find_element(By.ID, "ingest-run").get_attribute("href") or ""
    assert "/namespaces/default/workflows/ingest-batch" in link


def test_type_a_question_and_see_thumbnails_then_a_cited_answer(
    browser: WebDriver, web: WebServer, shop: dict[str, Any]
):
    open_page(browser, web, shop["key"], "web-shop")
    question = browser.find_element(By.ID, "q")
    question.send_keys("a red circle on a white background", Keys.ENTER)  # keyboard only
    wait(browser).until(lambda d: loaded_thumbnails(d) >= 3)
    wait(browser).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#answer .cite"))
    cards = browser.find_elements(By.CSS_SELECTOR, "#results .card")
    assert len(cards) == 8
    first = cards[0].text
    assert "S1" in first and "score" in first
    alts = [i.get_attribute("alt") for i in browser.find_elements(By.CSS_SELECTOR, "#results img")]
    assert all(alt and alt.startswith("S") for alt in alts)
    state = browser.find_element(By.ID, "answer-state").text
    assert state.startswith("Generated answer")
    cite = browser.find_elements(By.CSS_SELECTOR, "#answer .cite")[0]
    cite.click()
    cited = cite.text.strip("[]")
    assert "cited" in (browser.find_element(By.ID, f"src-{cited}").get_attribute("class") or "")
    timing = browser.find_element(By.ID, "timing")
    sources_ms = int(timing.get_attribute("data-sources-ms") or 0)
    answer_ms = int(timing.get_attribute("data-answer-ms") or 0)
    assert 0 < sources_ms <= answer_ms  # the sources were on screen before the answer
    (ARTIFACTS / "timing.json").write_text(
        json.dumps({"sources_ms": sources_ms, "answer_ms": answer_ms}) + "\n"
    )
    wait(browser).until(all_thumbnails_loaded)
    shot(browser, "search-cited-answer")
    # Pages and frames say where they are.
    Select(browser.find_element(By.ID, "f-type")).select_by_value("video/mp4")
    question.send_keys(Keys.ENTER)
    wait(browser).until(lambda d: "video at 00:0" in texts(d, "#results .where"))
    Select(browser.find_element(By.ID, "f-type")).select_by_value("application/pdf")
    question.send_keys(Keys.ENTER)
    wait(browser).until(lambda d: "page 2" in texts(d, "#results .where"))
    wait(browser).until(all_thumbnails_loaded)
    shot(browser, "search-pdf-pages")
    Select(browser.find_element(By.ID, "f-type")).select_by_value("")


def test_upload_an_image_and_get_it_first(browser: WebDriver, web: WebServer, shop: dict[str, Any]):
    open_page(browser, web, shop["key"], "web-shop")
    image = shop["folder"] / "orange-square-000.png"
    browser.find_element(By.ID, "image").send_keys(str(image))
    wait(browser).until(lambda d: d.find_element(By.ID, "image-preview").is_displayed())
    browser.find_element(By.ID, "f-generate").click()  # sources only
    browser.find_element(By.ID, "search-btn").click()
    wait(browser).until(lambda d: loaded_thumbnails(d) >= 1)
    first = browser.find_elements(By.CSS_SELECTOR, "#results .card .name")[0]
    assert first.text == image.name
    wait(browser).until(all_thumbnails_loaded)
    shot(browser, "image-query")
    browser.find_element(By.ID, "f-generate").click()


def test_degraded_and_refused_answers_are_shown_as_such(
    browser: WebDriver, web: WebServer, shop: dict[str, Any], llm: LlmTestServer
):
    open_page(browser, web, shop["key"], "web-shop")
    question = browser.find_element(By.ID, "q")
    state = browser.find_element(By.ID, "answer-state")
    try:
        llm.set_mode("hallucinate")  # claims the sources do not hold: the validator refuses
        question.clear()
        question.send_keys("which shape is yellow, and what does the report say?", Keys.ENTER)
        wait(browser).until(lambda d: state.text.startswith("Refused"))
        assert "refused" in (state.get_attribute("class") or "")
        wait(browser).until(all_thumbnails_loaded)
        shot(browser, "answer-refused")
        llm.set_mode("fail")  # the LLM is down: sources and an extractive answer, degraded
        question.clear()
        question.send_keys("is there a purple triangle anywhere?", Keys.ENTER)
        # Each failure is retried until the breaker opens (tests/test_ask.py): not at once.
        wait(browser, 240).until(lambda d: state.text.startswith("Degraded answer: "))
        assert "degraded" in (state.get_attribute("class") or "")
        wait(browser).until(all_thumbnails_loaded)
        shot(browser, "answer-degraded")
    finally:
        llm.set_mode("ok")
        time.sleep(4.5)  # MMRAG_BREAKER_RESET_S of the shared workers: later tests see it closed


def test_a_key_of_another_tenant_cannot_load_these_previews(
    browser: WebDriver, web: WebServer, shop: dict[str, Any]
):
    open_page(browser, web, make_api_key("web-rival", "reader"), "web-rival")
    asset = shop["assets"]["red-circle-000.png"]["asset_id"]
    status = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch('/v1/assets/' + arguments[0] + '/preview?locator=image', "
        "{headers: {Authorization: 'Bearer ' + sessionStorage.getItem('mmrag.key')}})"
        ".then(r => r.json().then(b => done([r.status, b.error])))",
        asset,
    )
    assert status[0] == 404 and "this key's tenant" in status[1]
    # The rival's own search finds nothing of the shop's.
    browser.find_element(By.ID, "q").send_keys("a red circle", Keys.ENTER)
    wait(browser).until(
        lambda d: (
            d.find_element(By.ID, "no-results").text == "Nothing matched."
            or d.find_element(By.ID, "error").is_displayed()
        )
    )
    assert not browser.find_elements(By.CSS_SELECTOR, "#results .card")
    shot(browser, "other-tenant")
