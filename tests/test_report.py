"""The HTML report: complete, self-contained, escaped, graceful when pieces are missing."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from dpsynth.attributes import ATTRIBUTES, INDEX
from dpsynth.evaluation.audit import attack_summary, memorisation
from dpsynth.io import atomic_write_json, write_nifti
from dpsynth.privacy import one_run_audit as ora
from dpsynth.privacy.accounting import format_bound
from dpsynth.privacy.attribute_model import attribute_fidelity
from dpsynth.privacy.ledger import Ledger, LedgerEntry
from dpsynth.report import figures, montage, write_report
from dpsynth.report.html import SECTIONS, _attack_bound

SHAPE = (5, 32, 32)
TITLES = [title for _, title, _ in SECTIONS]
# 2 sample grids, marginals, correlations, controllability (referee and second reader), ROC,
# closest pairs, loss, comparison
N_IMAGES = 10


class _Page(HTMLParser):
    """Headings, image sources and every src/href of a page."""

    def __init__(self, text: str):
        super().__init__()
        self.headings, self.images, self.links, self.tags = [], [], [], set()
        self._in_h2 = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        attrs = dict(attrs)
        self._in_h2 = tag == "h2"
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        self.links += [attrs[k] for k in ("src", "href") if k in attrs]

    def handle_data(self, data):
        if self._in_h2:
            self.headings.append(data)
            self._in_h2 = False


def _decode(src: str) -> np.ndarray:
    assert src.startswith("data:image/png;base64,"), src[:40]
    return imread(io.BytesIO(base64.b64decode(src.split(",", 1)[1])), format="png")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    from dpsynth.data.prepare import prepare
    from dpsynth.data.simulate import simulate_cohort

    root = tmp_path_factory.mktemp("data")
    raw = simulate_cohort(root / "raw", 10, shape=SHAPE, spacing=(10.0, 4.0, 4.0), workers=1)
    out = root / "cache"
    prepare(
        "ukbb",
        raw,
        out,
        attributes_csv=raw / "attributes.csv",
        split=(0.6, 0.2, 0.2),
        shape=SHAPE,
        spacing=(10.0, 4.0, 4.0),
    )
    return out


def _write_run(root: Path, cache: Path, epsilon_steps: int = 100, name: str = "run") -> Path:
    """A complete run: config, ledger, training log, synthetic set and evaluation outputs."""
    from dpsynth.data.cache import Cache

    c = Cache(cache)
    train, test = c.volume_indices("train"), c.volume_indices("test")
    run = root / name
    run.mkdir()
    (run / "config.yaml").write_text("preset: demo\nnote: <script>alert('x')</script>\n")
    atomic_write_json(run / "model.json", {"kind": "ldm", "latent_scale_source": "public run"})
    shuffled = c.attributes[train][::-1].copy()
    shuffled[:, INDEX["RVEDV"]] = shuffled[::-1, INDEX["RVEDV"]]  # breaks LVEDV-RVEDV
    atomic_write_json(
        run / "attribute_fidelity.json", attribute_fidelity(c.attributes[train], shuffled)
    )
    Ledger(
        [
            LedgerEntry(
                stage="ldm-dp",
                mechanism="dp-sgd",
                cache_id="c0ffee",
                records=6,
                noise_multiplier=1.2,
                sample_rate=0.25,
                planned_steps=100,
                steps=epsilon_steps,
            ),
            LedgerEntry.non_private_use("ldm-validation", 6, "validation loss on private patients"),
        ]
    ).save(run)
    with open(run / "metrics.jsonl", "w") as f:
        for step in range(0, 50, 5):
            f.write(
                json.dumps({"step": step, "loss": 1.0 / (step + 1), "epsilon": step / 10}) + "\n"
            )
        f.write('{"step": 50, "lo')  # a run killed mid-write

    # Synthetic set: two near-copies of training volumes and two test volumes, as NIfTI.
    synthetic_dir = run / "synthetic"
    synthetic_dir.mkdir()
    rows = [train[0], train[3], test[0], test[1]]
    synthetic = np.stack([np.clip(c.images[r].astype(np.float32) + 0.02, 0, 1) for r in rows])
    with open(synthetic_dir / "attributes.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", *ATTRIBUTES])
        for k, r in enumerate(rows):
            write_nifti(synthetic_dir / f"s{k}.nii.gz", synthetic[k], (10.0, 4.0, 4.0))
            w.writerow([f"s{k}.nii.gz", *c.attributes[r]])

    rng = np.random.default_rng(0)
    mia = {
        "attack": "loss threshold",
        "timesteps": [5, 15],
        "n_noise": 4,
        "member_volumes": {"scored": 12, "of": 20},
        "volume": attack_summary(rng.normal(0.3, 1, 12), rng.normal(0, 1, 4)),
        "patient": attack_summary(rng.normal(0.3, 1, 6), rng.normal(0, 1, 2)),
    }
    mem = memorisation(synthetic, c.images[train], c.images[test], top_k=3)
    eval_dir = run / "eval"
    atomic_write_json(
        eval_dir / "metrics.json",
        {
            "n_real": len(test),
            "n_synthetic": 4,
            "real": f"{cache}[test]",
            "synthetic": str(synthetic_dir),
            "metrics": {
                "frd": {
                    "value": 12.5,
                    "baseline": 3.25,
                    "baseline_label": "real vs real",
                    "lower_is_better": True,
                    "config": "frd-score v1, image types: Original",
                },
                "fid": {
                    "value": None,
                    "baseline": None,
                    "note": "skipped: needs --inception-weights",
                },
                "controllability_lv_r": {
                    "value": 0.81,
                    "baseline": 0.97,
                    "lower_is_better": False,
                    "baseline_label": "referee on real",
                    "config": "Pearson r",
                },
            },
            "controllability": {
                "LV_VOLUME": {"r": 0.81, "mae": 9.5, "ceiling_r": 0.97, "ceiling_mae": 4.0, "n": 4}
            },
            "controllability_second_reader": {
                "reader": {"description": "2D U-Net <test>", "trained_on": "cache", "epochs": 3},
                "attributes": {
                    "LVEDV": {
                        "r": 0.52,
                        "mae": 68.25,
                        "mae_pct": 41.5,
                        "slope": 2.5,
                        "ceiling_r": 0.97,
                        "ceiling_mae": 11.0,
                        "ceiling_mae_pct": 7.25,
                        "ceiling_slope": 1.02,
                        "n": 2,
                        "ceiling_n": 2,
                    },  # fmt: skip
                },
            },
            "privacy_audit": {
                "label": mem["label"],
                "membership_inference": mia,
                "memorisation": mem,
            },
        },
    )
    with open(eval_dir / "controllability.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "attribute", "requested", "measured", "set"])
        for k in range(6):
            w.writerow([f"s{k}", "LV_VOLUME", 100 + 10 * k, 98 + 11 * k, "synthetic"])
            w.writerow([f"r{k}", "LV_VOLUME", 90 + 12 * k, 91 + 12 * k, "real"])
            w.writerow([f"s{k}", "RV_VOLUME", 110 + 5 * k, "nan", "synthetic"])
    with open(eval_dir / "controllability_second_reader.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "attribute", "requested", "measured", "set"])
        for k in range(4):
            w.writerow(
                [f"s{k}", "LVEDV" if k % 2 else "LVESV", 100 + 10 * k, 60 + 5 * k, "synthetic"]
            )
            w.writerow([f"r{k}", "LVEDV", 90 + 12 * k, 91 + 12 * k, "real"])
    return run


@pytest.fixture(scope="module")
def report(cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    run = _write_run(root, cache)
    # the run's one-run audit (dpsynth audit-privacy), with its recipe: σ 1.2, q 0.25, 100 steps
    recipe = ora.Recipe.of(1.2, 1.0, 0.25, 100, 6, 1e-5, "prv", "test run")
    ora.audit_privacy(run / ora.AUDIT_DIR, recipe, canaries=100, public_patients=2)
    other = _write_run(root, cache, epsilon_steps=10, name="eps-small")
    nonprivate = _write_run(root, cache, name="non-private")
    (nonprivate / "ledger.json").unlink()
    path = write_report(run, root / "report", compare=[other, nonprivate])
    return path, path.read_text()


def test_report_is_complete_and_self_contained(report):
    path, text = report
    assert path.name == "index.html" and path.parent.is_dir()
    page = _Page(text)
    assert page.headings == TITLES
    assert len(page.images) == N_IMAGES
    for src in page.images:
        img = _decode(src)
        assert img.shape[0] > 50 and img.shape[1] > 50
        assert img[..., :3].std() > 0.01  # not blank
    # scripts: only the slice viewer's data and its inline code (a script src would be a link)
    assert text.count("<script") == 2 and "script" in page.tags
    external = [u for u in page.links if re.match(r"\s*(https?:)?//", u)]
    assert external == []
    assert all(u.startswith(("data:image/png", "#")) for u in page.links)
    assert "Not run" not in text.split('id="comparison"')[0].split('id="summary"')[1]


def test_report_numbers_and_privacy_statements(report):
    _, text = report
    ledger = Ledger.load(Path(report[0]).parent.parent / "run")
    eps, _, _ = ledger.composed_epsilon()  # what budget and release state too
    assert 0 < eps < 50
    assert format_bound(eps, 3) in text  # the composed ε is what the accountant says
    assert "patient" in text and "ED and ES" in text
    assert "Non-private uses of private data" in text and "validation loss on private" in text
    assert "Evaluation-only uses of private data" in text
    assert "frd-score v1, image types: Original" in text  # FRD config next to its number
    assert "skipped: needs --inception-weights" in text
    assert "latent_scale_source" in text and "public run" in text
    assert "Fewer than 100 non-members" in text
    assert "members: a random 12 of 20 training volumes" in text
    one_run = json.loads(
        (Path(report[0]).parent.parent / "run/privacy_audit/one_run_audit.json").read_text()
    )
    assert "One-run audit of the DP-SGD engine" in text and "AUDIT ONLY" in text
    assert f"{one_run['epsilon_lb']:.4g}" in text.split('id="audit"')[1]
    assert format_bound(one_run["accounted_epsilon"]) in text.split('id="audit"')[1]
    fidelity = json.loads(
        (Path(report[0]).parent.parent / "run/attribute_fidelity.json").read_text()
    )
    attributes = text.split('id="attributes"')[1].split("</section>")[0]
    assert "DP attribute model fidelity" in attributes
    gap = fidelity["max_abs_correlation_difference"]
    assert gap > 0.3 and f"<b>{gap:.2g}</b>" in attributes
    assert attributes.count("<tr>") == 1 + len(ATTRIBUTES)
    assert "fidelity table, computed on the private table" in text
    # a run without ledger is placed at ε = ∞ in the comparison
    comparison = text.split('id="comparison"')[1]
    assert "non-private" in comparison and "∞" in comparison and "eps-small" in comparison
    # escaped, never executed
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in text


def test_controllability_section_shows_both_readers(report):
    _, text = report
    section = text.split('id="controllability"')[1].split("</section>")[0]
    assert "Second reader (independent 2D U-Net, evaluation only)" in section
    assert "2D U-Net &lt;test&gt;" in section  # escaped
    # the second reader's row: r, MAE, MAE %, slope, then the same on real volumes, n, n real
    row = section.split("<td>LVEDV</td>")[1].split("</tr>")[0]
    cells = re.findall(r'<td class="num">([^<]*)</td>', row)
    assert cells == ["0.52", "68.25", "41.5", "2.5", "0.97", "11", "7.25", "1.02", "2", "2"]
    assert section.count("<img") == 2
    assert "the second reader (a 2D U-Net trained on real volumes without DP)" in text


def test_controllability_figure_titles_by_hand():
    rows = [
        {"attribute": "LVEDV", "requested": 100, "measured": 90, "set": "synthetic"},
        {"attribute": "LVEDV", "requested": 200, "measured": 170, "set": "synthetic"},
        {"attribute": "LVESV", "requested": 50, "measured": 60, "set": "synthetic"},
        {"attribute": "LVESV", "requested": 70, "measured": 70, "set": "synthetic"},
        {"attribute": "LVESV", "requested": 40, "measured": 38, "set": "real"},
        {"attribute": "LVESV", "requested": 60, "measured": 61, "set": "real"},
    ]
    fig = figures.controllability_figure(rows, "second reader")
    titles = [ax.get_title() for ax in fig.axes if ax.axison]
    pooled_r = np.corrcoef([100, 200, 50, 70], [90, 170, 60, 70])[0, 1]
    pooled_slope = np.polyfit([100, 200, 50, 70], [90, 170, 60, 70], 1)[0]
    # slopes: LVEDV 80 / 100, LVESV synthetic 10 / 20, real 23 / 20
    assert titles == [
        "LVEDV\nsynthetic: r = 1.00, MAE = 20.00, slope = 0.80",
        "LVESV\nsynthetic: r = 1.00, MAE = 5.00, slope = 0.50"
        "\nreal: r = 1.00, MAE = 1.50, slope = 1.15",
        f"LV_VOLUME (ED + ES)\nsynthetic: r = {pooled_r:.2f}, MAE = 12.50, slope = {pooled_slope:.2f}"
        "\nreal: r = 1.00, MAE = 1.50, slope = 1.15",
    ]
    pooled = fig.axes[2]
    assert len(pooled.collections[0].get_offsets()) == 4  # ED and ES points together
    assert pooled.get_ylabel() == "measured by the second reader (mL)"
    # the identity line spans the x range
    (line,) = pooled.get_lines()
    assert list(line.get_xdata()) == list(line.get_ydata())
    assert imread(io.BytesIO(figures.controllability_scatter(rows)), format="png").size > 0


def test_slice_viewer_holds_every_slice_of_a_few_volumes(report, cache):
    from dpsynth.data.cache import Cache

    _, text = report
    section = text[text.index('<section id="viewer">') :]
    spec = json.loads(
        re.search(r'<script type="application/json">(.*?)</script>', section, re.S)[1]
    )
    groups = [v["group"] for v in spec["volumes"]]
    c = Cache(cache)
    n_real = min(4, len(c.volume_indices("test")))
    assert groups == ["real"] * n_real + ["synthetic"] * 4
    first = spec["volumes"][0]
    pixels = np.frombuffer(base64.b64decode(first["data"]), np.uint8).reshape(first["shape"])
    real = np.asarray(c.images[c.volume_indices("test")[0]], np.float32)
    np.testing.assert_array_equal(pixels, np.rint(np.clip(real, 0, 1) * 255))
    assert "mountGallery" in text and "<script src" not in text  # inline, nothing fetched


def test_attack_bound_in_plain_words():
    assert _attack_bound(1.0, 1e-5) == pytest.approx(np.e * 0.01 + 1e-5)
    assert _attack_bound(10.0, 1e-5) == pytest.approx(1 - np.exp(-10) * 0.98999)  # ~vacuous
    assert _attack_bound(0.0, 0.0) == pytest.approx(0.01)  # no better than guessing


def test_report_states_the_composed_epsilon_that_budget_states(tmp_path, capsys):
    """Stages planned by different accountants: the report's ε is `budget`'s (the larger
    bound), not the first stage's accountant's (regression: they printed different ε)."""
    from dpsynth.app.cli import main

    run = tmp_path / "mixed"
    run.mkdir()
    entry = dict(mechanism="dp-sgd", cache_id="c0ffee", records=100, sample_rate=0.1,
                 planned_steps=50, steps=50)  # fmt: skip
    Ledger(
        [
            LedgerEntry(stage="ae-dp", noise_multiplier=0.8, accountant="prv", **entry),
            LedgerEntry(stage="ldm-dp", noise_multiplier=0.8, accountant="rdp", **entry),
        ]
    ).save(run)
    ledger = Ledger.load(run)
    first = ledger.total_epsilon(accountant="prv")
    eps, _, accountant = ledger.composed_epsilon()
    assert accountant == "rdp" and format_bound(eps, 3) != format_bound(first, 3)
    assert main(["budget", str(run), "--json"]) == 0
    stated = json.loads(capsys.readouterr().out)
    assert (stated["epsilon"], stated["accountant"]) == (eps, "rdp")
    text = write_report(run, tmp_path / "out").read_text()
    for section in ("summary", "ledger"):
        html = text.split(f'<section id="{section}">')[1].split("</section>")[0]
        html = html.replace(str(tmp_path), "")  # its pytest-N could hold the digits
        assert format_bound(eps, 3) in html and format_bound(first, 3) not in html, section


def test_report_states_no_epsilon_for_a_lineage_trained_without_dp(tmp_path, capsys):
    """What `budget` calls NOT DP, and release refuses, the report must not give an ε."""
    from dpsynth.app.cli import main

    run = tmp_path / "nodp"
    run.mkdir()
    Ledger([LedgerEntry.gaussian("ldm-dp", 1.7, records=50, cache_id="c0ffee")]).save(run)
    lineage = [{"cache_id": "c0ffee", "dp": False}, {"cache_id": "c0ffee", "dp": True}]
    atomic_write_json(run / "model.json", {"kind": "ldm", "trained_on": lineage})
    eps = Ledger.load(run).composed_epsilon()[0]
    assert len(format_bound(eps, 3)) >= 3  # digits the page would not hold by chance
    assert main(["budget", str(run / "ledger.json"), "--json"]) == 0  # the file, not the run
    assert json.loads(capsys.readouterr().out)["epsilon"] is None
    text = write_report(run, tmp_path / "out").read_text()
    for section in ("summary", "ledger"):
        html = text.split(f'<section id="{section}">')[1].split("</section>")[0]
        composed = html.replace(str(tmp_path), "").split("<h3>Stages</h3>")[0]
        assert "∞" in composed and format_bound(eps, 3) not in composed, section
    assert "<b>NOT DP</b>: a stage of this model trained without DP on cache c0ffee" in text
    assert "Protected:" not in text  # no promise for a model that learned patients un-noised


def test_missing_pieces_render_notes(tmp_path):
    run = tmp_path / "empty-run"
    run.mkdir()
    text = write_report(run, tmp_path / "out").read_text()
    page = _Page(text)
    assert page.headings == TITLES
    assert page.images == []
    assert text.count("Not run:") >= 8
    assert "no differential-privacy guarantee" in text


def test_malformed_inputs_cost_only_their_section(tmp_path, cache):
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "ledger.json").write_text("{not json")
    (run / "eval" / "metrics.json").write_text(
        json.dumps(
            {
                "synthetic": str(tmp_path / "gone"),
                "real": f"{cache}[test]",
                "metrics": {"frd": {"value": "oops"}},
                "privacy_audit": {"membership_inference": {"volume": "garbage"}},
            }
        )
    )
    text = write_report(run, tmp_path / "out").read_text()
    assert _Page(text).headings == TITLES
    assert "Could not read the privacy ledger" in text and "not valid JSON" in text
    assert "Could not read synthetic" in text and "gone" in text
    assert "Could not render this section" in text  # the audit entry is not an object
    assert len(_Page(text).images) >= 1  # real volumes still shown


def test_report_replaces_output_atomically(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    write_report(run, out)
    assert sorted(p.name for p in out.iterdir()) == ["index.html"]


def test_montage_and_privacy_utility_figures(tmp_path):
    rng = np.random.default_rng(0)
    volumes = rng.random((3, *SHAPE), dtype=np.float32)
    attrs = np.full((3, len(ATTRIBUTES)), np.nan, dtype=np.float32)
    attrs[:, INDEX["LVEDV"]] = [120, 150, 180]
    attrs[:, INDEX["ESED"]] = [1, 0, 1]
    png = montage(volumes, attrs, tmp_path / "m.png")
    assert imread(png).shape[1] > 200
    assert figures.attribute_caption(attrs[0]).startswith("ED ? ?y")
    assert "LV 120/?" in figures.attribute_caption(attrs[0])
    runs = [("a", 1.0, {"frd": 9.0}), ("b", 10.0, {"frd": 5.0}), ("c", float("inf"), {"frd": 3.0})]
    assert imread(io.BytesIO(figures.privacy_utility(runs, ["frd"])), format="png").size > 0


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_report_renders_in_headless_chromium(report, tmp_path):
    path, _ = report
    flags = [
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    url = path.resolve().as_uri()
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = _Page(dom.stdout)
    assert page.headings == TITLES
    # the slice viewer's script ran: one canvas per volume it holds
    gallery = dom.stdout[dom.stdout.index('<section id="viewer">') :]
    assert gallery.count("<canvas") == len(re.findall('"group": "', gallery)) > 0
    assert len(page.images) == N_IMAGES
    for src in page.images:
        assert _decode(src).size > 0
    shot = tmp_path / "report.png"
    subprocess.run(
        [*flags, f"--screenshot={shot}", "--window-size=1200,2400", url],
        capture_output=True,
        timeout=120,
        check=True,
    )
    image = imread(shot)
    assert image.shape[:2] == (2400, 1200) and image[..., :3].std() > 0.05
    shutil.copy(shot, Path(path).parent / "screenshot.png")  # for a human to look at


def test_report_says_when_the_lineage_behind_its_epsilon_was_not_checked(tmp_path):
    """A ledger with no model.json beside it (a DP stage still training) states its ε, and
    the page says the lineage was not checked, in the summary and the ledger section."""
    run = tmp_path / "training"
    run.mkdir()
    Ledger([LedgerEntry.gaussian("ldm-dp", 1.7, records=50, cache_id="c0ffee")]).save(run)
    text = write_report(run, tmp_path / "out").read_text()
    summary, ledger = (
        text.split(f'<section id="{s}">')[1].split("</section>")[0] for s in ("summary", "ledger")
    )
    assert "(lineage not checked: ledger section)" in summary
    assert f"Lineage not checked: {run}: no model.json (a stage still training" in ledger
    (run / "model.json").write_text(json.dumps({"kind": "ldm", "trained_on": []}))
    assert "ineage not checked" not in write_report(run, tmp_path / "out2").read_text()


def test_report_states_no_epsilon_where_a_non_private_use_shaped_the_weights(tmp_path):
    """A ledger recording a non-private use other than an evaluation (the sweep's ε = ∞
    training) is NOT DP on the page, as in `budget` and `release`; a validation loss is not."""
    for stage, not_dp in (("sweep-nonprivate-baseline", True), ("ldm-validation", False)):
        run = tmp_path / stage
        run.mkdir()
        Ledger([LedgerEntry.gaussian("ldm-dp", 1.7, records=50, cache_id="c0ffee"),
                LedgerEntry.non_private_use(stage, 50, "", cache_id="c0ffee")]).save(run)  # fmt: skip
        (run / "model.json").write_text(json.dumps({"kind": "ldm", "trained_on": []}))
        eps = Ledger.load(run).composed_epsilon()[0]
        text = write_report(run, tmp_path / f"out-{stage}").read_text()
        ledger = text.split('<section id="ledger">')[1].split("</section>")[0]
        composed = ledger.replace(str(tmp_path), "").split("<h3>Stages</h3>")[0]
        said = f'<b>NOT DP</b>: the ledger records a non-private use "{stage}"' in ledger
        assert said == not_dp and ("∞" in composed) == not_dp
        assert (format_bound(eps, 3) in composed) != not_dp
