"""`dpsynth explore`: request checks, the single worker, what it reads, and the page in Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from dpsynth.attributes import INDEX
from dpsynth.errors import DpsynthError

pytest.importorskip("fastapi", reason="the explore extra (fastapi, uvicorn) is not installed")

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Small tensors: one thread avoids OpenMP spin-waits on a shared, loaded CPU (the
    server subprocess gets passive waiting from `dpsynth explore` itself)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _demo_ldm() -> Path:
    from dpsynth.app.demo import demo_assets

    return demo_assets() / "ldm"


@pytest.fixture(scope="module")
def demo_explorer():
    from dpsynth.app.explore.service import Explorer

    return Explorer(_demo_ldm())


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """The shipped demo LDM with a DP attribute model and a referee, both fitted on a small
    simulated public cohort, plus checkpoint/ and eval/ folders the explorer must not read."""
    from dpsynth.app.demo import simulate_and_prepare
    from dpsynth.config import load_config
    from dpsynth.evaluation.referee import train_referee
    from dpsynth.training.attributes import fit_attributes

    root = tmp_path_factory.mktemp("explore")
    cache = simulate_and_prepare(
        root / "data", {"patients": 24, "cohort": "acdc", "seed": 7}, load_config("demo")
    )
    run = root / "run"
    shutil.copytree(_demo_ldm(), run)
    meta = json.loads((run / "model.json").read_text())
    meta["sampling"]["temperature"] = 0.8  # not the default, so the page must read the run's
    (run / "model.json").write_text(json.dumps(meta))
    fit_attributes(cache, run, epsilon=2.0, seed=0)
    train_referee(cache, run / "referee", epochs=5, lr=3e-3, channels=(8, 16), seed=0)
    for secret in ("checkpoint", "eval"):
        (run / secret).mkdir()
        (run / secret / "secret.json").write_text("{}")
    return run


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """`dpsynth explore RUN [ARGS]` in a subprocess, as a user starts it."""

    def __init__(self, run: Path, *args: str):
        self.port = _free_port()
        env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dpsynth",
                "explore",
                str(run),
                "--port",
                str(self.port),
                *args,
            ],  # fmt: skip
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.banner = self.proc.stdout.readline()
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                self.get("/api/info")
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"explorer did not start: {self.banner}") from None
                time.sleep(0.2)

    def request(self, path: str, body=None, raw: bytes | None = None) -> tuple[int, bytes]:
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path, data=data, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=300) as reply:
                return reply.status, reply.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def get(self, path: str) -> dict:
        status, body = self.request(path)
        assert status == 200, body
        return json.loads(body)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(run_dir):
    before = _snapshot(run_dir)
    srv = _Server(run_dir)
    yield srv
    srv.stop()
    assert _snapshot(run_dir) == before, "the explorer wrote into the run folder"


# ---------------------------------------------------------------------------- requests


@pytest.mark.parametrize(
    "payload, message",
    [
        ({"attributes": {"FOO": 1}}, "unknown attribute 'FOO'"),
        ({"attributes": {"LVEDV": 5000}}, "LVEDV=5000 is outside the model's range"),
        ({"attributes": {"SEX": 0.5}}, "SEX=0.5: expected one of (0, 1)"),
        ({"attributes": {"AGE": "old"}}, "AGE: expected a number"),
        ({"attributes": [1, 2]}, "attributes: expected an object"),
        ({"path": "/etc/passwd"}, "request: unknown field 'path'"),
        ({"steps": 0}, "steps=0 is outside [1, 50]"),
        ({"steps": 2.5}, "steps: expected an integer"),
        ({"seed": True}, "seed: expected a number"),
        ({"guidance": -1}, "guidance=-1 is outside"),
        ({"sampler": "ddpm"}, "sampler: expected 'ddim' or 'dpm++'"),
        ({"candidates": 4}, "candidates: best-of-k needs a public selector"),
        ({"candidates": "1"}, "candidates: expected a number"),
        ([1], "request: expected a JSON object"),
    ],
)
def test_bad_requests_name_the_field(demo_explorer, payload, message):
    with pytest.raises(DpsynthError) as e:
        demo_explorer.parse(payload)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_slider_end_off_by_rounding_is_taken_as_the_end(demo_explorer):
    # The page's range slider snapped a drawn value clipped to BMI's upper end a few ulps
    # past it, and the request was refused (found in headless Chromium on new phantoms).
    lo, hi = demo_explorer.ranges["BMI"]
    r = demo_explorer.parse({"attributes": {"BMI": hi * (1 + 1e-12)}})
    assert r.attributes[INDEX["BMI"]] == np.float32(hi)
    with pytest.raises(DpsynthError, match="BMI=.* is outside the model's range"):
        demo_explorer.parse({"attributes": {"BMI": hi + 1e-3 * (hi - lo)}})


def test_request_defaults_and_unknowns(demo_explorer):
    r = demo_explorer.parse({"attributes": {"LVEDV": 150, "ESED": 0, "AGE": None}})
    assert r.attributes[0] == 150 and r.attributes[11] == 0
    assert np.isnan(r.attributes).sum() == 12  # AGE null and the 11 not given are unknown
    info = demo_explorer.info()
    assert (r.steps, r.sampler, r.guidance) == (10, "dpm++", info["defaults"]["guidance"])
    lvedv = info["attributes"][0]
    assert lvedv["name"] == "LVEDV" and lvedv["min"] < 150 < lvedv["max"]
    assert info["shape"] == list(demo_explorer.pipe.volume_shape)
    assert info["attribute_model"] is False and info["referee"] is None
    assert r.candidates == info["defaults"]["candidates"] == info["limits"]["max_candidates"] == 1
    # the shipped public LDM never saw AGE or SEX (the public cohort lacks them)
    learned = {a["name"]: a["learned"] for a in info["attributes"]}
    assert [a for a, yes in learned.items() if not yes] == ["AGE", "SEX"]


def test_a_run_folder_without_a_model_is_refused(tmp_path, capsys):
    from dpsynth.app.cli import main
    from dpsynth.app.explore.service import Explorer

    with pytest.raises(DpsynthError, match="no model.json"):
        Explorer(tmp_path)
    assert main(["explore", str(tmp_path), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no model.json" in err and "\n" not in err


def test_generation_is_the_pipelines(demo_explorer):
    """Same seed and settings as `pipe.sample`: no second copy of the sampling logic."""
    from dpsynth.app.explore.service import response

    request = demo_explorer.parse({"attributes": {"LVEDV": 200, "ESED": 1}, "steps": 2, "seed": 3})
    result = demo_explorer.generate(request)
    expected = demo_explorer.pipe.sample(
        1, request.attributes[None], sampler="dpm++", steps=2,
        guidance=request.guidance, seed=3, progress=False,
    )[0]  # fmt: skip
    np.testing.assert_allclose(result.volume, expected, atol=1e-5)
    shown = response(result)
    import base64

    pixels = np.frombuffer(base64.b64decode(shown["data"]), np.uint8).reshape(shown["shape"])
    np.testing.assert_array_equal(pixels, np.rint(expected * 255).astype(np.uint8))
    assert shown["requested"]["LV_ML"] == {"attribute": "LVEDV", "value": 200.0}
    assert shown["measured"] is None  # no referee in the shipped run


def _shipped_selector() -> Path:
    from dpsynth.app.demo import demo_assets

    return demo_assets() / "selector"


def test_best_of_k_is_the_samplers_with_the_shipped_selector(demo_explorer):
    """With --selector the page's default is the demo's best of 4, sampled by the one
    best-of-k sampler (`sample_best_of`), not a copy of it."""
    from dpsynth.app.demo import CANDIDATES
    from dpsynth.app.explore.service import Explorer, response
    from dpsynth.evaluation.referee import Referee
    from dpsynth.evaluation.selection import sample_best_of

    explorer = Explorer(_demo_ldm(), selector=_shipped_selector())
    info = explorer.info()
    assert (info["defaults"]["candidates"], info["limits"]["max_candidates"]) == (CANDIDATES, 8)
    assert info["selector"] is True and demo_explorer.info()["selector"] is False
    with pytest.raises(DpsynthError, match=r"candidates=9 is outside \[1, 8\]"):
        explorer.parse({"candidates": 9})
    request = explorer.parse({"attributes": {"LVESV": 80, "ESED": 0}, "steps": 2, "seed": 5})
    assert request.candidates == CANDIDATES
    result = explorer.generate(request)
    expected = sample_best_of(
        demo_explorer.pipe, 1, request.attributes[None], 5, CANDIDATES,
        Referee.load(_shipped_selector()), progress=False, sampler="dpm++", steps=2,
        guidance=request.guidance, temperature=1.0,
    )[0]  # fmt: skip
    np.testing.assert_allclose(result.volume, expected, atol=1e-5)
    assert response(result)["candidates"] == CANDIDATES
    # Nothing of the request's phase to compare: drawn plainly, and the page is told so.
    plain = explorer.generate(explorer.parse({"attributes": {"LVEDV": 150, "ESED": 0}, "steps": 1}))
    assert plain.request.candidates == CANDIDATES and response(plain)["candidates"] == 1


def test_the_selector_is_checked_against_the_private_patients(run_dir, tmp_path):
    """A selector trained on the run's private patients, prepared again under a new cache id,
    passes the cache-id check; with --private it is refused by patient digest, and without
    it the explorer warns that patients were not compared (as `dpsynth sample`)."""
    from dpsynth.app.explore.service import Explorer
    from dpsynth.data.prepare import prepare
    from dpsynth.evaluation.referee import train_referee

    data = run_dir.parent / "data"
    again = tmp_path / "again"  # the run's cache (the ledger names it) prepared again
    prepare("ukbb", data / "acdc_raw", again, attributes_csv=data / "acdc_raw" / "attributes.csv",
            split=(0.8, 0.1, 0.1), seed=7, shape=(13, 96, 96), spacing=(10.0, 1.8269, 1.8269))  # fmt: skip
    selector = train_referee(again, tmp_path / "sel", epochs=1, channels=(4, 8), public=True)
    with pytest.raises(DpsynthError, match=r"learned from \d+ patients of the private cache"):
        Explorer(run_dir, selector=selector, private=[data / "acdc_cache"])
    with pytest.warns(UserWarning, match="give --private CACHE"):
        Explorer(run_dir, selector=selector)
    shipped = Explorer(run_dir, selector=_shipped_selector(), private=[data / "acdc_cache"])
    assert shipped.info()["selector"] is True
    with pytest.raises(DpsynthError, match="--private: give it only with --selector"):
        Explorer(run_dir, private=[data / "acdc_cache"])


def test_a_selector_not_declared_public_is_refused(run_dir):
    """The run's evaluation referee learned real data without DP: never a selector."""
    from dpsynth.app.explore.service import Explorer

    with pytest.raises(DpsynthError, match="not declared trained on public data only"):
        Explorer(run_dir, selector=run_dir / "referee")


def test_generations_never_overlap(demo_explorer, monkeypatch):
    """Three concurrent HTTP requests run one after another on the single worker."""
    import uvicorn

    from dpsynth.app.explore.server import create_app

    running, peak, lock = [0], [0], threading.Lock()

    def slow_sample(n, attributes, **kwargs):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.3)
        with lock:
            running[0] -= 1
        return np.zeros((n, *demo_explorer.pipe.volume_shape), np.float32)

    monkeypatch.setattr(demo_explorer.pipe, "sample", slow_sample)
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(demo_explorer), port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    statuses = []

    def post():
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/generate", data=b"{}",
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(req, timeout=60) as reply:
            statuses.append(reply.status)

    try:
        clients = [threading.Thread(target=post) for _ in range(3)]
        for c in clients:
            c.start()
        for c in clients:
            c.join()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert statuses == [200, 200, 200]
    assert peak[0] == 1


def test_reads_only_the_model_attribute_model_and_referee(run_dir):
    """checkpoint/ (secret noise seeds), eval/ and caches are never opened."""
    from dpsynth.app.explore.service import Explorer

    opened: list[str] = []
    recording = [True]

    def hook(event, args):
        if recording[0] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            opened.append(os.fsdecode(args[0]))

    sys.addaudithook(hook)  # hooks cannot be removed; `recording` switches this one off
    try:
        explorer = Explorer(run_dir)
        result = explorer.generate(explorer.parse({"steps": 1}))
        explorer.draw(0, 1.0)
        explorer.nifti(result.id)
    finally:
        recording[0] = False
    inside = {os.path.relpath(p, run_dir) for p in opened if p.startswith(str(run_dir))}
    assert "model.json" in inside and "attribute_model.json" in inside
    assert any(p.startswith("referee") for p in inside)
    assert not [p for p in inside if p.split(os.sep)[0] in ("checkpoint", "eval")], inside
    assert not [p for p in opened if str(run_dir.parent / "data") in p]


def test_with_a_selector_reads_the_ledger_and_the_private_caches_patient_digests(run_dir):
    """--selector adds the run's ledger and the selector's folder; --private adds the cache
    given (its digests), never checkpoint/ or eval/, and no other cache."""
    from dpsynth.app.explore.service import Explorer

    opened: list[str] = []
    recording = [True]

    def hook(event, args):
        if recording[0] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            opened.append(os.fsdecode(args[0]))

    cache = run_dir.parent / "data" / "acdc_cache"
    sys.addaudithook(hook)
    try:
        explorer = Explorer(run_dir, selector=_shipped_selector(), private=[cache])
        explorer.generate(explorer.parse({"attributes": {"LVEDV": 150, "ESED": 1}, "steps": 1}))
    finally:
        recording[0] = False
    inside = {os.path.relpath(p, run_dir) for p in opened if p.startswith(str(run_dir))}
    assert "ledger.json" in inside
    assert not [p for p in inside if p.split(os.sep)[0] in ("checkpoint", "eval")], inside
    assert any(p.startswith(str(_shipped_selector())) for p in opened)
    data = [p for p in opened if p.startswith(str(run_dir.parent / "data"))]
    assert data and all(p.startswith(str(cache)) for p in data), data


def test_states_what_budget_states_and_keeps_evaluation_only_runs_local(run_dir, capsys):
    """The page's privacy line is `dpsynth budget`'s; a run with an evaluation referee may
    not be served beyond loopback (its measurements come from private data without DP)."""
    from dpsynth.app.cli import main
    from dpsynth.app.explore.server import serve
    from dpsynth.app.explore.service import Explorer

    explorer = Explorer(run_dir)
    assert main(["budget", str(run_dir), "--json"]) == 0
    stated = json.loads(capsys.readouterr().out)
    privacy = explorer.info()["privacy"]
    assert privacy["epsilon"] == stated["epsilon"] > 0 and privacy["delta"] == stated["delta"]
    assert privacy["is_not_dp"] is False and privacy["unchecked"] == [] and privacy["dp"] is True
    assert explorer.info()["evaluation_only"] == "its referee learned real data without DP"
    with pytest.raises(DpsynthError, match="evaluation only .*referee.*loopback"):
        serve(run_dir, host="0.0.0.0", port=0)
    shipped = Explorer(_demo_ldm()).info()  # public weights, no ledger: shareable
    assert shipped["privacy"]["ledger"] is False and shipped["evaluation_only"] == ""


def test_a_not_dp_or_labelled_run_is_said_so_and_kept_local(tmp_path):
    """A run whose lineage learned a cache its ledger names private without DP (the sweep's
    ε = ∞ cells) shows NOT DP and no ε, as `budget` does; so does a run under an
    EVALUATION_ONLY.txt, and neither is served beyond loopback."""
    from dpsynth.app.explore.server import serve
    from dpsynth.app.explore.service import Explorer
    from dpsynth.privacy.ledger import Ledger, LedgerEntry
    from dpsynth.privacy.outputs import mark_evaluation_only

    run = shutil.copytree(_demo_ldm(), tmp_path / "cells" / "nodp")
    Ledger([LedgerEntry.gaussian("attributes", 2.0, records=50, cache_id="c0ffee")]).save(run)
    meta = json.loads((run / "model.json").read_text())
    meta["trained_on"] = [*meta.get("trained_on", []), {"cache_id": "c0ffee", "dp": False}]
    (run / "model.json").write_text(json.dumps(meta))
    info = Explorer(run).info()
    assert info["privacy"]["is_not_dp"] is True and info["privacy"]["epsilon"] is None
    assert "NOT DP" in info["evaluation_only"]
    with pytest.raises(DpsynthError, match="NOT DP"):
        serve(run, host="0.0.0.0", port=0)
    meta["trained_on"].pop()
    (run / "model.json").write_text(json.dumps(meta))
    assert Explorer(run).info()["evaluation_only"] == ""
    marker = mark_evaluation_only(tmp_path / "cells")
    assert Explorer(run).info()["evaluation_only"] == f"{marker} labels it evaluation only"
    (tmp_path / "cells" / "EVALUATION_ONLY.txt").unlink()
    # A DP run copied without its ledger: no ε can be stated, and it stays local.
    (run / "ledger.json").unlink()
    meta["trained_on"].append({"cache_id": "c0ffee", "dp": True})
    (run / "model.json").write_text(json.dumps(meta))
    info = Explorer(run).info()
    assert "records no DP-SGD on it" in info["privacy"]["error"]
    assert info["evaluation_only"].startswith("no ε can be stated: ")
    # A ledger whose lineage cannot be checked (no trained_on, e.g. an old sweep cell
    # copied out of its folder) is not shared either.
    del meta["trained_on"]
    (run / "model.json").write_text(json.dumps(meta))
    Ledger([LedgerEntry.gaussian("attributes", 2.0, records=50, cache_id="c0ffee")]).save(run)
    info = Explorer(run).info()
    assert info["privacy"]["dp"] is True and info["privacy"]["unchecked"]
    assert info["evaluation_only"] == "its lineage could not be checked against its ledger"
    (run / "ledger.json").unlink()  # nor without a ledger: nothing says it never spent
    info = Explorer(run).info()
    assert info["privacy"]["ledger"] is False and "not found" in info["privacy"]["error"]
    assert info["evaluation_only"].startswith("no ε can be stated: ")


# ---------------------------------------------------------------------------- over HTTP


def test_server_prints_its_local_url(server):
    assert f"http://127.0.0.1:{server.port}/" in server.banner


def test_http_errors_are_4xx_with_one_line(server):
    status, body = server.request("/api/generate", {"attributes": {"NOPE": 1}})
    assert status == 400 and json.loads(body)["detail"].startswith("unknown attribute 'NOPE'")
    status, body = server.request("/api/generate", raw=b"{not json")
    assert status == 400 and "\n" not in json.loads(body)["detail"]
    status, body = server.request(f"/api/volume/{'a' * 32}.nii.gz")
    assert status == 404 and "no longer kept" in json.loads(body)["detail"]


@pytest.mark.parametrize(
    "path",
    [
        "/static/../../cli.py",
        "/static/..%2F..%2Fcli.py",
        "/static/%2e%2e/model.json",
        "/model.json",
        "/referee/referee.json",
        "/api/volume/..%2Fmodel.json.nii.gz",
        "/checkpoint/secret.json",
    ],
)
def test_nothing_is_served_from_outside_the_page(server, path):
    status, body = server.request(path)
    assert status in (400, 404), (status, body[:200])


def test_download_is_a_nifti_with_true_spacing(server, tmp_path):
    from dpsynth.io import read_nifti

    info = server.get("/api/info")
    status, body = server.request("/api/generate", {"attributes": {"ESED": 0}, "steps": 2})
    assert status == 200
    shown = json.loads(body)
    status, nifti = server.request(shown["nifti"])
    assert status == 200
    (tmp_path / "v.nii.gz").write_bytes(nifti)
    volume, spacing, _ = read_nifti(tmp_path / "v.nii.gz")
    assert list(volume.shape) == info["shape"] == shown["shape"]
    np.testing.assert_allclose(spacing, info["spacing"], rtol=1e-6)
    assert 0.0 <= volume.min() and volume.max() <= 1.0 and volume.std() > 0.01


def test_draw_from_the_dp_attribute_model(server):
    info = server.get("/api/info")
    assert info["attribute_model"] is True and "evaluation-only" in info["referee"]
    drawn = server.get("/api/draw?seed=5&phase=0")
    values = drawn["attributes"]
    assert values["ESED"] == 0.0 and set(values) == {a["name"] for a in info["attributes"]}
    for a in info["attributes"]:
        v = values[a["name"]]
        assert v is None or a["min"] <= v <= a["max"]
    assert server.get("/api/draw?seed=5&phase=0") == drawn  # a seed gives one patient


# ---------------------------------------------------------------------------- in Chromium


def _browser(download_dir: Path):
    if shutil.which("chromium") is None or shutil.which("chromedriver") is None:
        pytest.skip("chromium and chromium-driver are not installed")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000",
                 "--disable-dev-shm-usage"):  # fmt: skip
        options.add_argument(flag)
    options.binary_location = shutil.which("chromium")
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(download_dir),
                  "download.prompt_for_download": False},
    )  # fmt: skip
    return webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))


def test_page_in_headless_chromium(server, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from dpsynth.io import read_nifti

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = _browser(downloads)
    wait = WebDriverWait(driver, 300)
    body = lambda: driver.find_element(By.TAG_NAME, "body")  # noqa: E731

    def generate(count: int) -> tuple[str, float]:
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: body().get_attribute("data-generation") == str(count))
        assert driver.find_element(By.ID, "error").text == ""
        pixels = driver.execute_script("return document.getElementById('slice').toDataURL()")
        return pixels, float(driver.find_element(By.ID, "measured-LV_ML").text.split()[0])

    try:
        driver.get(server.url)
        wait.until(lambda d: body().get_attribute("data-state") == "idle")
        assert driver.find_element(By.ID, "draw").is_displayed()
        assert driver.find_element(By.ID, "untaught-SEX").text == "not learned"
        assert driver.find_element(By.ID, "temperature").text == "0.8 (the run's)"
        grid = driver.find_element(By.ID, "grid").text
        epsilon = server.get("/api/info")["privacy"]["epsilon"]
        shown = re.search(r"· DP model, ε = ([0-9.]+) at δ = 0.00001", grid)
        assert shown and epsilon <= float(shown[1]) <= epsilon * 1.01  # 3 digits, rounded up
        assert grid.endswith("· evaluation only: its referee learned real data without DP")
        assert not driver.find_element(By.ID, "candidates").is_displayed()  # no selector
        assert not driver.find_elements(By.ID, "untaught-LVEDV")
        driver.find_element(By.ID, "known-LVEDV").click()
        slider = driver.find_element(By.ID, "attr-LVEDV")
        slider.send_keys(Keys.HOME)  # the slider's low end
        low_value = float(driver.find_element(By.ID, "value-LVEDV").text)
        small, lv_small = generate(1)
        slider.send_keys(Keys.END)  # the high end
        assert float(driver.find_element(By.ID, "value-LVEDV").text) > low_value + 100
        large, lv_large = generate(2)
        assert large != small  # the shown slice changed
        assert lv_large > lv_small  # the measured LV follows the request

        shape = driver.execute_script("return window.dpsynthExplore.volume.shape")
        assert len(driver.find_elements(By.CSS_SELECTOR, "#strip canvas")) == shape[0]
        width = driver.execute_script("return document.getElementById('slice').width")
        assert width == shape[2]  # drawn pixel for pixel, scaled by CSS only
        canvas = driver.find_element(By.ID, "slice")
        start = int(body().get_attribute("data-slice"))
        assert start == shape[0] // 2
        canvas.send_keys(Keys.ARROW_DOWN)
        assert int(body().get_attribute("data-slice")) == start + 1
        before = driver.execute_script("return document.getElementById('slice').toDataURL()")
        ActionChains(driver).scroll_from_origin(ScrollOrigin.from_element(canvas), 0, 120).perform()
        wait.until(lambda d: int(body().get_attribute("data-slice")) == start + 2)
        after = driver.execute_script("return document.getElementById('slice').toDataURL()")
        assert after != before
        canvas.send_keys(Keys.END)
        assert int(body().get_attribute("data-slice")) == shape[0] - 1

        driver.find_element(By.ID, "download").click()
        wait.until(lambda d: list(downloads.glob("*.nii.gz")))
        time.sleep(0.5)  # Chromium renames the .crdownload when complete
        files = list(downloads.glob("*.nii.gz"))
        volume, spacing, _ = read_nifti(files[0])
        info = server.get("/api/info")
        assert list(volume.shape) == info["shape"]
        np.testing.assert_allclose(spacing, info["spacing"], rtol=1e-6)

        driver.find_element(By.ID, "draw").click()
        wait.until(lambda d: body().get_attribute("data-generation") == "3")
        assert driver.find_element(By.ID, "drawn").is_displayed()
        driver.save_screenshot(str(tmp_path / "explore.png"))
    finally:
        driver.quit()


def test_generation_samples_at_the_runs_temperature(demo_explorer, monkeypatch, tmp_path):
    from dpsynth.app.explore.service import Explorer

    assert demo_explorer.temperature == 1.0  # the shipped public LDM predates the setting
    run = shutil.copytree(_demo_ldm(), tmp_path / "ldm")
    meta = json.loads((run / "model.json").read_text())
    meta["sampling"]["temperature"] = 0.8
    (run / "model.json").write_text(json.dumps(meta))
    assert Explorer(run).temperature == 0.8
    assert Explorer(run).info()["defaults"]["temperature"] == 0.8
    seen = {}
    sample = demo_explorer.pipe.sample

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return sample(*args, **kwargs)

    monkeypatch.setattr(demo_explorer, "temperature", 0.5)
    monkeypatch.setattr(demo_explorer.pipe, "sample", spy)
    demo_explorer.generate(demo_explorer.parse({"attributes": {}, "steps": 2}))
    assert seen["temperature"] == 0.5


def test_page_offers_best_of_k_with_a_selector(run_dir, tmp_path):
    """`dpsynth explore RUN --selector S`: the page shows 'best of' at the demo's 4 and says
    which volume it shows."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _browser(tmp_path)
    srv = _Server(run_dir, "--selector", str(_shipped_selector()))
    body = lambda: driver.find_element(By.TAG_NAME, "body")  # noqa: E731
    try:
        wait = WebDriverWait(driver, 300)
        driver.get(srv.url)
        wait.until(lambda d: body().get_attribute("data-state") == "idle")
        assert driver.find_element(By.ID, "candidates").is_displayed()
        assert driver.find_element(By.ID, "candidates-value").text == "4"
        steps = driver.find_element(By.ID, "steps")
        steps.send_keys(Keys.HOME)  # 1 step: the choice still runs, at its first step
        driver.find_element(By.ID, "known-LVEDV").click()  # ED is checked: a volume to compare
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: body().get_attribute("data-generation") == "1")
        assert driver.find_element(By.ID, "error").text == ""
        assert driver.find_element(By.ID, "timing").text.endswith("the best of 4")
        driver.find_element(By.ID, "known-LVEDV").click()  # nothing left to compare
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: body().get_attribute("data-generation") == "2")
        assert driver.find_element(By.ID, "timing").text.endswith(
            "nothing of its phase to compare)"
        )
    finally:
        driver.quit()
        srv.stop()
