"""Screenshots of the demo page's four tabs for the docs, taken in headless Chromium (what the browser tests use).

    python bench/screenshots.py --checkpoint diffusion/checkpoints/epoch_002.pth --data-root DIR

writes docs/demo_sample.png, docs/demo_inpaint.png, docs/demo_interpolate.png and docs/demo_noise.png.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_demo import chromium_paths  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--out", default=str(ROOT / "docs"))
    args = parser.parse_args()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    server = subprocess.Popen([sys.executable, "-m", "diffusion.demo", "--checkpoint", args.checkpoint, "--port", "0",
                               "--data-root", args.data_root], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    url = server.stdout.readline().split(" at ")[1].split()[0]
    browser_path, driver_path = chromium_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = browser_path
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1500,1000"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    wait = WebDriverWait(browser, 300)
    try:
        browser.get(url)
        wait.until(lambda b: b.find_element("id", "recipe").text)

        def generate(name: str) -> None:
            done = int(browser.find_element("id", "result").get_attribute("data-done") or 0)
            browser.find_element("id", "run").click()
            wait.until(lambda b: int(b.find_element("id", "result").get_attribute("data-done") or 0) > done)
            browser.save_screenshot(str(Path(args.out) / f"demo_{name}.png"))

        def load_test_digit(index: int) -> None:
            browser.execute_script(f"document.getElementById('test-index').value = {index};")
            browser.find_element("id", "load-test").click()
            wait.until(lambda b: f"test digit {index}" in b.find_element("id", "upload-message").text)

        generate("sample")
        browser.find_element("css selector", "button[data-task=inpaint]").click()
        load_test_digit(3)
        generate("inpaint")
        browser.find_element("css selector", "button[data-task=interpolate]").click()
        generate("interpolate")
        browser.find_element("css selector", "button[data-task=forward]").click()
        load_test_digit(3)
        browser.execute_script("const s = document.getElementById('t'); s.value = 300; s.oninput();")
        wait.until(lambda b: b.find_element("id", "forward-image").get_attribute("data-t") == "300")
        browser.save_screenshot(str(Path(args.out) / "demo_noise.png"))
    finally:
        browser.quit()
        server.terminate()
    print(f"wrote {args.out}/demo_{{sample,inpaint,interpolate,noise}}.png")


if __name__ == "__main__":
    main()
