"""The demo page end to end in headless Chromium (Debian's `chromium` + `chromium-driver`, driven by
Selenium): upload, a moving progress bar, a playable WAV in <audio>, the spectrogram, the API's error for
a text file posing as an image, all under its Content-Security-Policy (no violation logged); the API key
kept for the tab only unless "remember" is ticked. Screenshots go to tests/output/."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from servers import SAMPLE_IMAGE

selenium = pytest.importorskip("selenium")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

OUTPUT = Path(__file__).resolve().parents[1] / "output"
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="needs Debian's chromium and chromium-driver")
DESKTOP, PHONE = (1280, 1000), (390, 844)


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--autoplay-policy=no-user-gesture-required"):  # fmt: skip
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, where CSP reports land
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_window_size(*DESKTOP)
    OUTPUT.mkdir(exist_ok=True)
    yield driver
    driver.quit()


def fill_and_submit(browser, image: Path, caption: str, *, steps: int | None = None) -> None:
    browser.find_element(By.ID, "image").send_keys(str(image))
    caption_box = browser.find_element(By.ID, "caption")
    caption_box.clear()
    caption_box.send_keys(caption)
    if steps is not None:
        browser.find_element(By.CSS_SELECTOR, "#advanced summary").click()
        browser.find_element(By.ID, "steps").send_keys(str(steps))
        browser.find_element(By.ID, "seed").send_keys("1234")
    browser.find_element(By.ID, "submit").click()


def test_upload_watch_progress_play_and_see_the_spectrogram(live_stack, browser):
    browser.get(f"{live_stack.base_url}/")
    assert browser.title.startswith("MelFusion")
    fill_and_submit(browser, SAMPLE_IMAGE, "warm strings under a lighthouse", steps=150)
    assert browser.find_element(By.ID, "preview").get_attribute("src").startswith("blob:")
    seen = set()
    deadline = time.monotonic() + 600  # 150 steps took 174 s on 2 cores at load average 10
    while not browser.find_element(By.ID, "audio").get_attribute("src") and time.monotonic() < deadline:
        seen.add(float(browser.find_element(By.ID, "progress").get_attribute("value")))
        if 0 < max(seen) < 1 and not (OUTPUT / "demo-progress.png").exists():
            browser.save_screenshot(str(OUTPUT / "demo-progress.png"))
        time.sleep(0.05)
    assert len({value for value in seen if 0 < value < 1}) >= 2, f"the bar did not move: {sorted(seen)}"
    assert browser.find_element(By.ID, "audio").get_attribute("src"), "no clip within the deadline"

    audio = browser.find_element(By.ID, "audio")
    metadata = browser.execute_async_script(
        """const [audio, done] = arguments;
        const report = () => done({duration: audio.duration, error: audio.error && audio.error.code});
        if (audio.readyState >= 1) report(); else { audio.onloadedmetadata = report; audio.onerror = report; }""",
        audio,
    )
    assert metadata["error"] is None and metadata["duration"] > 4  # the WAV decodes in the browser (5 s clip)
    content_type = browser.execute_async_script(
        "fetch(arguments[0]).then(r => arguments[1](r.headers.get('content-type')))", audio.get_attribute("src")
    )
    assert content_type == "audio/wav"
    WebDriverWait(browser, 20).until(
        lambda b: b.execute_script("const i = document.getElementById('spectrogram'); return i.complete && i.naturalWidth")
    )
    assert browser.find_element(By.ID, "seed-used").text == "1234"
    assert "warm strings" in browser.find_element(By.ID, "history-list").text
    save_whole_page(browser, "demo-desktop.png", width=DESKTOP[0])
    save_whole_page(browser, "demo-phone.png", width=PHONE[0])
    assert browser.execute_script("return document.documentElement.scrollWidth") <= PHONE[0]  # no sideways scroll
    browser.set_window_size(*DESKTOP)
    refused = [entry["message"] for entry in browser.get_log("browser")
               if "Content Security Policy" in entry["message"]]  # fmt: skip
    assert not refused, refused  # everything the page did was within its policy


def save_whole_page(browser, name: str, *, width: int) -> None:
    browser.set_window_size(width, 800)
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(width, height)
    browser.save_screenshot(str(OUTPUT / name))


def test_a_text_file_posing_as_an_image_shows_the_apis_error_by_the_image_field(live_stack, browser, tmp_path):
    fake = tmp_path / "not-really.png"
    fake.write_text("this is not a picture")
    browser.get(f"{live_stack.base_url}/")
    fill_and_submit(browser, fake, "should fail")
    error = WebDriverWait(browser, 20).until(lambda b: b.find_element(By.ID, "error-image").text)
    assert error == "image must be JPEG, PNG or WebP (judged from its bytes)"  # the API's message, verbatim
    browser.save_screenshot(str(OUTPUT / "demo-error.png"))


def test_the_api_key_stays_with_the_tab_unless_remembered(live_stack, browser):
    stored = lambda: browser.execute_script(  # noqa: E731
        "return [sessionStorage.getItem('melfusion.apiKey'), localStorage.getItem('melfusion.apiKey')]")
    browser.get(f"{live_stack.base_url}/")
    browser.find_element(By.ID, "api-key").send_keys("tab-only-key")
    fill_and_submit(browser, SAMPLE_IMAGE, "key for this tab", steps=2)  # the live stack takes any key
    WebDriverWait(browser, 20).until(lambda b: stored()[0])
    assert stored() == ["tab-only-key", None]
    WebDriverWait(browser, 120).until(lambda b: b.find_element(By.ID, "submit").is_enabled())  # that job ended
    browser.find_element(By.ID, "remember-key").click()
    fill_and_submit(browser, SAMPLE_IMAGE, "key remembered")
    WebDriverWait(browser, 20).until(lambda b: stored()[1])
    assert stored() == [None, "tab-only-key"]
    browser.get(f"{live_stack.base_url}/")  # a later visit finds it, and the box still ticked
    assert browser.find_element(By.ID, "api-key").get_attribute("value") == "tab-only-key"
    assert browser.find_element(By.ID, "remember-key").is_selected()
    browser.execute_script("localStorage.removeItem('melfusion.apiKey')")


def test_caption_only_with_variations_and_a_negative_caption(live_stack, browser):
    browser.get(f"{live_stack.base_url}/")
    browser.find_element(By.ID, "caption").send_keys("soft rain on a tin roof")
    browser.find_element(By.CSS_SELECTOR, "#advanced summary").click()
    for name, value in (("negative_caption", "drums"), ("num_outputs", "2"), ("steps", "2"), ("seed", "7"),
                        ("seconds", "")):  # fmt: skip
        box = browser.find_element(By.ID, name)
        box.clear()
        box.send_keys(value)
    browser.find_element(By.ID, "submit").click()
    WebDriverWait(browser, 300).until(lambda b: b.find_element(By.ID, "audio").get_attribute("src"))
    extra = WebDriverWait(browser, 20).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#more-outputs audio"))
    first = browser.find_element(By.ID, "audio").get_attribute("src")
    assert len(extra) == 1 and extra[0].get_attribute("src") != first
    assert "seed 8" in browser.find_element(By.ID, "more-outputs").text
    assert "kept until" in browser.find_element(By.ID, "expires").text


def test_an_mp3_loop_at_a_chosen_loudness(live_stack, browser):
    browser.get(f"{live_stack.base_url}/")
    browser.find_element(By.ID, "caption").send_keys("a drum loop")
    browser.find_element(By.CSS_SELECTOR, "#format option[value='mp3']").click()
    browser.find_element(By.ID, "loop").click()
    browser.find_element(By.CSS_SELECTOR, "#advanced summary").click()
    for name, value in (("seconds", "2"), ("steps", "2"), ("loudness_lufs", "-16")):
        box = browser.find_element(By.ID, name)
        box.clear()
        box.send_keys(value)
    browser.find_element(By.ID, "submit").click()
    audio = WebDriverWait(browser, 300).until(lambda b: b.find_element(By.ID, "audio").get_attribute("src") and
                                              b.find_element(By.ID, "audio"))  # fmt: skip
    content_type = browser.execute_async_script(
        "fetch(arguments[0]).then(r => arguments[1](r.headers.get('content-type')))", audio.get_attribute("src")
    )
    assert content_type == "audio/mpeg"
    duration = browser.execute_async_script(
        """const [audio, done] = arguments;
        if (audio.readyState >= 1) done(audio.duration); else audio.onloadedmetadata = () => done(audio.duration);""",
        audio,
    )
    assert 1.9 < duration < 2.2  # the browser decodes the MP3: a 2 s loop (50 frames of 40 ms)
    link = browser.find_element(By.ID, "download")
    assert link.text == "Download MP3" and link.get_attribute("download").endswith(".mp3")
