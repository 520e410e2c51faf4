"""The playground page in a real browser: headless Chromium (Debian's) driven by Selenium, against the real stack.

Uploads a rendered shapes-world image, asks a question whose answer is known, checks the answer
shown and that the heat map was drawn over the image, ranks captions, and checks that an API
error (a question over the token limit) is shown clearly. Also loads the page as a phone
would. Screenshots land in tests/artifacts/ (kept in CI output): playground.png (desktop),
playground-phone.png, playground-error.png, and playground-failure.png when a step fails.
"""

from __future__ import annotations

import base64
import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from serving.shapes import world
from tests.conftest import ARTIFACTS

pytestmark = pytest.mark.integration

CHROMEDRIVER = "/usr/bin/chromedriver"
WAIT_S = 90  # the first inference on a cold CPU stack can take a while


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    chromium = _chromium()
    if chromium is None or not os.access(CHROMEDRIVER, os.X_OK):
        pytest.skip(
            "Debian's chromium and chromium-driver are not installed (no chromium on PATH or no "
            f"{CHROMEDRIVER}): `apt-get install chromium chromium-driver`, as .ci/run does"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager never downloads a driver or a browser
    tmp = tmp_path_factory.mktemp("chromium")
    opts = Options()
    opts.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={tmp / 'profile'}",
        "--window-size=1280,1000",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp / "chromedriver.log"))
    drv = webdriver.Chrome(service=service, options=opts)
    drv.set_page_load_timeout(60)
    try:
        yield drv
    finally:
        drv.quit()


@pytest.fixture()
def page(driver: Any, serve_app: Any) -> Iterator[Any]:
    """The page loaded and ready; a screenshot and the console log are kept when the test fails."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    driver.get(serve_app.http_url + "/")
    wait(driver, lambda d: d.find_element("id", "health").text == "ready", "the page never showed the service ready")
    ok = False
    try:
        yield driver
        ok = True
    finally:
        if not ok:
            driver.save_screenshot(str(ARTIFACTS / "playground-failure.png"))
            lines = [f"{e['level']} {e['message']}" for e in driver.get_log("browser")]
            (ARTIFACTS / "playground-failure-console.log").write_text("\n".join(lines) + "\n")


def wait(driver: Any, cond: Any, message: str, timeout: float = WAIT_S) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(cond, message)


def type_lines(driver: Any, element_id: str, lines: list[str]) -> None:
    el = driver.find_element("id", element_id)
    el.clear()
    el.send_keys("\n".join(lines))


def canvas_signature(driver: Any) -> list[int]:
    """The canvas pixels summed per channel over a 16 x 16 grid of cells (enough to see an overlay)."""
    return driver.execute_script(
        """
        const c = document.getElementById("view"), d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
        const out = new Array(16 * 16 * 3).fill(0);
        for (let y = 0; y < c.height; y++) for (let x = 0; x < c.width; x++) {
          const i = 4 * (y * c.width + x), k = 3 * (Math.floor(16 * y / c.height) * 16 + Math.floor(16 * x / c.width));
          out[k] += d[i]; out[k + 1] += d[i + 1]; out[k + 2] += d[i + 2];
        }
        return out;
        """
    )


# A clear scene: a red circle and a blue square on a light background (rendered fresh by the test).
SCENE = world.Scene(
    (236, 232, 224),
    (
        world.ShapeObject("circle", "red", 0.16, 0.52, 0.26, (214, 52, 44)),
        world.ShapeObject("square", "blue", 0.58, 0.18, 0.24, (46, 84, 210)),
    ),
)
QUESTIONS = [
    world.QA("what color is the circle?", "red", "color_of_shape"),
    world.QA("what shape is the blue object?", "square", "shape_of_color"),
]
TRUE_CAPTION = world.caption(world.scene_items(SCENE))


def full_page_screenshot(driver: Any, path: Path) -> None:
    """The whole page, below the fold included (Chromium's DevTools protocol)."""
    driver.execute_script("window.scrollTo(0, 0)")  # sticky panels sit where they do at the top
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}
    )
    path.write_bytes(base64.b64decode(shot["data"]))


def upload(driver: Any, path: Path) -> None:
    driver.find_element("id", "file").send_keys(str(path))
    wait(driver, lambda d: path.name in d.find_element("id", "image-info").text, "the picked image never showed")


def test_ask_see_the_heat_map_rank_captions_and_read_errors(page: Any, tmp_path: Path) -> None:
    driver = page
    png = tmp_path / "shapes.png"
    png.write_bytes(world.encode(world.render(SCENE, 192, supersample=2), "PNG"))
    upload(driver, png)
    view = driver.find_element("id", "view")
    assert view.get_attribute("data-heatmap") is None
    before = canvas_signature(driver)

    # Ask: the answers shown are right, the heat map is drawn over the image, the tokens are listed.
    type_lines(driver, "questions", [qa.question for qa in QUESTIONS])
    driver.find_element("id", "ask").click()
    wait(driver, lambda d: d.find_elements("css selector", "#answers li"), "no answer was shown")
    items = driver.find_elements("css selector", "#answers li")
    assert len(items) == len(QUESTIONS)
    for li, qa in zip(items, QUESTIONS):
        assert li.get_attribute("data-answer") == qa.answer, f"{qa.question} → {li.text!r}, expected {qa.answer}"
        assert li.find_element("css selector", ".answer").text == qa.answer
        assert len(li.find_elements("css selector", ".topk-row")) == 3  # the top-k scores
    assert "selected" in items[0].get_attribute("class")
    assert view.get_attribute("data-heatmap") == "drawn" and view.get_attribute("data-grid") == "8x8"
    first = canvas_signature(driver)
    changed = sum(1 for i in range(0, len(first), 3) if first[i : i + 3] != before[i : i + 3])
    assert changed >= 16 * 16 // 2, f"the heat map changed only {changed} of 256 cells of the canvas"
    tokens = [t.text for t in driver.find_elements("css selector", "#tokens .token")]
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]" and "circle" in tokens, tokens
    assert driver.find_element("id", "ask-error").get_attribute("hidden") is not None
    # Picking the other answer draws its own map and lists its own tokens.
    items[1].find_element("css selector", "button").click()
    assert "selected" in items[1].get_attribute("class") and canvas_signature(driver) != first
    assert "blue" in [t.text for t in driver.find_elements("css selector", "#tokens .token")]
    items[0].find_element("css selector", "button").click()
    # The heat map toggles off (the plain image again) and on.
    driver.find_element("id", "show-heat").click()
    assert view.get_attribute("data-heatmap") is None and canvas_signature(driver) == before
    driver.find_element("id", "show-heat").click()
    assert view.get_attribute("data-heatmap") == "drawn" and canvas_signature(driver) == first

    # Rank captions: the true caption first.
    distractors = world.distractor_captions(SCENE, random.Random(7), 3)
    type_lines(driver, "captions", [*distractors, TRUE_CAPTION])
    driver.find_element("id", "rank").click()
    wait(driver, lambda d: len(d.find_elements("css selector", "#ranking li")) == 4, "no ranking was shown")
    ranked = [e.get_attribute("data-caption") for e in driver.find_elements("css selector", "#ranking li")]
    assert ranked[0] == TRUE_CAPTION, ranked
    full_page_screenshot(driver, ARTIFACTS / "playground.png")

    # An API error, shown clearly: HTTP status, the error code and the API's message, plus a hint.
    too_long = "is there a red circle and " * 12 + "a blue square?"
    type_lines(driver, "questions", [QUESTIONS[0].question, too_long])
    driver.find_element("id", "ask").click()
    err = wait(
        driver,
        lambda d: d.find_element("id", "ask-error").is_displayed() and d.find_element("id", "ask-error"),
        "no error was shown for a question over the token limit",
    )
    text = err.text
    assert "HTTP 422" in text and "schema_violation" in text and "over the limit" in text, text
    assert "Line 2" in text, text  # points at the offending line
    assert not driver.find_elements("css selector", "#answers li")  # no stale answers beside the error
    assert view.get_attribute("data-heatmap") is None
    assert driver.find_element("id", "ask").is_enabled()
    driver.save_screenshot(str(ARTIFACTS / "playground-error.png"))

    # Nothing blocked by the page's Content-Security-Policy, nothing fetched from elsewhere.
    logs = [e["message"] for e in driver.get_log("browser")]
    assert not [m for m in logs if "Content Security Policy" in m or "ERR_NAME" in m], logs


def test_phone_sized_screen(page: Any, tmp_path: Path) -> None:
    """At 390 x 844 CSS px the page fits the width (no sideways scrolling) and still answers."""
    driver = page
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": True}
    )
    driver.refresh()
    wait(driver, lambda d: d.find_element("id", "health").text == "ready", "the page never showed the service ready")
    png = tmp_path / "phone.png"
    png.write_bytes(world.encode(world.render(SCENE, 128), "PNG"))
    upload(driver, png)
    qa = QUESTIONS[0]
    type_lines(driver, "questions", [qa.question])
    driver.find_element("id", "ask").click()
    wait(driver, lambda d: d.find_elements("css selector", "#answers li"), "no answer was shown")
    assert driver.find_element("css selector", "#answers li").get_attribute("data-answer") == qa.answer
    assert driver.find_element("id", "view").get_attribute("data-heatmap") == "drawn"
    width = driver.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
    assert width[0] <= width[1], f"the page is {width[0]} px wide on a {width[1]} px screen"
    # Touch targets: buttons at least ~40 CSS px tall.
    heights = driver.execute_script(
        "return [...document.querySelectorAll('.row button, .row .button')].map(b => b.getBoundingClientRect().height)"
    )
    assert heights and min(heights) >= 40, heights
    full_page_screenshot(driver, ARTIFACTS / "playground-phone.png")


def test_caption_streams_into_the_page(page: Any, tmp_path: Path) -> None:
    """Caption: the text grows event by event (each shown text a prefix of the next) and names the scene's objects."""
    driver = page
    png = tmp_path / "caption.png"
    png.write_bytes(world.encode(world.render(SCENE, 192, supersample=2), "PNG"))
    upload(driver, png)
    # Record every text the page shows while the caption streams in.
    driver.execute_script(
        """
        const el = document.getElementById('caption-text');
        const desc = Object.getOwnPropertyDescriptor(Node.prototype, 'textContent');
        window.__captionTexts = [];
        Object.defineProperty(el, 'textContent', {
          configurable: true,
          get() { return desc.get.call(this); },
          set(v) { window.__captionTexts.push(v); desc.set.call(this, v); },
        });
        """
    )
    driver.find_element("id", "caption").click()
    out = wait(driver, lambda d: (e := d.find_element("id", "caption-text")).get_attribute("data-state") == "done"
               and e, "the caption never finished")
    shown = [t for t in driver.execute_script("return window.__captionTexts") if t]
    final = out.text
    assert len(set(shown)) >= 2 and shown[-1] == final, shown
    assert all(b.startswith(a) for a, b in zip(shown, shown[1:])), shown  # it only grew
    assert world.caption_matches(final, SCENE), final  # tiny's decoder names the red circle and the blue square
    assert out.get_attribute("data-finish-reason") in ("stop", "length")
    assert int(out.get_attribute("data-tokens")) >= 1 and int(out.get_attribute("data-events")) >= 1
    assert driver.find_element("id", "caption-error").get_attribute("hidden") is not None
    assert driver.find_element("id", "caption").is_enabled()
    assert not driver.find_element("id", "caption-stop").is_enabled()
    full_page_screenshot(driver, ARTIFACTS / "playground-caption.png")
