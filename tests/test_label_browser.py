"""The labelling page in headless Chromium, driven by keystrokes (`make test-browser`; plain `make test`
deselects these: they need Debian's chromium + chromium-driver and selenium)."""

import json
import shutil

import pytest
from label_helpers import candidate_set, image_round, kto_set, serving

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: run `make test-browser` (it installs it)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.fail("chromium / chromedriver not found: run `make test-browser` (apt-get install chromium "
                    "chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,800"):
        opts.add_argument(arg)
    d = webdriver.Chrome(service=Service(driver), options=opts)
    d.set_page_load_timeout(30)
    yield d
    d.quit()


def text(d, id_):
    return d.find_element("id", id_).text


def wait_for(d, id_, value, timeout=10):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(d, timeout).until(lambda d: text(d, id_) == value,
                                    f"#{id_} never showed {value!r} (it shows {text(d, id_)!r})")


def press(d, *keys):
    """Each key, then wait until the page has taken it (the progress or the selection changed)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import WebDriverWait

    for key in keys:
        before = (text(d, "progress"), text(d, "hint"))
        ActionChains(d).send_keys(key).perform()
        WebDriverWait(d, 10).until(lambda d: (text(d, "progress"), text(d, "hint")) != before, f"key {key!r} ignored")


def test_a_d3po_round_by_keyboard(browser, tmp_path):
    from selenium.webdriver.common.keys import Keys

    rows = image_round(tmp_path / "round", n=4, run=tmp_path / "run")
    with serving(tmp_path / "round") as server:
        browser.get(server.url)
        wait_for(browser, "progress", "0 / 4")
        img = browser.find_element("css selector", "#image-0 img")
        assert browser.execute_script("return getComputedStyle(arguments[0]).imageRendering", img) == "pixelated"
        assert browser.execute_script("return arguments[0].naturalWidth", img) == 64  # the round's 8x PNG
        assert img.size["width"] == 256  # shown 32 screen pixels per image pixel
        press(browser, Keys.ARROW_LEFT, Keys.ARROW_RIGHT, Keys.ARROW_DOWN, Keys.BACKSPACE, Keys.ARROW_RIGHT)
        assert text(browser, "progress") == "3 / 4"
        assert not (tmp_path / "round" / "labels.json").exists()
        press(browser, Keys.ARROW_LEFT)
        wait_for(browser, "command", f"diffalign train --resume {tmp_path / 'run'}")
        assert "labels.json is written" in text(browser, "done-text")
    labels = json.loads((tmp_path / "round" / "labels.json").read_text())
    assert [(x["a"], x["choice"]) for x in labels] == [(r["a"], c) for r, c in zip(rows, "abba")]


def test_candidates_and_a_kto_set_by_keyboard(browser, tmp_path):
    from selenium.webdriver.common.keys import Keys

    rows = candidate_set(tmp_path / "cand", prompts=("3", "7", "1"), per_prompt=4)
    with serving(tmp_path / "cand") as server:
        browser.get(server.url)
        wait_for(browser, "progress", "0 / 3")
        press(browser, "2", Keys.BACKSPACE, "3", "1")  # a pick cleared, then best 3rd, worst 1st
        press(browser, Keys.ARROW_DOWN, "4")  # the second prompt skipped; the third: best 4th ...
        assert "best" in browser.find_element("id", "image-3").get_attribute("class")
        press(browser, "2")  # ... worst 2nd
        wait_for(browser, "progress", "3 / 3")
        assert "pairs.jsonl is written" in text(browser, "done-text")
    pairs = [json.loads(line) for line in (tmp_path / "cand" / "pairs.jsonl").read_text().splitlines()]
    assert pairs == [{"prompt": "3", "chosen": rows[0]["images"][2], "rejected": rows[0]["images"][0]},
                     {"prompt": "1", "chosen": rows[2]["images"][3], "rejected": rows[2]["images"][1]}]

    kto = kto_set(tmp_path / "kto", n=3)
    with serving(tmp_path / "kto") as server:
        browser.get(server.url)
        wait_for(browser, "progress", "0 / 3")
        press(browser, Keys.ARROW_RIGHT, Keys.ARROW_DOWN, Keys.ARROW_LEFT)
        wait_for(browser, "progress", "3 / 3")
    labels = [json.loads(line) for line in (tmp_path / "kto" / "labels.jsonl").read_text().splitlines()]
    assert labels == [dict(kto[0], desirable=False), dict(kto[2], desirable=True)]
