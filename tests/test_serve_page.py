"""`solm serve`'s web page (issue 22) in headless Chromium: Debian's ``chromium`` and ``chromium-driver`` (never a
browser download: Selenium gets both paths and runs offline). The page is filled in and submitted like a user would;
each shaded token's ``data-cost`` must equal the per-token cost the API returns for the same greedy request."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from require import need_browser
from serve_helpers import post
from test_artifact import PROMPT

CHROMIUM, DRIVER = shutil.which("chromium") or "/usr/bin/chromium", "/usr/bin/chromedriver"
SHOT = Path(__file__).resolve().parents[1] / "results" / "serve-page-test.png"
WAIT_S = 30


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        need_browser("selenium is not installed (the test extra)")
    if not (os.access(CHROMIUM, os.X_OK) and os.access(DRIVER, os.X_OK)):
        need_browser("no headless Chromium here (apt-get install chromium chromium-driver)")
    os.environ["SE_OFFLINE"] = "true"                 # Selenium Manager, should it run, must not fetch anything
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1100,900", "--no-first-run", "--disable-extensions"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(options=opts, service=Service(executable_path=DRIVER))
    driver.set_page_load_timeout(WAIT_S)
    driver.set_script_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def _set(driver, element_id: str, value) -> None:
    """A form control's value as a user would leave it (range inputs cannot be typed into)."""
    driver.execute_script("const e = document.getElementById(arguments[0]); e.value = arguments[1];"
                          "e.dispatchEvent(new Event('input', {bubbles: true}));", element_id, str(value))


def test_page_shades_tokens_with_the_api_costs(browser, served):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(served["url"] + "/")
    wait = WebDriverWait(browser, WAIT_S)
    wait.until(lambda d: "portable" in d.find_element(By.ID, "model").text)
    prompt = browser.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys(PROMPT)
    _set(browser, "attn_keep", 0.5)
    _set(browser, "mlp_keep", 0.75)
    _set(browser, "max_tokens", 16)
    assert browser.find_element(By.ID, "attn_keep_v").text == "0.50"
    if browser.find_element(By.ID, "chat").is_selected():
        browser.find_element(By.ID, "chat").click()      # plain completion of the prompt
    browser.find_element(By.ID, "send").click()
    wait.until(lambda d: d.find_element(By.ID, "status").get_attribute("data-state") in ("done", "error"))
    assert browser.find_element(By.ID, "status").get_attribute("data-state") == "done"
    spans = browser.find_elements(By.CSS_SELECTOR, "#answer .t")
    status, api = post(served["url"] + "/v1/completions", {"prompt": PROMPT, "max_tokens": 16, "temperature": 0,
                                                           "attn_keep": 0.5, "mlp_keep": 0.75})
    assert status == 200
    want = [p["token_cost"] for p in api["solm"]["per_token"]]
    assert [float(s.get_attribute("data-cost")) for s in spans] == want
    assert [int(s.get_attribute("data-token")) for s in spans] == [p["token"] for p in api["solm"]["per_token"]]
    assert browser.find_element(By.ID, "answer").text == api["choices"][0]["text"]
    colours = {s.value_of_css_property("background-color") for s in spans}
    assert len(colours) > 1                                # shaded, by more than one value
    assert len(browser.find_elements(By.CSS_SELECTOR, "#chart polyline")) == 1
    assert browser.find_elements(By.CSS_SELECTOR, "#chart line.dense")
    assert browser.find_elements(By.CSS_SELECTOR, "#chart line.static")   # a static allocation at the same usage
    spans[len(spans) // 2].click()                          # a tap shows the token's tooltip
    tip = browser.find_element(By.ID, "tip")
    assert tip.is_displayed() and "compute" in tip.text and "κ" in tip.text
    SHOT.parent.mkdir(exist_ok=True)
    browser.save_screenshot(str(SHOT))
    assert SHOT.stat().st_size > 1000


def test_page_ships_no_outside_references(served):
    from serve_helpers import get

    for path in ("/", "/static/page.js", "/static/page.css"):
        status, text = get(served["url"] + path)
        assert status == 200 and "http://" not in text.replace("http://www.w3.org/2000/svg", "")
        assert "https://" not in text and "//cdn" not in text
