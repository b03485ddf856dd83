// dpsynth explore: the page's controls, one request at a time, and the slice views.
(function () {
  "use strict";
  const V = window.dpsynthViewer;
  const $ = (id) => document.getElementById(id);
  const state = { info: null, volume: null, slice: 0, generation: 0 };
  window.dpsynthExplore = state; // for tests and the console

  function setBusy(busy, text) {
    document.body.dataset.state = busy ? "busy" : "idle";
    $("progress").hidden = !busy;
    $("generate").disabled = busy;
    $("draw").disabled = busy;
    $("status").textContent = text || "";
  }

  function showError(message) {
    $("error").textContent = message || "";
  }

  function fmt(x, digits) {
    return x === null || x === undefined ? "—" : Number(x).toFixed(digits);
  }

  function attributeRow(a) {
    const row = document.createElement("div");
    row.className = "row attribute";
    // Bounds rounded inwards to 3 decimals: Chromium writes a range's value with 15
    // significant digits, so at a 17-digit `min` (61.91218566894531) the slider's low end
    // reads 61.9121856689453, under its own min, and the invalid form silently never submits.
    const lo = a.categorical ? a.min : Math.ceil(a.min * 1000) / 1000;
    const hi = a.categorical ? a.max : Math.floor(a.max * 1000) / 1000;
    const step = a.categorical ? 1 : Number(((hi - lo) / 200).toPrecision(3));
    const mid = a.categorical ? lo : (lo + hi) / 2;
    row.innerHTML =
      `<label for="attr-${a.name}" title="${a.unit}">${a.name}</label>` +
      `<input type="checkbox" id="known-${a.name}" title="known">` +
      `<input type="range" id="attr-${a.name}" min="${lo}" max="${hi}" step="${step}" value="${mid}" disabled>` +
      `<output id="value-${a.name}"></output><span class="unit">${a.unit}` +
      // in the fixed-width unit column, so every row's slider keeps the same width
      (a.learned ? "" : `<br><span class="untaught" id="untaught-${a.name}" ` +
        `title="this model's training never gave ${a.name}: a value set here reads as unknown">not learned</span>`) +
      "</span>";
    const slider = row.querySelector("input[type=range]");
    const known = row.querySelector("input[type=checkbox]");
    const output = row.querySelector("output");
    const update = () => {
      slider.disabled = !known.checked;
      output.textContent = known.checked ? fmt(slider.value, a.categorical ? 0 : 1) : "unknown";
      row.classList.toggle("unknown", !known.checked);
    };
    slider.addEventListener("input", update);
    known.addEventListener("change", update);
    update();
    row.update = update;
    return row;
  }

  function setAttribute(name, value) {
    const known = $(`known-${name}`);
    if (!known) return;
    known.checked = value !== null;
    if (value !== null) $(`attr-${name}`).value = value;
    known.dispatchEvent(new Event("change"));
  }

  function phase() {
    const v = document.querySelector("input[name=phase]:checked").value;
    return v === "" ? null : Number(v);
  }

  function request() {
    const attributes = { ESED: phase() };
    for (const a of state.info.attributes) {
      if (a.name === "ESED") continue;
      attributes[a.name] = $(`known-${a.name}`).checked ? Number($(`attr-${a.name}`).value) : null;
    }
    return {
      attributes,
      seed: Number($("seed").value),
      guidance: Number($("guidance").value),
      steps: Number($("steps").value),
      sampler: $("sampler").value,
      candidates: Number($("candidates").value),
    };
  }

  async function call(url, options) {
    const reply = await fetch(url, options);
    const body = await reply.json().catch(() => ({ detail: `HTTP ${reply.status}` }));
    if (!reply.ok) throw new Error(body.detail || `HTTP ${reply.status}`);
    return body;
  }

  async function generate() {
    showError("");
    const started = performance.now();
    const tick = setInterval(() => {
      $("status").textContent = `generating… ${((performance.now() - started) / 1000).toFixed(1)} s`;
    }, 100);
    setBusy(true, "generating…");
    try {
      const result = await call("/api/generate", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(request()),
      });
      show(result);
    } catch (e) {
      showError(e.message);
    } finally {
      clearInterval(tick);
      setBusy(false);
    }
  }

  async function draw() {
    showError("");
    const p = phase();
    try {
      const drawn = await call(`/api/draw?seed=${Number($("seed").value)}` + (p === null ? "" : `&phase=${p}`));
      for (const [name, value] of Object.entries(drawn.attributes)) {
        if (name === "ESED") {
          const code = value === null ? "" : String(value);
          document.querySelector(`input[name=phase][value="${code}"]`).checked = true;
        } else setAttribute(name, value);
      }
      $("drawn").hidden = false;
      $("drawn").textContent = "Attributes drawn from the run's DP attribute model (seed " +
        `${$("seed").value}).` + (drawn.clipped.length ? ` Clipped to the sliders' ranges: ${drawn.clipped.join(", ")}.` : "");
    } catch (e) {
      showError(e.message);
      return;
    }
    await generate();
  }

  function showSlice(k) {
    const v = state.volume;
    state.slice = k;
    const scale = Math.max(1, Math.floor(384 / v.shape[2]));
    V.drawSlice($("slice"), v.bytes, v.shape, k, scale);
    $("slice-label").textContent = `slice ${k + 1} / ${v.shape[0]} (base → apex)`;
    $("strip").querySelectorAll("canvas").forEach((c, i) => c.classList.toggle("current", i === k));
    document.body.dataset.slice = k;
  }

  function show(result) {
    const shape = result.shape;
    state.volume = { ...result, bytes: V.decode(result.data) };
    const strip = $("strip");
    strip.replaceChildren();
    const scale = Math.max(1, Math.floor(96 / shape[2]));
    for (let k = 0; k < shape[0]; k++) {
      const c = document.createElement("canvas");
      c.title = `slice ${k + 1}`;
      c.addEventListener("click", () => showSlice(k));
      V.drawSlice(c, state.volume.bytes, shape, k, scale);
      strip.append(c);
    }
    const first = state.generation === 0 || state.slice >= shape[0];
    showSlice(first ? Math.floor(shape[0] / 2) : state.slice);
    $("empty").hidden = true;
    $("volume").hidden = false;
    $("download").href = result.nifti;
    const best = result.candidates > 1 ? `, the best of ${result.candidates}`
      : state.info.selector ? ", drawn plainly (nothing of its phase to compare)" : "";
    $("timing").textContent = `generated in ${result.seconds.toFixed(2)} s${best}`;
    measurements(result);
    state.generation += 1;
    document.body.dataset.generation = state.generation;
  }

  function measurements(result) {
    const rows = [["LV_ML", "LV blood pool", "mL", 0], ["RV_ML", "RV blood pool", "mL", 0],
      ["MYO_THICK", "LV wall thickness", "mm", 1]];
    const table = $("measured");
    if (!result.measured) {
      table.innerHTML = "";
      $("referee-note").textContent = "No referee for this run, so nothing is measured " +
        "(start with --referee DIR, or put one in RUN/referee).";
      return;
    }
    let html = "<tr><th></th><th>requested</th><th>measured</th></tr>";
    for (const [key, label, unit, digits] of rows) {
      const req = result.requested[key];
      const asked = req.value === null ? "unknown" : `${fmt(req.value, digits)} ${unit} (${req.attribute})`;
      html += `<tr><th>${label}</th><td>${asked}</td><td class="num" id="measured-${key}">` +
        `${fmt(result.measured[key], digits)} ${unit}</td></tr>`;
    }
    html += `<tr><th>P(end-diastole)</th><td>${phase() === null ? "unknown" : (phase() ? "ED" : "ES")}</td>` +
      `<td class="num">${fmt(result.measured.P_ED, 2)}</td></tr>`;
    table.innerHTML = html;
    $("referee-note").textContent = state.info.referee;
  }

  // What `dpsynth budget` states of the run (the server reads it through stated_privacy).
  function privacyBadge(p) {
    if (p.error) return " · no ε can be stated";
    if (p.is_not_dp) return " · NOT DP (ε = ∞)";
    const unchecked = p.unchecked.length ? " (lineage not checked)" : "";
    if (p.dp && p.epsilon === null) return ` · DP model, ε unbounded (∞)${unchecked}`;
    if (p.dp) return ` · DP model, ε = ${roundUp(p.epsilon)} at δ = ${p.delta}${unchecked}`;
    if (p.ledger) return ` · no DP mechanism in its ledger${unchecked}`;
    return ` · public model (no privacy ledger)${unchecked}`;
  }

  // Three significant digits, rounded up: a stated ε is never below the accountant's.
  function roundUp(x) {
    const unit = Math.pow(10, Math.floor(Math.log10(x)) - 2);
    const text = (steps) => {
      const v = steps * unit;
      return v >= 100 ? String(Math.round(v)) : v.toPrecision(3);
    };
    let steps = Math.ceil(x / unit) - 1;  // x / unit can land just above or below a step
    while (Number(text(steps)) < x) steps += 1;  // what is shown, read back, is never below
    return text(steps);
  }

  async function start() {
    try {
      state.info = await call("/api/info");
    } catch (e) {
      showError(e.message);
      return;
    }
    const info = state.info;
    $("run").textContent = info.run;
    const [s, h, w] = info.shape;
    $("grid").textContent = `${s} × ${h} × ${w} voxels of ${info.spacing[2]} × ${info.spacing[1]} × ${info.spacing[0]} mm` +
      privacyBadge(info.privacy) + (info.evaluation_only ? ` · evaluation only: ${info.evaluation_only}` : "");
    const box = $("attributes");
    for (const a of info.attributes) if (a.name !== "ESED") box.append(attributeRow(a));
    const d = info.defaults;
    $("seed").value = d.seed;
    $("guidance").max = info.limits.max_guidance;
    $("guidance").value = d.guidance;
    $("steps").max = info.limits.max_steps;
    $("steps").value = d.steps;
    $("sampler").value = d.sampler;
    $("candidates").max = info.limits.max_candidates;
    $("candidates").value = d.candidates;
    $("candidates-row").hidden = !info.selector;  // no selector: plain draws
    $("temperature").textContent = `${d.temperature} (the run's)`;
    for (const id of ["guidance", "steps", "candidates"]) {
      const update = () => { $(`${id}-value`).textContent = $(id).value; };
      $(id).addEventListener("input", update);
      update();
    }
    $("draw").hidden = !info.attribute_model;
    $("draw").addEventListener("click", draw);
    $("reseed").addEventListener("click", () => { $("seed").value = Math.floor(Math.random() * 1e6); });
    $("controls").addEventListener("submit", (e) => { e.preventDefault(); generate(); });
    const count = () => (state.volume ? state.volume.shape[0] : 0);
    for (const el of [$("slice"), $("strip")]) V.bindScroll(el, count, () => state.slice, showSlice);
    setBusy(false);
  }

  start();
})();
