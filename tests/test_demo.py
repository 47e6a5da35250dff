"""The demo page: its server over HTTP, then the page itself in headless Chromium (selenium).

The browser tests need Chromium and its driver (Debian: apt-get install chromium chromium-driver); without
them they are skipped, except under CI=true, where a missing browser is a failure.
"""
import base64
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest
import torch
from PIL import Image

from diffusion.config import DataConfig
from diffusion.dataloader import load_images

from tests.conftest import ROOT, SAME_PRECISION, digit_png, inpainting_cells, png_pixels, run_cli

NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the server is on this machine


@pytest.fixture(scope="module")
def server(tiny_checkpoint, data_root):
    proc = subprocess.Popen([sys.executable, "-m", "diffusion.demo", "--checkpoint", str(tiny_checkpoint), "--port", "0",
                             "--data-root", str(data_root), *SAME_PRECISION], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert " at http://127.0.0.1:" in line, line + proc.stderr.read()
    yield line.split(" at ")[1].split()[0].rstrip("/")
    proc.terminate()
    _, err = proc.communicate(timeout=30)
    assert "Traceback" not in err, "every request this module sent, bad ones included, left stderr clean:\n" + err


def post(url: str, body, raw: bool = False) -> tuple[int, list[dict]]:
    data = body if raw else json.dumps(body).encode()
    try:
        request = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
        with NO_PROXY.open(request, timeout=120) as reply:
            return reply.status, [json.loads(line) for line in reply.read().splitlines() if line.strip()]
    except urllib.error.HTTPError as err:
        return err.code, [json.loads(err.read())]


def test_concurrent_runs_do_not_disturb_each_other(server):
    """Two tabs at once get exactly what each gets alone."""
    requests = [{"task": "sample", "digit": "3", "seed": "1"}, {"task": "interpolate", "digit": "5", "seed": "2"}]
    alone = [post(server + "/api/run", r)[1][-1]["png"] for r in requests]
    together = [None, None]

    def go(i):
        together[i] = post(server + "/api/run", requests[i])[1][-1]["png"]
    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone and alone[0] != alone[1]


@pytest.mark.parametrize("image,message", [
    (base64.b64encode(b"not an image").decode(), "not a PNG"),
    ("%%%", "not valid base64"),
    (None, "no image"),
])
def test_bad_uploads_get_a_message_and_the_server_keeps_serving(server, image, message):
    status, reply = post(server + "/api/upload", {"image": image})
    assert status == 400 and message in reply[0]["error"]
    status, reply = post(server + "/api/run", {"task": "sample", "seed": "0", "steps": "3"})
    assert status == 200 and reply[-1]["done"]


def test_wrong_size_and_huge_uploads_are_refused_before_decoding(server, tmp_path):
    wide = io.BytesIO()
    Image.new("L", (40, 28)).save(wide, format="PNG")
    status, reply = post(server + "/api/upload", {"image": base64.b64encode(wide.getvalue()).decode()})
    assert status == 400 and "40 x 28" in reply[0]["error"] and "square" in reply[0]["error"]
    status, reply = post(server + "/api/upload", b"x" * 9_000_000, raw=True)
    assert status == 413 and "at most" in reply[0]["error"]
    status, reply = post(server + "/api/run", {"task": "sample", "steps": "100000"})
    assert status == 400 and "exceeds" in reply[0]["error"]


# --- in a real browser ---

def chromium_paths() -> tuple[str, str] | None:
    browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver") if not os.environ.get("CI") else __import__(
        "selenium.webdriver", fromlist=["webdriver"])
    paths = chromium_paths()
    if paths is None:
        if os.environ.get("CI"):
            pytest.fail("CI needs Chromium and chromedriver for the demo's browser tests (apt-get install chromium "
                        "chromium-driver)")
        pytest.skip("no Chromium/chromedriver here")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=paths[1]), options=options)
    yield driver
    driver.quit()


def open_page(browser, server):
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server + "/")
    WebDriverWait(browser, 30).until(lambda b: b.find_element("id", "recipe").text)
    return WebDriverWait(browser, 120)


def run_and_wait(browser, wait):
    done = int(browser.find_element("id", "result").get_attribute("data-done") or 0)
    browser.find_element("id", "run").click()
    wait.until(lambda b: int(b.find_element("id", "result").get_attribute("data-done") or 0) > done
               or b.find_element("id", "error").text)
    assert not browser.find_element("id", "error").text
    return browser.find_element("id", "result").get_attribute("src")


def set_value(browser, element_id: str, value: str) -> None:
    from selenium.webdriver.support.ui import Select

    element = browser.find_element("id", element_id)
    if element.tag_name == "select":
        Select(element).select_by_value(value)
    else:
        element.clear()
        element.send_keys(value)


def test_page_streams_frames_and_ends_on_the_commands_images(browser, server, tiny_checkpoint, tmp_path):
    wait = open_page(browser, server)
    set_value(browser, "digit", "3")
    set_value(browser, "seed", "5")
    result = run_and_wait(browser, wait)
    frames = browser.execute_script("return window.demoFrames")
    assert len(set(frames)) >= 5, "the page shows the images as the sampler makes them"
    out = tmp_path / "cli.png"
    res = run_cli("diffusion.sampling", "--checkpoint", str(tiny_checkpoint), "--digit", "3", "--seed", "5",
                  "--output", str(out), *SAME_PRECISION)
    assert res.returncode == 0, res.stderr
    assert torch.equal(png_pixels(result), png_pixels(out))


def test_inpainting_on_the_page_keeps_the_uploaded_pixels(browser, server, tmp_path):
    wait = open_page(browser, server)
    path, image = digit_png(tmp_path)
    browser.find_element("css selector", "button[data-task=inpaint]").click()
    browser.find_element("id", "upload").send_keys(str(path))
    wait.until(lambda b: path.name in b.find_element("id", "upload-message").text)
    set_value(browser, "mask", "bottom")
    _, cells = inpainting_cells(png_pixels(run_and_wait(browser, wait)), 16, 4)
    assert all(torch.equal(cell[:14], image[:14]) for cell in cells), "the kept top half comes back unchanged"
    assert len({cell[14:].numpy().tobytes() for cell in cells}) > 1, "the bottom halves are generated, not copied"


def test_a_broken_upload_shows_a_message_and_the_page_keeps_working(browser, server, tmp_path):
    wait = open_page(browser, server)
    browser.find_element("css selector", "button[data-task=inpaint]").click()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    browser.find_element("id", "upload").send_keys(str(broken))
    wait.until(lambda b: "PNG" in b.find_element("id", "upload-message").text)
    assert "error" in browser.find_element("id", "upload-message").get_attribute("class")
    browser.find_element("css selector", "button[data-task=sample]").click()
    set_value(browser, "steps", "3")
    assert run_and_wait(browser, wait).startswith("data:image/png")


def test_a_drawn_digit_with_marked_pixels_comes_back_with_the_rest_unchanged(browser, server):
    from selenium.webdriver.common.action_chains import ActionChains

    wait = open_page(browser, server)
    browser.find_element("css selector", "button[data-task=inpaint]").click()
    pad = browser.find_element("id", "pad-box")
    browser.find_element("id", "clear").click()
    assert browser.find_element("id", "mask").get_attribute("value") == "bottom"
    set_value(browser, "mask", "painted")  # only what is marked below
    ActionChains(browser).move_to_element_with_offset(pad, -40, -80).click_and_hold().move_by_offset(60, 20) \
        .move_by_offset(0, 140).release().perform()  # a 7-like stroke
    browser.find_element("id", "tool-erase").click()
    ActionChains(browser).move_to_element_with_offset(pad, -100, 40).click_and_hold().move_by_offset(200, 0) \
        .move_by_offset(0, 40).move_by_offset(-200, 0).release().perform()  # mark a band across the bottom
    assert browser.find_element("id", "mask").get_attribute("value") == "painted"
    drawn = browser.execute_script(
        "const p = document.getElementById('pad').getContext('2d').getImageData(0, 0, 28, 28).data;"
        "const m = document.getElementById('maskpad').getContext('2d').getImageData(0, 0, 28, 28).data;"
        "return [Array.from({length: 784}, (_, i) => p[4 * i]), Array.from({length: 784}, (_, i) => m[4 * i + 3] > 0)];")
    image = torch.tensor(drawn[0], dtype=torch.uint8).view(28, 28)
    keep = torch.tensor(drawn[1]).view(28, 28).logical_not()
    assert image.max() == 255 and 0.5 < keep.float().mean() < 0.95, "a stroke was drawn and a band marked"
    _, cells = inpainting_cells(png_pixels(run_and_wait(browser, wait)), 16, 4)
    assert all(torch.equal(cell[keep], image[keep]) for cell in cells)
    assert any(not torch.equal(cell[~keep], image[~keep]) for cell in cells), "the marked band is generated"


def test_the_noise_tab_shows_q_sample_from_the_digit_to_noise(browser, server, data_root):
    """t = 0 is the test digit itself; at T - 1 the image has the statistics of N(0, I); the numbers are step t's."""
    from diffusion.diffusion_utils import make_schedule

    wait = open_page(browser, server)
    browser.find_element("css selector", "button[data-task=forward]").click()
    set_value(browser, "test-index", "7")
    browser.find_element("id", "load-test").click()
    wait.until(lambda b: "test digit 7" in b.find_element("id", "upload-message").text)
    images, _ = load_images(DataConfig(data_root=str(data_root)), train=False)
    schedule = make_schedule("cosine", 50)  # the tiny checkpoint's schedule and T
    for t in (0, 25, 49):
        browser.execute_script(f"const s = document.getElementById('t'); s.value = {t}; s.oninput();")
        wait.until(lambda b: b.find_element("id", "forward-image").get_attribute("data-t") == str(t))
        stats = json.loads(browser.find_element("id", "forward-image").get_attribute("data-stats"))
        pixels = png_pixels(browser.find_element("id", "forward-image").get_attribute("src")).float()
        assert stats["alpha_bar"] == pytest.approx(schedule.alpha_bar[t].item(), rel=1e-5)
        assert f"t = {t}" in browser.find_element("id", "forward-numbers").text
        if t == 0:
            noise = 127.5 * (1 - stats["alpha_bar"]) ** 0.5  # beta_1's faint noise, in pixel values
            assert (pixels - images[7, 0].float()).abs().mean() < 2 * noise, "at t = 0 the page shows the digit"
        if t == 49:
            assert abs(stats["mean"]) < 0.15 and abs(stats["std"] - 1) < 0.1, stats
            assert 0.25 < ((pixels == 0) | (pixels == 255)).float().mean() < 0.4, "N(0, 1) clipped at +-1 is 32%"


def test_the_sample_tab_shows_x0_and_the_page_says_which_command_draws_it(browser, server, tmp_path):
    import shlex

    wait = open_page(browser, server)
    assert not browser.find_element("id", "result").is_displayed(), "no broken image before the first run"
    assert "No images yet" in browser.find_element("id", "result-empty").text
    set_value(browser, "digit", "4")
    set_value(browser, "seed", "9")
    set_value(browser, "steps", "6")
    result = run_and_wait(browser, wait)
    x0_frames = browser.execute_script("return window.demoX0Frames")
    assert len(x0_frames) == len(browser.execute_script("return window.demoFrames")) >= 5
    assert len(set(x0_frames)) >= 3, "the guess of the clean digits changes as the sampler goes"
    assert browser.find_element("id", "save").get_attribute("href") == result
    words = shlex.split(browser.find_element("id", "command").text)
    assert words[:3] == ["python", "-m", "diffusion.sampling"] and "--steps" in words
    out = tmp_path / "same.png"
    res = run_cli(*words[2:], "--output", str(out), *SAME_PRECISION)
    assert res.returncode == 0, res.stderr
    assert torch.equal(png_pixels(result), png_pixels(out)), "the command the page shows draws its images"


def test_every_state_of_the_page_is_recoverable(browser, server):
    wait = open_page(browser, server)
    set_value(browser, "steps", "3")
    run_and_wait(browser, wait)
    set_value(browser, "guidance", "-1")
    browser.find_element("id", "run").click()
    wait.until(lambda b: b.find_element("id", "error").text)
    error = browser.find_element("id", "error").text
    assert "guidance w must be" in error and "--" not in error, "the page's own words, not command-line flags"
    assert browser.find_element("id", "status").text == "ready"
    assert not browser.find_element("id", "result").is_displayed(), "no stale images beside the error"
    set_value(browser, "guidance", "")
    set_value(browser, "steps", "5000")
    browser.find_element("id", "run").click()
    wait.until(lambda b: "steps" in b.find_element("id", "error").text)
    assert browser.find_element("id", "status").text == "ready"
    set_value(browser, "steps", "3")
    assert run_and_wait(browser, wait)
    browser.find_element("css selector", "button[data-task=interpolate]").click()
    assert not browser.find_element("id", "result").is_displayed(), "the sample grid is not squeezed into a row"
    browser.find_element("css selector", "button[data-task=inpaint]").click()
    set_value(browser, "mask", "top")
    browser.find_element("id", "clear").click()
    assert browser.find_element("id", "mask").get_attribute("value") == "bottom", "clear goes back to a half, not nothing"


def raw_request(server: str, method: str, path: str, headers: dict, body: bytes = b"") -> tuple[int, bytes]:
    """A request with exactly these headers (urllib would add its own Host)."""
    import http.client

    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    for name, value in headers.items():
        conn.putheader(name, value)
    conn.endheaders(body or None)
    reply = conn.getresponse()
    return reply.status, reply.read()


@pytest.mark.parametrize("headers,status", [
    ({"Host": "evil.example:80"}, 403),  # DNS rebinding: a foreign page reaching 127.0.0.1 under its own name
    ({"Origin": "http://evil.example"}, 403),  # another site's fetch or form
    ({"Origin": "null"}, 403),  # a sandboxed frame or a file
    ({"Content-Type": "text/plain"}, 415),  # a cross-site form post needs no preflight: refuse its content type
    ({"Content-Length": "abc"}, 411), ({"Content-Length": "-1"}, 411),
])
def test_the_server_answers_only_its_own_page(server, headers, status):
    own = {"Host": server.removeprefix("http://"), "Content-Type": "application/json"}
    body = json.dumps({"task": "sample", "steps": "2"}).encode()
    merged = {**own, **headers}
    merged.setdefault("Content-Length", str(len(body)))
    got, reply = raw_request(server, "POST", "/api/run", merged, body)
    assert got == status and b"error" in reply
    assert raw_request(server, "GET", "/api/info", {"Host": "evil.example"})[0] == 403


@pytest.mark.parametrize("request_body,needle", [
    ({"task": "sample", "resample": "1000000000"}, "resample must be"),
    ({"task": "sample", "seed": 2**64}, "seed must be in"), ({"task": "sample", "guidance": "nan"}, "finite"),
    ({"task": "sample", "digit": "abc"}, "digit must be a number"), ({"task": "sample", "digit": [1]}, "digit must be"),
    ({"task": "sample", "steps": "1e999"}, "steps must be"), ({"task": "interpolate", "eta": "1"}, "deterministic"),
])
def test_bad_or_unbounded_requests_get_a_400_with_one_line(server, request_body, needle):
    status, reply = post(server + "/api/run", request_body)
    assert status == 400 and needle in reply[0]["error"], reply
    status, reply = post(server + "/api/run", {"task": "sample", "steps": "2"})
    assert status == 200 and reply[-1]["done"] and "dpmpp-2" in reply[-1]["recipe"]


def test_pages_cannot_be_framed(server):
    with NO_PROXY.open(server + "/", timeout=30) as reply:
        assert reply.headers["X-Frame-Options"] == "DENY" and "frame-ancestors 'none'" in reply.headers["Content-Security-Policy"]


def test_a_run_stops_when_its_tab_goes_away(tiny_checkpoint):
    """The page's connection closes mid-run: the next frame's write fails, sampling stops there and the network
    is free for the next tab at once."""
    from diffusion import demo as demo_command
    from diffusion.cli import parse
    from diffusion.config import RuntimeConfig, SampleConfig

    _, configs = parse(demo_command.parser(), ["--checkpoint", str(tiny_checkpoint), *SAME_PRECISION])
    page = demo_command.Demo(tiny_checkpoint, configs[SampleConfig], configs[RuntimeConfig])
    sent = []

    def closed_after_three(message):
        if len(sent) == 3:
            raise BrokenPipeError(32, "Broken pipe")
        sent.append(message)

    with pytest.raises(BrokenPipeError):
        page.run({"sampler": "ddpm"}, closed_after_three)  # 50 steps of the tiny model's schedule
    assert [m["frame"] for m in sent] == [1, 2, 3]
    assert page.lock.acquire(blocking=False), "the network is free again"
    page.lock.release()


def test_a_closed_connection_leaves_the_server_serving(server):
    import socket

    host, port = server.removeprefix("http://").split(":")
    body = json.dumps({"sampler": "ddpm"}).encode()
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /api/run HTTP/1.1\r\nHost: %s:%s\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (host.encode(), port.encode(), len(body), body))
        assert s.recv(64).startswith(b"HTTP/1.0 200")  # the run started; the tab closes now
    status, reply = post(server + "/api/run", {"task": "sample", "steps": "2"})
    assert status == 200 and reply[-1]["done"]


@pytest.mark.parametrize("port", ["-1", "70000"])
def test_a_port_out_of_range_is_one_line(tiny_checkpoint, capsys, port):
    from tests.conftest import assert_clean_error, run_inprocess

    res = run_inprocess(capsys, "diffusion.demo", "--checkpoint", str(tiny_checkpoint), "--port", port)
    assert_clean_error(res, "--port must be in 0..65535")
