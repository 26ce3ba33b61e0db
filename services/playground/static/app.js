// genserve playground: plain browser JavaScript, no build step, no third-party code.
// Every request goes to this origin's /v1 API, the same endpoints applications call
// (so the playground's traffic shows in the metrics and dashboards like any other).
"use strict";

const $ = (id) => document.getElementById(id);
const INTEGER_FIELDS = new Set(["num_inference_steps", "seed", "width", "height", "num_images", "preview_every",
  "cache_interval", "class_label", "style_seed", "crossover", "frames", "seed_b", "tile", "tile_overlap"]);
const KEY_STORAGE = "genserve-playground-key";
let models = null; // GET /v1/models

class ApiError extends Error {
  constructor(status, error) {
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.code = error.code;
    this.field = error.field;
    this.limit = error.limit;
    this.requestId = error.request_id;
  }
}

// -- HTTP ----------------------------------------------------------------------------------
function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function failure(response) {
  let error = { message: `HTTP ${response.status}` };
  try { error = (await response.json()).error || error; } catch (_) { /* not JSON */ }
  return new ApiError(response.status, error);
}

async function postJSON(path, body) {
  const response = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (!response.ok) throw await failure(response);
  return response.json();
}

// Server-sent events over fetch (EventSource cannot POST): yields {event, data}.
async function* sse(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
    }
  }
}

// -- forms and errors ------------------------------------------------------------------------
function formBody(form) {
  const body = {};
  for (const el of form.querySelectorAll("[name]")) {
    const value = el.value.trim();
    if (value === "") continue;
    if (el.type === "number") body[el.name] = INTEGER_FIELDS.has(el.name) ? Number.parseInt(value, 10) : Number(value);
    else body[el.name] = value;
  }
  return body;
}

function clearError(box, form) {
  box.hidden = true;
  box.textContent = "";
  for (const el of form.querySelectorAll("[aria-invalid]")) {
    el.removeAttribute("aria-invalid");
    el.removeAttribute("aria-errormessage");
  }
}

function showError(box, form, err) {
  let text = err.message;
  if (err.field) text = `${err.field}: ${text.replace(new RegExp(`^${err.field}: `), "")}`;
  if (err.limit !== undefined && err.limit !== null) text += ` (limit: ${err.limit})`;
  if (err.requestId) text += ` — request ${err.requestId}`;
  box.textContent = text;
  box.hidden = false;
  const input = err.field && form.querySelector(`[name="${CSS.escape(err.field.split(".")[0])}"]`);
  if (input) {
    input.setAttribute("aria-invalid", "true");
    input.setAttribute("aria-errormessage", box.id);
    input.focus();
  }
}

// -- models --------------------------------------------------------------------------------
// whatever the family (SD, SDXL, FLUX, ...): the models that say they serve the endpoint
const serves = (m, path) => m.endpoint.split(", ").includes(path);
const modelNamed = (name) => models && models.models.find((m) => m.name === name);

function fillSelect(select, names, preferred) {
  select.replaceChildren(...names.map((name) => new Option(name, name, false, name === preferred)));
}

// an input's min/max from a {min, max} limit of GET /v1/models (absent: left as they are)
function setLimits(id, lim) {
  if (lim && typeof lim === "object") { $(id).min = lim.min; $(id).max = lim.max; }
}

function applyLimits(model) {
  const p = model.parameters;
  setLimits("t-steps", p.num_inference_steps);
  setLimits("t-count", p.num_images);
  setLimits("t-cache", p.cache_interval);  // max 1 where the model has no shallow U-Net (FLUX)
  for (const axis of ["width", "height"]) {
    const lim = p[axis];
    if (lim && typeof lim === "object") {
      const input = $(`t-${axis}`);
      Object.assign(input, { min: lim.min, max: lim.max, step: lim.multiple_of, placeholder: `${lim.default} (native)` });
    }
  }
  const scheduler = $("t-scheduler");
  const current = scheduler.value;
  fillSelect(scheduler, p.schedulers || [], current);
  scheduler.prepend(new Option("model default", "", false, !current));
  // LoRA: the model's adapters (loaded or loadable), where it serves them
  const lora = p.lora;
  const adapter = $("t-lora");
  const chosen = adapter.value;
  fillSelect(adapter, lora ? lora.adapters : [], chosen);
  adapter.prepend(new Option("none", "", false, !chosen || !(lora && lora.adapters.includes(chosen))));
  $("t-lora-field").hidden = $("t-lora-scale-field").hidden = !lora;
  if (lora) setLimits("t-lora-scale", lora.scale);
}

// the form's LoRA adapter as the request's `lora` (none chosen: the field is left out)
function loraBody(body) {
  if (!$("t-lora-field").hidden && $("t-lora").value) {
    body.lora = [{ name: $("t-lora").value, scale: Number($("t-lora-scale").value || 1) }];
  }
  return body;
}

async function loadModels() {
  const status = $("server-status");
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (response.status === 401) {
      status.textContent = "This server needs an API key: enter it above.";
      return;
    }
    if (!response.ok) throw await failure(response);
    models = await response.json();
  } catch (err) {
    status.textContent = `Models could not be listed: ${err.message}`;
    return;
  }
  const all = models.models;
  const named = (test) => all.filter(test).map((m) => m.name);
  const defaults = models.default_models;
  const offered = {  // tab -> [its model select, the models it offers, the preferred one]
    "tab-txt2img": ["t-model", named((m) => serves(m, "/v1/txt2img")), defaults.diffusion],
    "tab-edit": ["e-model", named((m) => serves(m, "/v1/txt2img") && serves(m, "/v1/inpaint")), defaults.diffusion],
    "tab-gan": ["g-model", named((m) => serves(m, "/v1/gan/generate")), defaults.gan],
    "tab-style": ["s-model", named((m) => serves(m, "/v1/gan/mix")), defaults.gan],
    "tab-ddpm": ["d-model", named((m) => serves(m, "/v1/ddpm/generate")), defaults.ddpm],
    "tab-vae": ["v-model", named((m) => serves(m, "/v1/vae/sample")), defaults.vae],
    "tab-upscale": ["u-model", named((m) => serves(m, "/v1/upscale") || serves(m, "/v1/translate")), null],
  };
  // a tab for each family the repository serves, none for the others
  for (const [tab, [select, names, preferred]] of Object.entries(offered)) {
    fillSelect($(select), names, preferred);
    $(tab).hidden = names.length === 0;
  }
  for (const option of $("u-model").options) {
    const p = modelNamed(option.value).parameters;
    option.textContent = `${option.value} (${p.scale > 1 ? `x${p.scale} upscale` : "translate"})`;
  }
  const selected = document.querySelector("[role=tab][aria-selected=true]");
  if (selected.hidden && visibleTabs().length) selectTab(visibleTabs()[0]);
  const chosen = modelNamed($("t-model").value);
  if (chosen) applyLimits(chosen);
  applyFamilyLimits();
  resetCanvas();
  status.textContent = `Connected: ${all.length} models on the ${all[0] ? all[0].backend : "?"} backend.`;
}

// The limits of the newer tabs' models (StyleGAN, DDPM, VAE, image -> image).
function applyFamilyLimits() {
  const params = (select) => (modelNamed($(select).value) || { parameters: {} }).parameters;
  const s = params("s-model");
  setLimits("s-crossover", s.crossover);
  setLimits("s-frames", s.frames);
  const d = params("d-model");
  setLimits("d-steps", d.num_inference_steps);
  setLimits("d-count", d.num_images);
  fillSelect($("d-scheduler"), d.schedulers || [], $("d-scheduler").value || "ddim");
  $("d-class").disabled = !d.class_label;  // unconditional models take no class
  if (!d.class_label) $("d-class").value = "";
  setLimits("d-class", d.class_label);
  const v = params("v-model");
  setLimits("v-count", v.num_images);
  setLimits("v-frames", v.frames);
  const u = params("u-model");
  $("u-run").textContent = u.scale > 1 ? "Upscale" : "Translate";
  if (u.tile) {
    setLimits("u-tile", u.tile);
    Object.assign($("u-tile"), { step: u.tile.multiple_of, placeholder: `${u.tile.default} (model default)` });
    setLimits("u-overlap", u.tile_overlap);
    $("u-overlap").placeholder = `${u.tile_overlap.default} (model default)`;
  }
}

// -- gallery -------------------------------------------------------------------------------
function blobOf(image) {
  const bytes = Uint8Array.from(atob(image.data), (c) => c.charCodeAt(0));
  return new Blob([bytes], { type: image.media_type });
}

function addToGallery(result, task, request) {
  const gallery = $("gallery");
  for (const image of result.images) {
    const seeded = image.seed !== undefined && image.seed !== null;
    const params = { ...result.parameters, seed: image.seed, num_images: 1 };
    const url = URL.createObjectURL(blobOf(image));
    const item = document.createElement("li");
    const img = new Image();
    img.src = url;
    img.alt = `${task} by ${result.model}${seeded ? `, seed ${image.seed}` : ""}${params.prompt ? `: ${params.prompt}` : ""}`;
    const list = document.createElement("dl");
    const shown = { task, model: result.model, ...(seeded ? { seed: image.seed } : {}),
      size: `${image.width}x${image.height}` };
    for (const key of ["prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "scheduler", "strength",
      "cache_interval", "class_label", "truncation_psi", "style_seed", "crossover", "scale", "tile"]) {
      if (params[key] !== undefined && params[key] !== null && params[key] !== "") shown[key] = params[key];
    }
    if (image.class_label !== undefined && image.class_label !== null) shown.class_label = image.class_label;
    if (params.lora) shown.lora = params.lora.map((a) => `${a.name} × ${a.scale}`).join(", ");
    for (const [key, value] of Object.entries(shown)) {
      const dt = document.createElement("dt");
      dt.textContent = key;
      const dd = document.createElement("dd");
      dd.textContent = String(value);
      list.append(dt, dd);
    }
    const download = document.createElement("a");
    download.href = url;
    download.download = `genserve-${result.model}-${seeded ? image.seed : task}.${image.media_type.split("/")[1]}`;
    download.textContent = "Download";
    item.append(img, list, download);
    if (FORMS[task] && seeded) {  // a form that takes these parameters back
      const reproduce = document.createElement("button");
      reproduce.type = "button";
      reproduce.textContent = "Reproduce";
      reproduce.setAttribute("aria-label", `Put the parameters of seed ${image.seed} into the form`);
      reproduce.addEventListener("click", () => fillForm(task, result.model, params, image));
      item.append(document.createTextNode(" "), reproduce);
    }
    // the request body that reproduces this image alone (tests and curious users read it)
    item.dataset.request = JSON.stringify({ ...request, ...pick(params, request), model: result.model,
      seed: image.seed, num_images: 1 });
    gallery.prepend(item);
  }
}

function pick(params, request) {
  const out = {};
  for (const key of Object.keys(request)) if (params[key] !== undefined) out[key] = params[key];
  return out;
}

// task -> [its form, its tab, its Generate button]: what "Reproduce" fills in
const FORMS = {
  txt2img: ["txt2img-form", "tab-txt2img", "t-generate"],
  img2img: ["edit-form", "tab-edit", "e-generate"],
  inpaint: ["edit-form", "tab-edit", "e-generate"],
  gan: ["gan-form", "tab-gan", "g-generate"],
  ddpm: ["ddpm-form", "tab-ddpm", "d-generate"],
};

function fillForm(task, model, params, image) {
  const [form, tab, button] = FORMS[task];
  for (const el of $(form).querySelectorAll("[name]")) {
    if (el.name === "model") el.value = model;
    else if (el.name === "width") el.value = image.width;
    else if (el.name === "height") el.value = image.height;
    else if (params[el.name] !== undefined && params[el.name] !== null) el.value = params[el.name];
  }
  if (task === "txt2img") {  // its LoRA adapter too (the form's first; none when the image had none)
    const [first] = params.lora || [];
    $("t-lora").value = first ? first.name : "";
    if (first) $("t-lora-scale").value = first.scale;
  }
  selectTab($(tab));
  $(button).focus();
}

// -- text to image (streamed) --------------------------------------------------------------
let running = null; // the AbortController of the request in flight

async function txt2img(event) {
  event.preventDefault();
  const form = $("txt2img-form");
  const box = $("t-error");
  clearError(box, form);
  const body = loraBody(formBody(form));
  const progress = $("t-progress");
  const status = $("t-status");
  const previews = $("t-previews");
  previews.replaceChildren();
  progress.value = 0;
  running = new AbortController();
  $("t-generate").disabled = true;
  $("t-cancel").disabled = false;
  status.textContent = "Queued…";
  const started = performance.now();
  try {
    const response = await fetch("/v1/txt2img/stream", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: running.signal,
    });
    if (!response.ok) throw await failure(response);
    for await (const { event: name, data } of sse(response)) {
      if (name === "progress") {
        progress.max = data.total;
        progress.value = data.step;
        status.textContent = `Step ${data.step} of ${data.total}`;
      } else if (name === "preview") {
        previews.replaceChildren(...data.images.map((image, i) => {
          const img = new Image();
          img.src = `data:${image.media_type};base64,${image.data}`;
          img.alt = `Preview of image ${i + 1} at step ${data.step}`;
          img.dataset.step = data.step;
          return img;
        }));
      } else if (name === "result") {
        progress.value = progress.max;
        addToGallery(data, "txt2img", body);
        status.textContent = `Done: ${data.images.length} image(s) in ${((performance.now() - started) / 1000).toFixed(1)} s`;
      } else if (name === "error") {
        throw new ApiError(data.status, data.error || {});
      }
    }
  } catch (err) {
    if (err.name === "AbortError") status.textContent = "Cancelled";
    else {
      status.textContent = "Failed";
      showError(box, form, err);
    }
  } finally {
    running = null;
    $("t-generate").disabled = false;
    $("t-cancel").disabled = true;
  }
}

function cancel() {
  // Aborting closes the connection; the server takes that as a cancellation and the
  // request leaves the engine's batch at its next step.
  if (running) running.abort();
}

// -- image to image / inpaint --------------------------------------------------------------
const base = document.createElement("canvas"); // the image, at the model's size
const mask = document.createElement("canvas"); // white = repaint
let hasImage = false;

function modelSize() {
  const model = models && models.models.find((m) => m.name === $("e-model").value);
  const p = model ? model.parameters : {};
  const side = (lim) => (lim && typeof lim === "object" ? lim.default : 32);
  return [side(p.width), side(p.height)];
}

function resetCanvas() {
  const [w, h] = modelSize();
  for (const c of [base, mask, $("e-canvas")]) { c.width = w; c.height = h; }
  const ctx = base.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, w, h);
  clearMask();
  hasImage = false;
}

function clearMask() {
  const ctx = mask.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, mask.width, mask.height);
  redraw();
}

function redraw() {
  const view = $("e-canvas");
  const ctx = view.getContext("2d");
  ctx.globalAlpha = 1;
  ctx.drawImage(base, 0, 0);
  ctx.globalAlpha = 0.55;
  const tint = document.createElement("canvas");
  tint.width = mask.width;
  tint.height = mask.height;
  const t = tint.getContext("2d");
  t.drawImage(mask, 0, 0);
  t.globalCompositeOperation = "multiply";
  t.fillStyle = "#ff3030";
  t.fillRect(0, 0, tint.width, tint.height);
  ctx.globalCompositeOperation = "screen";
  ctx.drawImage(tint, 0, 0);
  ctx.globalCompositeOperation = "source-over";
  ctx.globalAlpha = 1;
}

async function drawFile(file, target) {
  const bitmap = await createImageBitmap(file);
  target.getContext("2d").drawImage(bitmap, 0, 0, target.width, target.height);
  redraw();
}

function paint(event) {
  if (!(event.buttons & 1)) return;
  const view = $("e-canvas");
  const rect = view.getBoundingClientRect();
  const x = ((event.clientX - rect.left) / rect.width) * mask.width;
  const y = ((event.clientY - rect.top) / rect.height) * mask.height;
  const ctx = mask.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.beginPath();
  ctx.arc(x, y, Number($("e-brush").value) / 2, 0, 2 * Math.PI);
  ctx.fill();
  redraw();
}

function maskIsEmpty() {
  const pixels = mask.getContext("2d").getImageData(0, 0, mask.width, mask.height).data;
  for (let i = 0; i < pixels.length; i += 4) if (pixels[i] > 127) return false;
  return true;
}

const base64Of = (canvas) => canvas.toDataURL("image/png").split(",")[1];

async function edit(event) {
  event.preventDefault();
  const form = $("edit-form");
  const box = $("e-error");
  clearError(box, form);
  const status = $("e-status");
  if (!hasImage) {
    showError(box, form, { message: "choose an image first", field: null });
    $("e-image").focus();
    return;
  }
  const inpaint = !maskIsEmpty();
  const body = { ...formBody(form), image: base64Of(base) };
  if (inpaint) body.mask = base64Of(mask);
  status.textContent = inpaint ? "Inpainting…" : "Image to image…";
  $("e-generate").disabled = true;
  try {
    const result = await postJSON(inpaint ? "/v1/inpaint" : "/v1/img2img", body);
    const { image: _i, mask: _m, ...shown } = body;
    addToGallery(result, inpaint ? "inpaint" : "img2img", shown);
    status.textContent = `Done: ${result.images.length} image(s)`;
  } catch (err) {
    status.textContent = "Failed";
    showError(box, form, err);
  } finally {
    $("e-generate").disabled = false;
  }
}

// -- GAN -----------------------------------------------------------------------------------
async function gan(event) {
  event.preventDefault();
  const form = $("gan-form");
  const box = $("g-error");
  clearError(box, form);
  const body = formBody(form);
  $("g-status").textContent = "Generating…";
  try {
    const result = await postJSON("/v1/gan/generate", body);
    addToGallery(result, "gan", body);
    $("g-status").textContent = `Done: ${result.images.length} image(s)`;
  } catch (err) {
    $("g-status").textContent = "Failed";
    showError(box, form, err);
  }
}

// -- the newer families: one request, the result shown in the tab and/or the gallery -------
// Runs `request` with the tab's status line, error box and button; shows what it throws.
async function run(prefix, form, button, working, request) {
  const box = $(`${prefix}-error`);
  clearError(box, $(form));
  const status = $(`${prefix}-status`);
  status.textContent = working;
  $(button).disabled = true;
  const started = performance.now();
  try {
    const done = await request();
    status.textContent = `${done} in ${((performance.now() - started) / 1000).toFixed(1)} s`;
  } catch (err) {
    status.textContent = "Failed";
    showError(box, $(form), err);
  } finally {
    $(button).disabled = false;
  }
}

// A row of captioned images (interpolation frames, a style mix and its sources).
function showStrip(container, images, captions) {
  container.replaceChildren(...images.map((image, i) => {
    const figure = document.createElement("figure");
    const img = new Image();
    img.src = URL.createObjectURL(blobOf(image));
    img.alt = captions[i];
    const caption = document.createElement("figcaption");
    caption.textContent = captions[i];
    figure.append(img, caption);
    return figure;
  }));
}

function ddpm(event) {
  event.preventDefault();
  const body = formBody($("ddpm-form"));
  run("d", "ddpm-form", "d-generate", "Denoising…", async () => {
    const result = await postJSON("/v1/ddpm/generate", body);
    addToGallery(result, "ddpm", body);
    return `Done: ${result.images.length} image(s)`;
  });
}

function vaeSample(event) {
  event.preventDefault();
  const { model, seed, num_images: count } = formBody($("vae-form"));
  const body = { model, seed, num_images: count };
  run("v", "vae-form", "v-sample", "Decoding samples…", async () => {
    const result = await postJSON("/v1/vae/sample", body);
    addToGallery(result, "vae sample", body);
    return `Done: ${result.images.length} sample(s)`;
  });
}

function vaeInterpolate() {
  const { model, seed, seed_b: seedB, frames } = formBody($("vae-form"));
  run("v", "vae-form", "v-interpolate", "Interpolating…", async () => {
    const result = await postJSON("/v1/vae/interpolate", { model, seed_a: seed, seed_b: seedB, frames });
    showStrip($("v-strip"), result.images, result.images.map((_, i) => `frame ${i + 1} of ${result.images.length}`));
    return `Done: seed ${seed} to seed ${seedB} in ${result.images.length} frames`;
  });
}

function styleMix(event) {
  event.preventDefault();
  const { model, seed, style_seed: styleSeed, crossover, truncation_psi: psi } = formBody($("style-form"));
  const body = { model, seed, style_seed: styleSeed, crossover, truncation_psi: psi, include_sources: true };
  run("s", "style-form", "s-mix", "Mixing…", async () => {
    const result = await postJSON("/v1/gan/mix", body);
    const layer = result.parameters.crossover;
    showStrip($("s-strip"), [result.images[1], result.images[2], result.images[0]],
      [`seed ${seed}`, `style seed ${styleSeed}`, `mixed: layers from ${layer} on from seed ${styleSeed}`]);
    addToGallery({ ...result, images: [result.images[0]] }, "style mix", body);
    return `Done: crossover at layer ${layer}`;
  });
}

function styleInterpolate() {
  const { model, seeds: text, frames, space, truncation_psi: psi } = formBody($("style-form"));
  const seeds = (text || "").split(",").map((s) => s.trim()).filter((s) => s !== "");
  if (!seeds.length || seeds.some((s) => !/^\d+$/.test(s))) {
    showError($("s-error"), $("style-form"), { message: "give whole seeds separated by commas, e.g. 1, 2, 3",
      field: "seeds" });
    return;
  }
  const body = { model, seeds: seeds.map(Number), frames, space, truncation_psi: psi };
  run("s", "style-form", "s-interpolate", "Interpolating…", async () => {
    const result = await postJSON("/v1/gan/interpolate", body);
    const step = result.parameters.frames - 1; // segments share their end frames: seed k is frame k * step
    showStrip($("s-strip"), result.images, result.images.map((_, i) => (
      i % step === 0 ? `seed ${body.seeds[i / step]}` : `frame ${i + 1} of ${result.images.length}`)));
    return `Done: ${result.images.length} frames in ${space.toUpperCase()}`;
  });
}

// -- upscale / translate: the input beside the output ----------------------------------------
let upscaleInput = null; // {data: base64 of the file as given, url, width, height}

async function chooseUpscaleInput(blob) {
  const data = await new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result.split(",")[1]);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
  const bitmap = await createImageBitmap(blob);
  if (upscaleInput) URL.revokeObjectURL(upscaleInput.url);
  upscaleInput = { data, url: URL.createObjectURL(blob), width: bitmap.width, height: bitmap.height };
  $("u-status").textContent = `Input: ${bitmap.width}x${bitmap.height}`;
}

// The newest gallery image as input (a canvas copy: fetching its blob: URL would need connect-src blob:).
function useNewestImage() {
  const img = document.querySelector("#gallery li img");
  if (!img) {
    showError($("u-error"), $("upscale-form"), { message: "the gallery is empty: generate an image first" });
    return;
  }
  const canvas = document.createElement("canvas");
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  canvas.getContext("2d").drawImage(img, 0, 0);
  canvas.toBlob((blob) => chooseUpscaleInput(blob), "image/png");
}

function upscale(event) {
  event.preventDefault();
  const form = $("upscale-form");
  if (!upscaleInput) {
    showError($("u-error"), form, { message: "choose an input image first (or use the newest gallery image)" });
    $("u-image").focus();
    return;
  }
  const model = modelNamed($("u-model").value);
  const translate = Boolean(model) && serves(model, "/v1/translate");
  const body = { ...formBody(form), image: upscaleInput.data };
  const input = upscaleInput;
  run("u", "upscale-form", "u-run", translate ? "Translating…" : "Upscaling…", async () => {
    const result = await postJSON(translate ? "/v1/translate" : "/v1/upscale", body);
    const out = result.images[0];
    const after = $("u-after");
    if (after.src.startsWith("blob:")) URL.revokeObjectURL(after.src);
    after.src = URL.createObjectURL(blobOf(out));
    $("u-before").src = input.url;
    $("u-before-caption").textContent = `Before: ${input.width}x${input.height} (enlarged without smoothing)`;
    $("u-after-caption").textContent = `After: ${result.model}, ${out.width}x${out.height}`;
    $("u-compare").hidden = false;
    const { image: _i, ...shown } = body;
    addToGallery(result, translate ? "translate" : "upscale", shown);
    return `Done: ${input.width}x${input.height} → ${out.width}x${out.height}`;
  });
}

// -- tabs (WAI-ARIA tabs pattern: arrows, Home and End move between tabs) -------------------
const visibleTabs = () => [...document.querySelectorAll("[role=tab]")].filter((t) => !t.hidden);

function selectTab(tab) {
  for (const t of document.querySelectorAll("[role=tab]")) {
    const selected = t === tab;
    t.setAttribute("aria-selected", String(selected));
    t.tabIndex = selected ? 0 : -1;
    $(t.getAttribute("aria-controls")).hidden = !selected;
  }
}

function tabKeys(event) {
  const tabs = visibleTabs();
  const i = tabs.indexOf(document.activeElement);
  const next = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 }[event.key];
  if (next === undefined || i < 0) return;
  event.preventDefault();
  const tab = tabs[(next + tabs.length) % tabs.length];
  selectTab(tab);
  tab.focus();
}

// -- wiring --------------------------------------------------------------------------------
window.addEventListener("DOMContentLoaded", () => {
  const key = $("api-key");
  key.value = sessionStorage.getItem(KEY_STORAGE) || "";
  key.addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORAGE, key.value.trim());
    loadModels();
  });
  for (const tab of document.querySelectorAll("[role=tab]")) tab.addEventListener("click", () => selectTab(tab));
  $("tabs").addEventListener("keydown", tabKeys);
  $("txt2img-form").addEventListener("submit", txt2img);
  $("t-cancel").addEventListener("click", cancel);
  $("t-model").addEventListener("change", () => {
    const chosen = models && models.models.find((m) => m.name === $("t-model").value);
    if (chosen) applyLimits(chosen);
  });
  $("edit-form").addEventListener("submit", edit);
  $("e-model").addEventListener("change", resetCanvas);
  $("e-clear").addEventListener("click", clearMask);
  $("e-image").addEventListener("change", async (e) => {
    if (e.target.files[0]) { await drawFile(e.target.files[0], base); hasImage = true; }
  });
  $("e-mask-file").addEventListener("change", async (e) => {
    if (e.target.files[0]) await drawFile(e.target.files[0], mask);
  });
  const view = $("e-canvas");
  view.addEventListener("pointerdown", (e) => { view.setPointerCapture(e.pointerId); paint(e); });
  view.addEventListener("pointermove", paint);
  $("gan-form").addEventListener("submit", gan);
  $("style-form").addEventListener("submit", styleMix);
  $("s-interpolate").addEventListener("click", styleInterpolate);
  $("ddpm-form").addEventListener("submit", ddpm);
  $("vae-form").addEventListener("submit", vaeSample);
  $("v-interpolate").addEventListener("click", vaeInterpolate);
  $("upscale-form").addEventListener("submit", upscale);
  $("u-from-gallery").addEventListener("click", useNewestImage);
  $("u-image").addEventListener("change", (e) => { if (e.target.files[0]) chooseUpscaleInput(e.target.files[0]); });
  for (const id of ["s-model", "d-model", "v-model", "u-model"]) $(id).addEventListener("change", applyFamilyLimits);
  resetCanvas();
  loadModels();
});
