// sdserve playground: plain JS, no build step. Every URL is relative, so the page works under any route_prefix.
// Generates through the async jobs API (POST v1/jobs, SSE v1/jobs/{id}/events, GET .../result, DELETE to
// cancel); falls back to POST v1/generate when jobs are off. The SSE stream is read with fetch() (not
// EventSource) because EventSource cannot send the Authorization header.
"use strict";

const KEY_STORE = "sdserve.apiKey";
const HISTORY_STORE = "sdserve.history";
const HISTORY_MAX = 24;
const THUMB_SIDE = 192;

const $ = (id) => document.getElementById(id);
const state = { caps: null, model: null, job: null, lastSeed: null };

function apiKey() { return localStorage.getItem(KEY_STORE) || ""; }

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (apiKey()) h["Authorization"] = "Bearer " + apiKey();
  return h;
}

class HttpError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function errorMessage(status, body) {
  const d = body && (body.detail !== undefined ? body.detail : body.error);
  if (Array.isArray(d)) {
    return d.map((e) => (e.loc || []).filter((p) => p !== "body").join(".") + ": " + e.msg).join("\n");
  }
  if (d && typeof d === "object") return d.message || JSON.stringify(d);
  return d ? String(d) : "HTTP " + status;
}

async function api(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = headers(opts.headers);
  const res = await fetch(path, opts);
  if (!res.ok) {
    let body = null;
    try { body = await res.json(); } catch (_) { /* not JSON */ }
    throw new HttpError(res.status, errorMessage(res.status, body));
  }
  return res;
}

// ---------------------------------------------------------------- capabilities and the form
async function loadCapabilities() {
  try {
    const res = await api("v1/capabilities");
    state.caps = await res.json();
  } catch (err) {
    if (err.status === 401) {
      showAuth(apiKey() ? "The stored API key was refused: " + err.message : "This server needs an API key.");
      return;
    }
    showError("Could not read the server's capabilities: " + err.message);
    return;
  }
  $("auth").hidden = !state.caps.auth_required;
  await loadLoras();
  fillSelect($("model"), state.caps.models.map((m) => [m.id, m.id + (m.noise_model ? " (random weights)" : "")]),
             state.caps.default_model);
  fillSelect($("scheduler"), [["", "model default"]].concat(state.caps.schedulers.map((s) => [s, s])), "");
  fillSelect($("format"), state.caps.output_formats.map((f) => [f, f]), "png");
  selectModel();
  $("generate").disabled = false;
  $("server-note").textContent = state.caps.jobs ? "" : "async jobs are off: no progress or cancel";
}

// A model with a LoRA library: its LoRAs come from the replicas (GET v1/loras; files dropped into the folder appear
// on the next page load), shown as the LoRA picker.
async function loadLoras() {
  await Promise.all(state.caps.models.filter((m) => m.lora_library).map(async (m) => {
    try {
      const res = await api("v1/loras?model=" + encodeURIComponent(m.id));
      m.loras = (await res.json()).loras.map((l) => ({ name: l.name, default_weight: 1 }));
    } catch (err) {
      m.loras = [];
      showError("Could not list the LoRAs of " + m.id + ": " + err.message);
    }
  }));
}

function fillSelect(select, options, selected) {
  select.replaceChildren(...options.map(([value, label]) => {
    const o = document.createElement("option");
    o.value = value; o.textContent = label; o.selected = value === selected;
    return o;
  }));
}

function selectModel() {
  const m = state.caps.models.find((x) => x.id === $("model").value) || state.caps.models[0];
  state.model = m;
  const lim = m.limits, def = m.defaults;
  for (const [id, max, value] of [["width", lim.max_width, def.width], ["height", lim.max_height, def.height],
                                  ["steps", lim.max_steps, def.steps], ["num-images", lim.max_images_per_request, 1]]) {
    $(id).max = max;
    if (value) $(id).value = value; else if (id !== "num-images") $(id).placeholder = "default";
  }
  if (def.guidance_scale !== null && def.guidance_scale !== undefined) $("guidance").value = def.guidance_scale;
  $("scheduler").options[0].textContent = "model default (" + m.scheduler + ")";
  $("server-note").textContent = m.noise_model ? "random-weight model: images are noise" : "";
  showFeatures(m);
}

function showFeatures(m) {
  const loras = m.loras || [];
  $("loras-box").hidden = loras.length === 0;
  $("loras").replaceChildren(...loras.map((l) => {
    const row = document.createElement("label");
    row.innerHTML = '<input type="checkbox"> <span></span> <input type="number" min="-2" max="2" step="0.05">';
    row.querySelector("span").textContent = l.name;
    row.querySelector("input[type=number]").value = l.default_weight !== undefined ? l.default_weight : 1;
    row.dataset.lora = l.name;
    return row;
  }));
  const inputs = m.image_inputs || [];
  $("image-inputs-box").hidden = inputs.length === 0;
  $("init-image-label").hidden = $("strength-label").hidden = !inputs.includes("init_image");
  $("mask-label").hidden = !inputs.includes("mask");
  const nets = m.controlnets || [];
  $("controlnet-box").hidden = nets.length === 0;
  fillSelect($("controlnet"), nets.map((c) => [c.name, c.name]), nets.length ? nets[0].name : "");
}

function fileB64(input) {
  const file = input.files && input.files[0];
  if (!file) return Promise.resolve(null);
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",")[1]);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function requestBody() {
  const body = { prompt: $("prompt").value, model: $("model").value, output_format: $("format").value };
  const neg = $("negative-prompt").value;
  if (neg) body.negative_prompt = neg;
  for (const [id, key, parse] of [["width", "width", parseInt], ["height", "height", parseInt],
                                  ["steps", "steps", parseInt], ["guidance", "guidance_scale", parseFloat],
                                  ["num-images", "num_images", parseInt]]) {
    const v = $(id).value;
    if (v !== "") body[key] = parse(v, 10);
  }
  if ($("scheduler").value) body.scheduler = $("scheduler").value;
  if (!$("seed-random").checked && $("seed").value !== "") body.seed = parseInt($("seed").value, 10);
  // Optional features: sent only when the server reported them for this model.
  const m = state.model;
  if ((m.loras || []).length) {
    const picked = [...$("loras").children].filter((r) => r.querySelector("input[type=checkbox]").checked)
      .map((r) => ({ name: r.dataset.lora, weight: parseFloat(r.querySelector("input[type=number]").value) }));
    if (picked.length) body.loras = picked;
  }
  if ((m.image_inputs || []).includes("init_image")) {
    const init = await fileB64($("init-image"));
    if (init) { body.init_image = init; body.strength = parseFloat($("strength").value); }
  }
  if ((m.image_inputs || []).includes("mask")) {
    const mask = await fileB64($("mask"));
    if (mask) body.mask_image = mask;
  }
  if ((m.controlnets || []).length) {
    const image = await fileB64($("control-image"));
    if (image) body.control = [{ model: $("controlnet").value, image, scale: parseFloat($("controlnet-scale").value) }];
  }
  return body;
}

// ---------------------------------------------------------------- generating
function setBusy(busy) {
  $("generate").disabled = busy;
  $("cancel").hidden = !busy || !state.caps.jobs;
  $("cancel").disabled = false;
}

function setStatus(text, step, total) {
  $("status").textContent = text;
  if (total) { $("progress").max = total; $("progress").value = step; }
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function generate(event) {
  event.preventDefault();
  if (state.job) return;
  showError("");
  $("preview").hidden = true;
  $("results").replaceChildren();
  setStatus("submitting", 0, 1);
  let body;
  try { body = await requestBody(); } catch (err) { showError("Could not read a file: " + err); return; }
  state.job = "pending";
  setBusy(true);
  try {
    const result = state.caps.jobs ? await runJob(body) : await runSync(body);
    if (result) showResult(body, result);
  } catch (err) {
    if (err.status === 401) showAuth("API key refused: " + err.message);
    showError(err.message);
    setStatus("failed");
  } finally {
    state.job = null;
    setBusy(false);
  }
}

async function runSync(body) {
  setStatus("generating (no progress without async jobs)", 0, 1);
  const res = await api("v1/generate", { method: "POST", headers: { "Content-Type": "application/json",
                                                                     "Accept": "application/json" },
                                         body: JSON.stringify(body) });
  return res.json();
}

async function runJob(body) {
  const res = await api("v1/jobs", { method: "POST", headers: { "Content-Type": "application/json" },
                                     body: JSON.stringify(body) });
  const job = await res.json();
  state.job = job.id;
  setStatus("queued", 0, 1);
  const final = await followEvents(job.id);
  if (final.status === "succeeded") {
    setStatus("fetching result", final.progress ? final.progress.step : 1, final.progress ? final.progress.total : 1);
    return (await api("v1/jobs/" + job.id + "/result", { headers: { "Accept": "application/json" } })).json();
  }
  if (final.status === "cancelled") { setStatus("cancelled"); return null; }
  throw new Error("job " + final.status + ": " + JSON.stringify(final.error || "unknown error"));
}

// Reads the SSE stream until the job ends; returns the last job view. Named events: `preview`
// ({step, total, images: [base64 JPEG]}); unnamed (`message`) events are job views. A stream that ends before
// the job does (e.g. the ingress replica is draining) is reopened: another replica serves the rest.
const TERMINAL = ["succeeded", "failed", "cancelled"];

async function followEvents(id) {
  let last = null;
  for (let attempt = 0; attempt < 30; attempt++) {
    if (attempt) await new Promise((resolve) => setTimeout(resolve, 1000));
    last = (await readEvents(id)) || last;
    if (last && TERMINAL.includes(last.status)) return last;
  }
  return (await api("v1/jobs/" + id)).json();
}

async function readEvents(id) {
  const res = await api("v1/jobs/" + id + "/events", { headers: { "Accept": "text/event-stream" } });
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "", last = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let cut;
    while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
      const ev = parseEvent(block);
      if (!ev) continue;
      if (ev.event === "preview") showPreview(ev.data);
      else if (ev.event === "message") { last = ev.data; showJob(last); }
    }
  }
  return last;
}

function parseEvent(block) {
  let event = "message";
  const data = [];
  for (const line of block.split(/\r?\n/)) {
    if (line.startsWith(":")) continue;  // SSE comment (keep-alive)
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") event = value;
    else if (field === "data") data.push(value);
  }
  if (!data.length) return null;
  try { return { event, data: JSON.parse(data.join("\n")) }; } catch (_) { return null; }
}

function showJob(view) {
  const p = view.progress;
  if (view.status === "queued") {
    const pos = view.queue_position;
    setStatus(pos !== undefined && pos !== null ? "queued, position " + (pos + 1) : "queued", 0, 1);
  } else if (view.status === "running") {
    setStatus(p ? "step " + p.step + " / " + p.total : "starting", p ? p.step : 0, p ? p.total : 1);
  } else if (view.status === "cancelling") {
    setStatus("cancelling");
  } else {
    setStatus(view.status, p ? p.step : 0, p ? p.total : 1);
  }
}

function showPreview(data) {
  const images = data.images || (data.image ? [data.image] : []);
  if (!images.length) return;
  $("preview").src = "data:image/jpeg;base64," + images[0];
  $("preview").hidden = false;
  if (data.total) setStatus("step " + data.step + " / " + data.total, data.step, data.total);
}

async function cancel() {
  if (!state.job || state.job === "pending") return;
  $("cancel").disabled = true;
  setStatus("cancelling");
  try { await api("v1/jobs/" + state.job, { method: "DELETE" }); } catch (err) { showError(err.message); }
}

function showResult(body, result) {
  $("preview").hidden = true;
  const steps = result.steps;
  setStatus("done in " + (result.timings ? result.timings.total_s.toFixed(2) + " s" : "?"), steps, steps);
  state.lastSeed = result.images[0].seed;
  $("reuse-seed").disabled = false;
  for (const img of result.images) {
    const fig = document.createElement("figure");
    const el = document.createElement("img");
    el.dataset.testid = "result-image";
    el.src = "data:" + img.media_type + ";base64," + img.b64_json;
    el.alt = body.prompt;
    if (result.width < 256) el.className = "small";
    const cap = document.createElement("figcaption");
    cap.textContent = "seed " + img.seed + " - " + result.width + "x" + result.height + ", " + steps + " steps, " +
                      result.scheduler;
    fig.append(el, cap);
    $("results").append(fig);
    const params = Object.assign({}, body, { seed: img.seed, num_images: 1, width: result.width,
                                              height: result.height, steps: result.steps,
                                              guidance_scale: result.guidance_scale, scheduler: result.scheduler });
    delete params.init_image; delete params.mask_image;  // too big for the history; the file stays on disk
    if (params.control) params.control = params.control.map((c) => Object.assign({}, c, { image: undefined }));
    el.addEventListener("load", () => addHistory(params, el), { once: true });
  }
}

// ---------------------------------------------------------------- history (localStorage, capped)
function thumbnail(img) {
  const scale = Math.min(1, THUMB_SIDE / Math.max(img.naturalWidth, img.naturalHeight));
  const canvas = document.createElement("canvas");
  canvas.width = Math.max(1, Math.round(img.naturalWidth * scale));
  canvas.height = Math.max(1, Math.round(img.naturalHeight * scale));
  canvas.getContext("2d").drawImage(img, 0, 0, canvas.width, canvas.height);
  return canvas.toDataURL("image/jpeg", 0.8);
}

function loadHistory() {
  try { return JSON.parse(localStorage.getItem(HISTORY_STORE) || "[]"); } catch (_) { return []; }
}

function saveHistory(items) {
  while (items.length) {
    try { localStorage.setItem(HISTORY_STORE, JSON.stringify(items)); return; } catch (_) { items.pop(); }
  }
  localStorage.removeItem(HISTORY_STORE);
}

function addHistory(params, img) {
  const items = loadHistory();
  items.unshift({ params, thumb: thumbnail(img), at: new Date().toISOString() });
  saveHistory(items.slice(0, HISTORY_MAX));
  renderHistory();
}

function curlOf(params) {
  const url = new URL("v1/generate", document.baseURI).href;
  const json = JSON.stringify(params).replace(/'/g, "'\\''");
  const auth = state.caps && state.caps.auth_required ? ' -H "Authorization: Bearer $SDSERVE_API_KEY"' : "";
  const ext = params.output_format === "jpeg" ? "jpg" : (params.output_format || "png");
  return "curl -sS -X POST '" + url + "' -H 'Content-Type: application/json'" + auth + " -d '" + json +
         "' -o image." + ext;
}

async function copy(text) {
  try {
    await navigator.clipboard.writeText(text);
    $("copy-fallback").hidden = true;
  } catch (_) {  // no clipboard outside secure contexts (plain http to a remote host): show it to copy by hand
    $("copy-fallback").textContent = text;
    $("copy-fallback").hidden = false;
  }
}

function useParams(params) {
  $("prompt").value = params.prompt || "";
  $("negative-prompt").value = params.negative_prompt || "";
  if (params.model && [...$("model").options].some((o) => o.value === params.model)) {
    $("model").value = params.model; selectModel();
  }
  for (const [id, key] of [["width", "width"], ["height", "height"], ["steps", "steps"],
                           ["guidance", "guidance_scale"]]) {
    if (params[key] !== undefined) $(id).value = params[key];
  }
  $("scheduler").value = params.scheduler || "";
  $("seed-random").checked = false; $("seed").disabled = false; $("seed").value = params.seed;
}

function renderHistory() {
  const supportsImg2img = state.model && (state.model.image_inputs || []).includes("init_image");
  $("history").replaceChildren(...loadHistory().map((item, index) => {
    const div = document.createElement("div");
    div.className = "history-item";
    div.dataset.testid = "history-item";
    const img = document.createElement("img");
    img.src = item.thumb; img.alt = item.params.prompt;
    const p = document.createElement("p");
    const q = item.params;
    p.textContent = q.prompt + " | seed " + q.seed + ", " + q.width + "x" + q.height + ", " + q.steps + " steps, " +
                    q.scheduler + ", cfg " + q.guidance_scale + " | " + q.model;
    const buttons = document.createElement("div");
    buttons.className = "buttons";
    const button = (label, action) => {
      const b = document.createElement("button");
      b.type = "button"; b.className = "secondary"; b.textContent = label;
      b.addEventListener("click", action);
      buttons.append(b);
    };
    button("Use", () => useParams(q));
    button("Copy JSON", () => copy(JSON.stringify(q, null, 2)));
    button("Copy curl", () => copy(curlOf(q)));
    if (supportsImg2img) button("Send to img2img", () => sendToImg2img(item, q));
    button("Delete", () => { const all = loadHistory(); all.splice(index, 1); saveHistory(all); renderHistory(); });
    div.append(img, p, buttons);
    return div;
  }));
}

function sendToImg2img(item, params) {
  useParams(params);
  // Decoded by hand: fetch() of a data: URL would need `connect-src data:` in the page's CSP.
  const bytes = Uint8Array.from(atob(item.thumb.split(",")[1]), (c) => c.charCodeAt(0));
  const blob = new Blob([bytes], { type: "image/jpeg" });
  const transfer = new DataTransfer();
  transfer.items.add(new File([blob], "history.jpg", { type: "image/jpeg" }));
  $("init-image").files = transfer.files;
}

// ---------------------------------------------------------------- auth
function showAuth(message) {
  $("auth").hidden = false;
  showError(message);
  $("generate").disabled = !state.caps;
}

function init() {
  $("generate").disabled = true;
  $("api-key").value = apiKey();
  $("save-key").addEventListener("click", () => {
    localStorage.setItem(KEY_STORE, $("api-key").value.trim());
    showError("");
    loadCapabilities();
  });
  $("forget-key").addEventListener("click", () => { localStorage.removeItem(KEY_STORE); $("api-key").value = ""; });
  $("form").addEventListener("submit", generate);
  $("cancel").addEventListener("click", cancel);
  $("model").addEventListener("change", () => { selectModel(); renderHistory(); });
  $("seed-random").addEventListener("change", () => { $("seed").disabled = $("seed-random").checked; });
  $("reuse-seed").addEventListener("click", () => {
    $("seed-random").checked = false; $("seed").disabled = false; $("seed").value = state.lastSeed;
  });
  $("clear-history").addEventListener("click", () => { localStorage.removeItem(HISTORY_STORE); renderHistory(); });
  renderHistory();
  loadCapabilities();
}

document.addEventListener("DOMContentLoaded", init);
