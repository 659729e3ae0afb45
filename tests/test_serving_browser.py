"""The voice page in headless Chromium: a fake microphone (an espeak wav) talks to /v1/realtime; the page receives
the spoken answer, plays it through its AudioWorklet and shows the transcript. The screenshot is saved as
``voice_page.png`` in the test's ``tmp_path`` (pytest prints nothing for it: see the path in the assertion message
or under ``/tmp/pytest-of-$USER/pytest-current/test_voice_page_*``)."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pytest
import soundfile
import soxr

from conftest import espeak_wav
from mini_omni2.serving.app import create_app
from mini_omni2.serving.background import BackgroundServer
from serving_helpers import NAME, wait_until_idle

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def microphone_wav(tmp_path) -> str:
    """1 s of silence, the spoken question, 8 s of silence (the answer is played while the 'user' is quiet)."""
    speech, rate = soundfile.read(espeak_wav("Hello, what is your name?", tmp_path / "speech.wav"), dtype="float32")
    speech = soxr.resample(speech, rate, 48000)
    silence = np.zeros(48000, dtype=np.float32)
    path = tmp_path / "microphone.wav"
    soundfile.write(str(path), np.concatenate([silence, speech, *[silence] * 8]), 48000, subtype="PCM_16")
    return str(path)


def chromium(tmp_path, microphone: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.fail("chromium and chromedriver are needed (apt-get install chromium chromium-driver; .ci/run does)")
    options = Options()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={microphone}%noloop", "--autoplay-policy=no-user-gesture-required",
        "--disable-background-networking", "--disable-component-update", "--no-first-run",
        f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=900,700",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console, for console_errors
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def console_errors(driver) -> list[str]:
    """The page's console errors so far (failed requests included)."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def wait_for(driver, script: str, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        value = driver.execute_script(script)
        if value:
            return value
        if time.monotonic() > deadline:
            state = driver.execute_script("return JSON.stringify(window.omni)")
            raise AssertionError(f"timed out waiting for {script!r}; page state: {state}")
        time.sleep(0.1)


def test_voice_page_talks_and_plays_the_answer(model, processor, tmp_path):
    app = create_app(model, processor, NAME, codec_noise=False, random_weights=True)
    with BackgroundServer(app) as server:
        driver = chromium(tmp_path, microphone_wav(tmp_path))
        try:
            driver.get(server.url + "/?max_output_tokens=24&silence_ms=400")
            wait_for(driver, "return document.getElementById('model').textContent.includes('tiny-random')", 20)
            assert "RANDOM" in driver.find_element("id", "warning").text
            driver.find_element("id", "talk").click()
            wait_for(driver, "return window.omni.responses >= 1", 60)
            wait_for(driver, "return window.omni.played > 0", 20)  # the worklet played the answer
            screenshot = tmp_path / "voice_page.png"
            assert driver.save_screenshot(str(screenshot)), screenshot
            assert screenshot.stat().st_size > 0, f"screenshot at {screenshot}"
            omni = driver.execute_script("return window.omni")
            events = omni["events"]
            assert events.index("input_audio_buffer.speech_started") < events.index("response.created")
            assert omni["audioBytes"] > 0 and omni["transcript"]
            shown = driver.execute_script("return document.querySelector('.turn.assistant').textContent")
            assert shown == omni["transcript"]  # the live transcript shows what was streamed
            assert "speech" in driver.find_element("css selector", ".turn.user").text
            assert driver.find_element("id", "error").text == ""
            assert console_errors(driver) == []  # no failed request (a favicon, a script) and no script error
        finally:
            driver.quit()
        wait_until_idle(server.url)
