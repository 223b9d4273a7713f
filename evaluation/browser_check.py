"""Drive the web demo in a real browser (Debian's headless Chromium + ChromeDriver, through Selenium).

    python -m evaluation.browser_check --url http://127.0.0.1:7860 --prompt "calm solo piano" \
        [--duration 10] [--screenshot docs/demo.png]

Opens the page, types the prompt, sets the duration, clicks Generate, waits for the result's
audio player to hold audio, decodes that file in the page (Web Audio) and prints its duration in
seconds (what the tests check); with --screenshot it saves the page as a PNG (the README's picture).
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from common.errors import UserError, run_cli

# Without the background-networking flags Chromium keeps reaching for Google's hosts, which a closed network refuses.
CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                  "--no-first-run", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--window-size=1280,1000"]
# The result player's file, decoded by the page's own Web Audio: the duration of what it plays.
AUDIO_LINK = "const a = document.querySelector('#result a[download]'); return a ? a.href : null;"
DECODED_SECONDS = """const done = arguments[arguments.length - 1];
fetch(arguments[0]).then(r => r.arrayBuffer()).then(b => new OfflineAudioContext(1, 1, 24000).decodeAudioData(b))
  .then(a => done(a.duration)).catch(e => done('error: ' + e));"""


def browser(user_data: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        raise UserError("needs Debian's chromium and chromium-driver (./install.sh --dev installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={user_data}"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


def check_page(url: str, prompt: str, duration: float, screenshot: Path | None = None, timeout: float = 300) -> float:
    """-> the duration (s) of the audio the page plays after generating from `prompt`."""
    import tempfile

    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    with tempfile.TemporaryDirectory() as profile:
        b = browser(profile)
        try:
            b.get(url)
            wait = WebDriverWait(b, 60)
            box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea"))
            box.send_keys(prompt)
            seconds = b.find_element(By.CSS_SELECTOR, "#duration input[type=number]")
            seconds.send_keys(Keys.CONTROL, "a")
            seconds.send_keys(f"{duration:g}", Keys.TAB)
            time.sleep(0.5)
            b.find_element(By.CSS_SELECTOR, "#generate").click()
            link = WebDriverWait(b, timeout).until(lambda d: d.execute_script(AUDIO_LINK))
            b.set_script_timeout(60)
            played = b.execute_async_script(DECODED_SECONDS, link)
            if not isinstance(played, (int, float)):
                raise UserError(f"the page's audio did not decode: {played}")
            if screenshot is not None:
                time.sleep(1.0)   # let the spectrogram image load
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                b.save_screenshot(str(screenshot))
            return float(played)
        finally:
            b.quit()


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m evaluation.browser_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:7860")
    ap.add_argument("--prompt", default="a calm solo piano piece in C major")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--screenshot", type=Path, default=None)
    args = ap.parse_args()
    print(f"the page played {check_page(args.url, args.prompt, args.duration, args.screenshot):.2f} s of audio")


if __name__ == "__main__":
    run_cli(main)
