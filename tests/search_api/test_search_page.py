"""The search page and the API docs in a real headless Chromium (Debian's chromium + chromedriver, driven by
Selenium). `.ci/run` installs the browser; on a machine without it these tests are skipped with that reason.

Every request a page makes is read from Chromium's DevTools log, so a page that loads anything from another host
fails here even on a machine with internet."""

import json
import shutil
from urllib.parse import urlsplit

import pytest

from indexer.pipeline import ingest_paths
from tests.helpers.data import DATA, cpu_settings, read_jsonl, write_jsonl
from tests.helpers.server import RunningServer

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium and chromium-driver (.ci/run installs them)"
)


@pytest.fixture(scope="module")
def browser_and_server(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    root = tmp_path_factory.mktemp("page")
    records = read_jsonl(DATA / "dbpedia" / "corpus.jsonl", limit=60)
    for i, record in enumerate(records):
        record["lang"] = ["en", "de"][i % 2]
    ingest_paths([write_jsonl(root / "c.jsonl", records)], root / "data", "default", cpu_settings(), model="minilm")
    settings = cpu_settings()
    settings.data_dir = root / "data"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={root / 'profile'}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    with RunningServer(settings) as server:
        driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
        try:
            yield driver, server
        finally:
            driver.quit()


def run_query(driver, url, query, filter_json=None):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url + "/")
    wait = WebDriverWait(driver, 30)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#collection option"))
    driver.find_element(By.ID, "query").send_keys(query)
    if filter_json:
        driver.find_element(By.ID, "filter").send_keys(filter_json)
    driver.find_element(By.ID, "go").click()
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "results in"))
    return driver.find_elements(By.CSS_SELECTOR, "li.result")


def test_search_page_shows_ranked_results_with_highlighting(browser_and_server):
    from selenium.webdriver.common.by import By

    driver, server = browser_and_server
    results = run_query(driver, server.url, "fictional airline")
    assert results[0].find_element(By.CLASS_NAME, "title").text == "Oceanic Airlines"
    marked = [m.text.lower() for m in results[0].find_elements(By.TAG_NAME, "mark")]
    assert "airline" in marked or "airlines" in marked or "fictional" in marked
    assert "ms on the server" in driver.find_element(By.ID, "status").text
    assert "default" in driver.find_element(By.ID, "collection").text


def test_search_page_applies_a_filter(browser_and_server):
    from selenium.webdriver.common.by import By

    driver, server = browser_and_server
    results = run_query(driver, server.url, "fictional airline", '{"lang": "de"}')
    assert results
    assert all('"lang":"de"' in r.find_element(By.CLASS_NAME, "meta").text for r in results)
    assert all(r.find_element(By.CLASS_NAME, "title").text != "Oceanic Airlines" for r in results)  # it is "en"


def requested_urls(driver) -> list[str]:
    """Every URL the browser sent a request for since the last call, failed ones included; requests the page's
    Content-Security-Policy stopped before they left the browser are not counted (DevTools Network events)."""
    sent, blocked = {}, set()
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            sent[message["params"]["requestId"]] = message["params"]["request"]["url"]
        elif message["method"] == "Network.loadingFailed" and message["params"].get("blockedReason") == "csp":
            blocked.add(message["params"]["requestId"])
    return [url for request, url in sent.items() if request not in blocked]


def elsewhere(urls: list[str], server_url: str) -> list[str]:
    """The network URLs among ``urls`` that are not on the server (data: and the browser's own chrome: URLs are
    no requests to anyone)."""
    own = urlsplit(server_url).netloc
    return [u for u in urls if urlsplit(u).scheme in ("http", "https", "ws", "wss") and urlsplit(u).netloc != own]


def test_search_page_loads_nothing_from_elsewhere(browser_and_server):
    driver, server = browser_and_server
    requested_urls(driver)
    run_query(driver, server.url, "fictional airline")
    urls = requested_urls(driver)
    assert server.url + "/" in urls
    assert elsewhere(urls, server.url) == []


def load_page(driver, url: str, ready) -> None:
    """Open ``url`` with the request log emptied first, and wait until ``ready(driver)`` holds."""
    from selenium.webdriver.support.ui import WebDriverWait

    requested_urls(driver)
    driver.get(url)
    WebDriverWait(driver, 30).until(ready)


def assert_spec_from_the_server_alone(driver, server) -> None:
    urls = requested_urls(driver)
    assert server.url + "/openapi.json" in urls
    assert elsewhere(urls, server.url) == []


def test_api_docs_render_from_the_server_alone(browser_and_server):
    from selenium.webdriver.common.by import By

    driver, server = browser_and_server
    load_page(driver, server.url + "/docs", lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock"))
    paths = {e.get_attribute("data-path") for e in driver.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    assert {"/collections/{collection}/search", "/collections", "/health"} <= paths
    assert_spec_from_the_server_alone(driver, server)


def test_redoc_renders_from_the_server_alone(browser_and_server):
    from selenium.webdriver.common.by import By

    driver, server = browser_and_server
    search_path = "/collections/{collection}/search"
    load_page(driver, server.url + "/redoc", lambda d: search_path in d.find_element(By.TAG_NAME, "body").text)
    assert "stella-search" in driver.find_element(By.CSS_SELECTOR, ".api-info h1").text
    assert_spec_from_the_server_alone(driver, server)
