"""`dpsynth explore`: seconds until one volume is on the page, through the real server.

Starts `dpsynth explore RUN` (a subprocess, as a user would), posts generations at the
page's default sampler settings with a few conditions and seeds, and reports the median and
worst round trip (HTTP + JSON included) and the server-side generation time. With
`--policies PASSIVE,ACTIVE` it compares OpenMP wait policies, one server after the other.
With `--selector DIR --candidates 1,4` one server serves plain draws and the best of 4 in
turn, volume by volume, so both see the same machine. With `--screenshot PNG` it also
drives the page in headless Chromium and saves a picture.

    python benchmarks/bench_explore.py --run src/dpsynth/assets/demo/ldm [--n 10]
        [--referee DIR] [--policies PASSIVE,ACTIVE] [--selector DIR --candidates 1,4]
        [--screenshot docs/explore.png]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CONDITIONS = [
    {"ESED": 1, "LVEDV": 120.0},
    {"ESED": 0, "LVESV": 60.0, "SEX": 1},
    {"ESED": 1, "LVEDV": 250.0, "RVEDV": 220.0},
    {},
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(
    run: str, referee: str | None, selector: str | None, policy: str
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "dpsynth", "explore", run, "--port", str(port)]
    if referee:
        cmd += ["--referee", referee]
    if selector:
        cmd += ["--selector", selector]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_WAIT_POLICY": policy})
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(url + "/api/info", timeout=5).read()
            return proc, url
        except OSError:
            if proc.poll() is not None:
                raise SystemExit("the explorer did not start") from None
            time.sleep(0.2)
    raise SystemExit("the explorer did not start in 120 s")


def generate(url: str, attributes: dict, seed: int, candidates: int = 1) -> tuple[float, float]:
    body = json.dumps({"attributes": attributes, "seed": seed, "candidates": candidates}).encode()
    req = urllib.request.Request(
        url + "/api/generate", data=body, headers={"Content-Type": "application/json"}
    )
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as reply:
        result = json.loads(reply.read())
    return time.perf_counter() - t0, result["seconds"]


def screenshot(url: str, path: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1120",
                 "--hide-scrollbars"):  # fmt: skip
        options.add_argument(flag)
    options.binary_location = shutil.which("chromium")
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    try:
        driver.get(url)
        wait = WebDriverWait(driver, 300)
        body = driver.find_element(By.TAG_NAME, "body")
        wait.until(lambda d: body.get_attribute("data-state") == "idle")
        for name, presses in (("LVEDV", 20), ("RVEDV", 15), ("AGE", 0), ("SEX", 0)):
            driver.find_element(By.ID, f"known-{name}").click()
            slider = driver.find_element(By.ID, f"attr-{name}")
            for _ in range(presses):
                slider.send_keys(Keys.ARROW_RIGHT)
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: body.get_attribute("data-generation") == "1")
        driver.find_element(By.ID, "slice").send_keys(Keys.ARROW_UP)
        path.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(path))
    finally:
        driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run", required=True)
    parser.add_argument("--referee")
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--policies", default="PASSIVE", help="OMP_WAIT_POLICY values to compare")
    parser.add_argument("--selector", help="public selector: the server offers best-of-k")
    parser.add_argument("--candidates", default="1", help="best-of values to alternate, e.g. 1,4")
    parser.add_argument("--screenshot", type=Path)
    args = parser.parse_args()
    counts = [int(k) for k in args.candidates.split(",")]
    for policy in args.policies.split(","):
        proc, url = start(args.run, args.referee, args.selector, policy)
        try:
            for k in counts:  # warm-up: first-call allocations
                generate(url, CONDITIONS[0], 0, k)
            trips = {k: [] for k in counts}
            server = {k: [] for k in counts}
            for i in range(args.n):
                for k in counts:
                    trip, seconds = generate(url, CONDITIONS[i % len(CONDITIONS)], i, k)
                    trips[k].append(trip)
                    server[k].append(seconds)
            info = json.loads(urllib.request.urlopen(url + "/api/info").read())
            for k in counts:
                print(
                    f"OMP_WAIT_POLICY={policy}, best of {k}: {args.n} volumes {info['shape']} "
                    f"at {info['defaults']['sampler']} {info['defaults']['steps']} steps, "
                    f"guidance {info['defaults']['guidance']}, referee "
                    f"{'yes' if info['referee'] else 'no'}: round trip median "
                    f"{statistics.median(trips[k]):.2f} s, max {max(trips[k]):.2f} s; "
                    f"server median {statistics.median(server[k]):.2f} s",
                    flush=True,
                )
            if args.screenshot and policy == args.policies.split(",")[0]:
                screenshot(url, args.screenshot)
                print(f"screenshot -> {args.screenshot}")
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
