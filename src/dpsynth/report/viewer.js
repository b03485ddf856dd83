// dpsynth slice viewer: inlined in the report, served by `dpsynth explore`. No dependencies.
// Volumes travel as base64 8-bit (slices, H, W) arrays and are drawn pixel for pixel on a
// canvas (CSS scales it by a whole factor with pixelated rendering: nothing is resampled).
(function (global) {
  "use strict";

  function decode(b64) {
    const text = atob(b64);
    const bytes = new Uint8Array(text.length);
    for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
    return bytes;
  }

  function drawSlice(canvas, data, shape, k, scale) {
    const h = shape[1], w = shape[2];
    canvas.width = w;
    canvas.height = h;
    canvas.style.width = w * scale + "px";
    canvas.style.height = h * scale + "px";
    const ctx = canvas.getContext("2d");
    const image = ctx.createImageData(w, h);
    const offset = k * h * w;
    for (let i = 0; i < h * w; i++) {
      const v = data[offset + i];
      image.data[4 * i] = v;
      image.data[4 * i + 1] = v;
      image.data[4 * i + 2] = v;
      image.data[4 * i + 3] = 255;
    }
    ctx.putImageData(image, 0, 0);
  }

  // Wheel and arrow keys (Home/End too) over `element` step through `count()` slices.
  function bindScroll(element, count, get, set) {
    const clamp = (k) => Math.max(0, Math.min(count() - 1, k));
    element.addEventListener("wheel", (e) => {
      if (!count()) return;
      e.preventDefault();
      set(clamp(get() + Math.sign(e.deltaY)));
    }, { passive: false });
    element.addEventListener("keydown", (e) => {
      const step = { ArrowDown: 1, ArrowRight: 1, PageDown: 1, ArrowUp: -1, ArrowLeft: -1, PageUp: -1 }[e.key];
      if (step !== undefined) set(clamp(get() + step));
      else if (e.key === "Home") set(0);
      else if (e.key === "End") set(count() - 1);
      else return;
      e.preventDefault();
    });
  }

  // The report's gallery: <div class="dpsynth-gallery"> holding a JSON script element with
  // {"volumes": [{"label", "group", "shape", "data"}]}; one slider scrolls them all together.
  function mountGallery(root) {
    const spec = JSON.parse(root.querySelector("script[type='application/json']").textContent);
    const volumes = spec.volumes.map((v) => ({ ...v, bytes: decode(v.data) }));
    const slices = Math.max(...volumes.map((v) => v.shape[0]));
    const slider = root.querySelector("input[type=range]");
    const label = root.querySelector(".slice-label");
    const grid = root.querySelector(".volumes");
    const canvases = volumes.map((v) => {
      const figure = document.createElement("figure");
      const canvas = document.createElement("canvas");
      const caption = document.createElement("figcaption");
      caption.textContent = v.label;
      figure.className = v.group;
      figure.append(canvas, caption);
      grid.append(figure);
      return canvas;
    });
    let current = Math.floor(slices / 2);
    function show(k) {
      current = k;
      slider.value = k;
      label.textContent = `slice ${k + 1} / ${slices} (base → apex)`;
      volumes.forEach((v, i) => {
        const scale = Math.max(1, Math.floor(160 / v.shape[2]));
        drawSlice(canvases[i], v.bytes, v.shape, Math.min(k, v.shape[0] - 1), scale);
      });
      root.dataset.slice = k;
    }
    slider.max = slices - 1;
    slider.addEventListener("input", () => show(Number(slider.value)));
    bindScroll(root, () => slices, () => current, show);
    show(current);
  }

  global.dpsynthViewer = { decode, drawSlice, bindScroll, mountGallery };
  if (typeof document !== "undefined") {
    document.addEventListener("DOMContentLoaded", () => {
      document.querySelectorAll(".dpsynth-gallery").forEach(mountGallery);
    });
  }
})(window);
