"""The text-to-image app served for real on a free loopback port: driven with gradio_client (generation judged by
the ShapesWorld oracle, streaming, limits, cancelling, 16 concurrent requests) and in headless Chromium; and launched
as `clipguide app` / `python -m apps.text2image`.

The oracle test needs the shipped ShapesWorld diffusion model (clipguide/weights/diffusion-shapes/), or another
pipeline folder named by CLIPGUIDE_TEST_DIFFUSION_MODEL; without one it fails and says so. The other tests serve a
tiny random diffusion model in that case, since they check the app, not the picture.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from PIL import Image

from apps.text2image import SHIPPED_DIFFUSION, Limits, Text2Image, launch, read_metadata
from core_clip import shapes
from tests.apps.conftest import inputs, wait_until

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("CLIPGUIDE_TEST_ARTIFACTS", ROOT / "tests" / "artifacts"))
DIFFUSION_MODEL = Path(os.environ.get("CLIPGUIDE_TEST_DIFFUSION_MODEL") or SHIPPED_DIFFUSION)
LIMITS = Limits(max_steps=60, max_size=64, max_batch=2, concurrency=1, queue_size=4)
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@pytest.fixture(scope="module")
def outbound():
    """Every non-loopback address this process connects to while the module runs (must stay empty)."""
    seen: list = []
    original = socket.socket.connect, socket.socket.connect_ex

    def record(address):
        if isinstance(address, tuple) and not is_loopback(str(address[0])):
            seen.append(address)

    def connect(self, address):
        record(address)
        return original[0](self, address)

    def connect_ex(self, address):
        record(address)
        return original[1](self, address)

    socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
    yield seen
    socket.socket.connect, socket.socket.connect_ex = original


@dataclass
class Server:
    url: str
    app: Text2Image
    model: Path


@pytest.fixture(scope="module")
def server(outbound, tiny_diffusion_folder):
    model = DIFFUSION_MODEL if (DIFFUSION_MODEL / "model_index.json").is_file() else tiny_diffusion_folder
    port = free_port()
    demo = launch("127.0.0.1", port, block=False, quiet=True, limits=LIMITS, diffusion_model=model, preview_every=2)
    yield Server(f"http://127.0.0.1:{port}/", demo.clipguide_app, model)
    demo.close()
    assert outbound == [], f"the app or its client connected outside loopback: {outbound}"


@pytest.fixture(scope="module")
def client(server, tmp_path_factory):
    return Client(server.url, verbose=False, analytics_enabled=False,
                  download_files=str(tmp_path_factory.mktemp("client")))


def request(**overrides) -> dict:
    """Inputs of the /generate endpoint (the session's gallery state is not part of the API)."""
    values = inputs(**overrides)
    values.pop("history")
    return values


def test_generation_is_what_the_prompt_asked_for(server, client):
    assert server.model == DIFFUSION_MODEL, (
        f"no ShapesWorld diffusion model at {DIFFUSION_MODEL}: ship clipguide/weights/diffusion-shapes/ (or point "
        "CLIPGUIDE_TEST_DIFFUSION_MODEL at a trained pipeline folder)")
    # One of the seen-pair prompts that the shipped model draws right with the app's settings (`python -m
    # clipguide.evaluate --backend diffusion` case 6, seed 6); guided, it gets 93% of them fully right so far
    # (issue 6), so this checks the whole path from the browser API to the PNG, not the model's general quality.
    image, gallery, status, files, seed = client.predict(
        **request(prompt="a yellow circle on a blue background", backend="diffusion", steps=50, size=32, seed=6,
                  cutn=16, scheduler="ddpm"), api_name="/generate")
    assert status.startswith("Done: 1 image(s)") and seed == 6
    picture = np.asarray(Image.open(files[0]).convert("RGB"))
    assert picture.shape == (32, 32, 3)
    reading = shapes.read(picture)
    assert (reading["color"], reading["shape"], reading["background"]) == ("yellow", "circle", "blue"), reading


def test_previews_stream_and_pngs_carry_their_settings(server, client):
    start = time.perf_counter()
    job = client.submit(**request(backend="diffusion", steps=12, size=16, random_seed=True, cutn=4,
                                  scheduler="ddim"), api_name="/generate")
    first_preview = None
    while not job.done():
        if first_preview is None and any(isinstance(o[0], str) for o in job.outputs()):
            first_preview = time.perf_counter() - start
        time.sleep(0.01)
    image, gallery, status, files, seed = job.result()
    total = time.perf_counter() - start
    outputs = job.outputs()
    previews = [o for o in outputs[1:-1] if isinstance(o[0], str)]
    shown = [int(o[2].split()[1].split("/")[0]) for o in previews]   # "Step k/12 (...)", every 2nd step
    # at 16 px the shipped model's pictures score low, so guide() may redraw them: steps count on through retries
    redrawn = re.search(r"after (\d+) retr", status)
    retries = int(redrawn.group(1)) if redrawn else 0
    assert shown == sorted(set(shown)) and set(shown) <= set(range(2, 12 * (retries + 1) + 1, 2))
    assert shown[-1] == 12 * (retries + 1)
    assert first_preview is not None and first_preview < total
    assert outputs[0][4] == seed and 0 <= seed < 2**31           # the random seed is shown at once
    record = read_metadata(files[0])                             # the downloaded PNG, metadata intact
    assert (record["seed"], record["steps"], record["backend"], record["scheduler"]) == (seed, 12, "diffusion", "ddim")
    caption = gallery[0]["caption"]
    assert caption.startswith("CLIP ") and f"seed {seed}" in caption
    assert abs(float(caption.split()[1]) - record["clip_score"]) <= 0.051
    print(f"\ntime to first preview {first_preview:.2f} s, to final image {total:.2f} s (tiny settings)")


def test_server_side_limits_answer_with_a_message(server, client):
    for overrides, message in [(dict(steps=61), "maximum value 60"),
                               (dict(prompt=" | ".join(["a circle"] * 9)), "at most 8 prompt items"),
                               (dict(seed=2**31), "greater than maximum value 2147483647"),
                               (dict(prompt=" "), "Enter a prompt"),
                               (dict(clip=["ViT-B-32"]), "ViT-B-32")]:
        with pytest.raises(AppError, match=message.replace("(", r"\(")):
            client.predict(**request(**overrides), api_name="/generate")


def test_cancelling_a_job_stops_the_guide_loop(server, client):
    job = client.submit(**request(steps=60, size=32, cutn=4), api_name="/generate")
    assert wait_until(lambda: any(isinstance(o[0], str) for o in job.outputs()), 60)
    (run,) = server.app.active_runs()
    job.cancel()
    run.thread.join(timeout=15)
    assert not run.thread.is_alive() and run.stopped and run.steps_done < 60
    assert wait_until(lambda: server.app.active_runs() == [], 15)


def test_stop_endpoint_stops_this_sessions_run(server, client):
    job = client.submit(**request(steps=60, size=32, cutn=4), api_name="/generate")
    assert wait_until(lambda: any(isinstance(o[0], str) for o in job.outputs()), 60)
    (run,) = server.app.active_runs()
    assert client.predict(api_name="/stop") == "Stopping..."     # the Stop button's own handler (gr.Request session)
    run.thread.join(timeout=15)
    assert not run.thread.is_alive() and run.stopped and run.steps_done < 60
    assert wait_until(lambda: server.app.active_runs() == [], 15)
    assert client.predict(api_name="/stop") == "Nothing to stop."


def test_16_concurrent_requests_complete_or_are_refused(server, client):
    start = time.perf_counter()
    jobs = [client.submit(**request(steps=6, size=32, cutn=4, seed=i), api_name="/generate") for i in range(16)]
    done, refused = [], []
    for job in jobs:
        try:
            done.append(job.result(timeout=120))
        except Exception as e:   # noqa: BLE001  (sorted below: only the queue-full refusal is allowed)
            assert "Queue is full" in str(e), repr(e)
            refused.append(e)
    seconds = time.perf_counter() - start
    assert len(done) + len(refused) == 16
    assert all(r[2].startswith("Done: 1 image(s)") and len(r[3]) == 1 for r in done)
    assert len(done) >= LIMITS.queue_size and refused, (len(done), len(refused))
    assert seconds < 120
    after = client.predict(**request(steps=1, size=16), api_name="/generate")     # the server still answers
    assert after[2].startswith("Done")
    assert server.app.active_runs() == []
    print(f"\n16 concurrent requests: {len(done)} done, {len(refused)} refused (queue full) in {seconds:.1f} s")


# ----------------------------------------------------------------------------------------------------- browser

def chromium(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    assert Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file(), (
        "headless Chromium is needed: apt-get install -y chromium chromium-driver (see .ci/run)")
    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1250", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def test_browser_types_a_prompt_and_gets_an_image(server, tmp_path, monkeypatch):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    monkeypatch.setenv("SE_OFFLINE", "true")          # never let Selenium Manager look for a driver online
    driver = chromium(tmp_path)
    try:
        driver.get(server.url)
        wait = WebDriverWait(driver, 60, poll_frequency=0.05)
        prompt = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#prompt textarea"))
        prompt.send_keys(Keys.CONTROL, "a")
        prompt.send_keys("a red circle on a blue background")
        steps = driver.find_element(By.CSS_SELECTOR, "#steps input[type=number]")
        steps.send_keys(Keys.CONTROL, "a")
        steps.send_keys("16", Keys.TAB)
        assert "text:weight:stop" in driver.page_source                 # the prompt syntax is explained
        start = time.perf_counter()
        driver.find_element(By.CSS_SELECTOR, "#generate").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#preview img"))
        first_preview = time.perf_counter() - start
        status = driver.find_element(By.CSS_SELECTOR, "#status textarea")
        WebDriverWait(driver, 120, poll_frequency=0.05).until(
            lambda d: status.get_attribute("value").startswith("Done"))
        total = time.perf_counter() - start
        assert "16 steps" in status.get_attribute("value")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gallery img"))
        assert "CLIP " in driver.find_element(By.CSS_SELECTOR, "#gallery").text
        time.sleep(0.5)                                                 # let the last frame paint
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "app.png"))
        requests = [json.loads(entry["message"])["message"] for entry in driver.get_log("performance")]
        # every request made by our page (the browser's own new-tab page, chrome://..., is not ours)
        urls = [m["params"]["request"]["url"] for m in requests if m["method"] == "Network.requestWillBeSent"
                and m["params"].get("documentURL", "").startswith(server.url)]
        urls += [m["params"]["url"] for m in requests if m["method"] == "Network.webSocketCreated"]
    finally:
        driver.quit()
    # the page talks to the app only
    outside = [u for u in urls if urlparse(u).scheme not in ("data", "blob") and urlparse(u).hostname != "127.0.0.1"]
    assert any(urlparse(u).hostname == "127.0.0.1" for u in urls) and outside == [], outside[:5]
    assert Image.open(ARTIFACTS / "app.png").size[0] >= 1000
    print(f"\nbrowser: first preview {first_preview:.2f} s, final image {total:.2f} s after clicking Generate")


# --------------------------------------------------------------------------------------------------------- CLI

def listening_addresses(port: int) -> set[str]:
    """Local addresses of the TCP sockets listening on ``port`` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:      # 0A: LISTEN
                raw = bytes.fromhex(address)
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))   # per-word little endian
                found.add(str(ipaddress.ip_address(raw)))
    return found


def test_app_commands_serve_on_loopback(tmp_path):
    commands = {"clipguide app": [str(Path(sys.executable).with_name("clipguide")), "app"],
                "python -m apps.text2image": [sys.executable, "-m", "apps.text2image"]}
    env = {**os.environ, "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}
    procs = {}
    try:
        for name, command in commands.items():
            port = free_port()
            procs[name] = (port, subprocess.Popen([*command, "--port", str(port)], cwd=ROOT, env=env,
                                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        for name, (port, proc) in procs.items():
            def up() -> bool:
                assert proc.poll() is None, f"{name} exited: {proc.communicate()[0][-2000:]}"
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
                        return response.status == 200 and b"clipguide" in response.read()
                except OSError:
                    return False
            assert wait_until(up, 120), name
            assert listening_addresses(port) == {"127.0.0.1"}, name
    finally:
        for port, proc in procs.values():
            proc.send_signal(signal.SIGINT)
        for port, proc in procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
