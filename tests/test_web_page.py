"""The web page at `/`, served by the real service and driven in a real browser (Debian's chromium
through Playwright): API key prompt, upload, overlay, class list, timings, an error from the API.

Chromium comes from tools/ensure_deploy_tools.sh (`make test` runs it); without it the browser test
skips, unless BISENET_REQUIRE_BROWSER=1. The screenshot lands in test-artifacts/web-page.png.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.servicekit import FAST_ARGS, ROOT, Service

API_KEY = "web-test-key"
CHROMIUM = os.environ.get("BISENET_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    # a synthetic camera (a moving test pattern) that the page may use without asking
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
]
ARTIFACTS = ROOT / "test-artifacts"
EXTERNAL_URL = re.compile(r"(https?:)?//[\w.-]+\.\w+/")


@pytest.fixture(scope="module")
def service(varied_r18_checkpoint):
    svc = Service([*FAST_ARGS, "--model", f"bisenetv1_r18={varied_r18_checkpoint}", "--api-key", API_KEY])
    try:
        yield svc.wait_ready()
    finally:
        svc.stop()


def test_page_and_its_files_are_served_from_the_package_with_nothing_external(service):
    page = httpx.get(f"{service.url}/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    html = page.text
    assert not EXTERNAL_URL.search(html)  # no CDN, no fonts from elsewhere
    for asset in re.findall(r'(?:src|href)="(/static/[^"]+)"', html):
        r = httpx.get(f"{service.url}{asset}", timeout=10)
        assert r.status_code == 200 and r.content, asset
        assert not EXTERNAL_URL.search(r.text), asset
    assert 'id="tta-field" hidden' in html  # the accuracy mode waits for the server to announce it


def test_web_config_gives_the_budget_and_says_a_key_is_needed(service):
    config = httpx.get(f"{service.url}/web/config", timeout=10).json()
    assert config["budget_ms"] == pytest.approx(1000 / 30, abs=0.01)
    assert config["api_key_required"] is True
    assert config["accuracy_modes"] == [] and config["auto_model"] is False


def chromium_or_skip() -> str:
    if os.path.exists(CHROMIUM) and shutil.which(CHROMIUM):
        return CHROMIUM
    if os.environ.get("BISENET_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{CHROMIUM} is missing and BISENET_REQUIRE_BROWSER=1 (run tools/ensure_deploy_tools.sh)")
    pytest.skip(f"{CHROMIUM} is missing: tools/ensure_deploy_tools.sh installs Debian's chromium")


@pytest.fixture(scope="module")
def browser():
    executable = chromium_or_skip()
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture()
def photo_file(tmp_path, photo) -> Path:
    path = tmp_path / "astronaut.jpg"
    Image.fromarray(photo).resize((384, 384)).save(path, quality=90)
    return path


def share(text: str) -> float:
    """A pixel share as the page writes it ('18%', '2.5%', '<0.1%') in percent."""
    return 0.05 if text == "<0.1%" else float(text.rstrip("%"))


def test_a_person_segments_a_photo_and_sees_overlay_classes_timings_and_errors(service, browser, photo_file, tmp_path):
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    messages = []
    page.on("console", lambda m: messages.append(m.text) if m.type == "error" else None)
    page.goto(service.url + "/")

    # The service has an API key: the page asks for it, keeps it for the tab, then lists the models.
    page.locator("#key-form").wait_for(state="visible", timeout=30_000)
    page.fill("#api-key", API_KEY)
    page.keyboard.press("Enter")
    page.locator("#model option").first.wait_for(state="attached", timeout=30_000)
    assert page.evaluate("sessionStorage.getItem('bisenet-api-key')") == API_KEY
    assert page.locator("#model").input_value() == "bisenetv1_r18"
    assert page.locator("#tta-field").is_hidden()
    assert "33.3 ms" in page.locator("#service-status").inner_text()

    page.set_input_files("#file", str(photo_file))
    overlay = page.locator("#overlay")
    page.locator("#figure").wait_for(state="visible", timeout=60_000)
    expect(overlay).to_have_attribute("src", re.compile("^data:image/png;base64,"))
    assert page.evaluate("document.querySelector('#overlay').naturalWidth") == 384
    assert overlay.get_attribute("alt").startswith("Segmentation of astronaut.jpg: ")
    assert page.locator("#photo").get_attribute("alt") == "The image sent: astronaut.jpg"

    # The class list: names from the model, colours from its palette, shares adding up to the image.
    rows = page.locator("#class-rows tr")
    assert rows.count() >= 2
    names = [rows.nth(i).locator("td").nth(1).inner_text() for i in range(rows.count())]
    cityscapes = set(httpx.get(f"{service.url}/models", headers={"X-API-Key": API_KEY}).json()["models"][0]["classes"])
    assert set(names) <= cityscapes
    shares = [share(rows.nth(i).locator("td").nth(2).inner_text()) for i in range(rows.count())]
    assert shares == sorted(shares, reverse=True) and sum(shares) == pytest.approx(100, abs=1.5)
    assert "rgb(" in rows.nth(0).locator(".swatch").get_attribute("style")

    # The timings: each stage, the total against the 33.3 ms budget.
    timing = {
        page.locator("#timing-rows tr").nth(i).get_attribute("data-stage"): page.locator("#timing-rows tr")
        .nth(i)
        .locator("td")
        .nth(1)
        .inner_text()
        for i in range(page.locator("#timing-rows tr").count())
    }
    for stage in ("decode", "queue", "inference", "encode", "server total", "round trip (browser)"):
        assert float(timing[stage]) >= 0, stage
    assert float(timing["inference"]) > 0
    summary = page.locator("#timing-summary").inner_text()
    assert re.search(r"(within|over) the 33\.3 ms frame budget", summary), summary

    # The opacity slider changes the overlay, by keyboard too.
    page.focus("#opacity")
    page.keyboard.press("ArrowRight")
    assert page.locator("#opacity-value").inner_text() == "65%"
    assert page.evaluate("getComputedStyle(document.querySelector('#overlay')).opacity") == "0.65"

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-page.png"), full_page=True)

    # A file that is not an image: the API's message is shown, the last result stays.
    text = tmp_path / "notes.txt"
    text.write_text("this is not an image\n")
    page.set_input_files("#file", str(text))
    error = page.locator("#error")
    error.wait_for(state="visible", timeout=30_000)
    assert "400 (invalid_image)" in error.inner_text()
    assert "not a JPEG, PNG, WebP, BMP or TIFF file" in error.inner_text()
    assert page.get_attribute("#error", "role") == "alert"
    page.screenshot(path=str(ARTIFACTS / "web-page-error.png"), full_page=True)
    assert not [m for m in messages if "Content Security Policy" in m], messages
    page.close()


def open_with_key(browser, service):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(service.url + "/")
    page.evaluate(f"sessionStorage.setItem('bisenet-api-key', '{API_KEY}')")
    page.reload()
    page.locator("#model option").first.wait_for(state="attached", timeout=30_000)
    return page


def test_every_control_is_reached_with_the_tab_key(service, browser):
    page = open_with_key(browser, service)
    reached = []
    for _ in range(12):
        page.keyboard.press("Tab")
        reached.append(page.evaluate("document.activeElement.id"))
    for control in ("model", "file", "webcam", "opacity", "forget-key"):
        assert control in reached, reached
    assert reached.index("model") < reached.index("file") < reached.index("webcam") < reached.index("opacity")
    page.close()


def test_webcam_frames_are_sent_one_after_another(service, browser):
    page = open_with_key(browser, service)
    page.click("#webcam")
    caption = page.locator("#caption")
    caption.wait_for(state="visible", timeout=60_000)
    expect_frames = re.compile(r"webcam frame ([3-9]|\d\d+):")
    from playwright.sync_api import expect

    expect(caption).to_have_text(expect_frames, timeout=90_000)
    assert "frames/s from the webcam" in page.locator("#timing-summary").inner_text()
    page.keyboard.press("Escape")  # stops the camera
    expect(page.locator("#webcam")).to_be_visible()
    stopped_at = caption.inner_text()
    page.wait_for_timeout(1500)
    assert caption.inner_text() == stopped_at  # no frame after the stop (one may have been in flight)
    page.close()


def test_a_wrong_key_is_asked_for_again(service, browser):
    page = browser.new_page()
    page.goto(service.url + "/")
    page.evaluate("sessionStorage.setItem('bisenet-api-key', 'wrong')")
    page.reload()
    page.locator("#key-form").wait_for(state="visible", timeout=30_000)
    assert "refused" in page.locator("#key-note").inner_text()
    page.close()
