"""The chat page at / in a real headless Chromium: a message sent, the streamed reply shown
(the same text as the API's), stop and clear.

Needs Chromium and its driver from the system's packages:
    apt-get update && apt-get install -y chromium chromium-driver
and selenium (the dev extra)."""

from __future__ import annotations

import shutil
import time

import pytest
from conftest import write_slow_endless_checkpoint
from test_serve import POSITIONS, start_server, stop_server

webdriver = pytest.importorskip("selenium.webdriver")
httpx = pytest.importorskip("httpx")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="no Chromium: apt-get update && apt-get install -y chromium chromium-driver",
)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    model = write_slow_endless_checkpoint(tmp_path_factory.mktemp("page") / "m", POSITIONS)
    proc, url = start_server(model)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=DRIVER)
    browser = webdriver.Chrome(options=options, service=service)
    try:
        browser.get(url + "/")
        yield browser, url
    finally:
        browser.quit()
        stop_server(proc)


def wait_for(condition, seconds: float = 30):
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("the page did not get there in time")


def settings(browser, temperature: str, max_tokens: str) -> None:
    for name, value in (("temperature", temperature), ("max-tokens", max_tokens)):
        box = browser.find_element("id", name)
        box.clear()
        box.send_keys(value)


def test_a_message_gets_the_streamed_reply(page):
    browser, url = page
    wait_for(lambda: browser.find_element("id", "model").text)  # /v1/models answered
    settings(browser, "0", "24")
    browser.find_element("id", "input").send_keys("Hello there")
    browser.find_element("id", "send").click()
    reply = wait_for(lambda: browser.find_elements("css selector", ".assistant[data-state=done]"))
    shown = reply[0].get_attribute("textContent")
    body = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 24}
    expected = httpx.post(url + "/v1/chat/completions", json=body | {"temperature": 0}, timeout=30)
    assert shown == expected.json()["choices"][0]["message"]["content"]
    assert browser.find_element("css selector", ".user").get_attribute("textContent") == (
        "Hello there"
    )
    assert "tokens/s" in browser.find_element("id", "speed").text or not shown


def test_stop_ends_the_reply_and_frees_the_row_then_clear_empties(page):
    """A greedy reply of 800 tokens (about 2 s), stopped once it shows: the page keeps
    what came, a prefix of the whole reply, and the server frees the row."""
    browser, url = page
    settings(browser, "0", "800")
    before = httpx.get(url + "/health").json()["cancelled"]
    browser.find_element("id", "clear").click()
    browser.find_element("id", "input").send_keys("tell me more")
    browser.find_element("id", "send").click()
    bubble = wait_for(lambda: browser.find_elements("css selector", ".assistant"))[0]
    wait_for(lambda: bubble.get_attribute("textContent"))
    browser.find_element("id", "stop").click()
    wait_for(lambda: bubble.get_attribute("data-state") == "done")
    wait_for(lambda: httpx.get(url + "/health").json()["cancelled"] == before + 1)
    shown = bubble.get_attribute("textContent")
    body = {"messages": [{"role": "user", "content": "tell me more"}], "max_tokens": 800}
    whole = httpx.post(url + "/v1/chat/completions", json=body | {"temperature": 0}, timeout=60)
    full = whole.json()["choices"][0]["message"]["content"]
    assert full.startswith(shown) and len(shown) < len(full)
    browser.find_element("id", "clear").click()
    assert browser.find_elements("css selector", "#log .msg") == []
