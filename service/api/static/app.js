// The bisenet-serve page: one POST /segment?format=json per image or webcam frame. The JSON answer
// carries the classes with their pixel shares, the server's timings and the label PNG, whose palette
// colours are the class colours, so it is laid over the photo as it is.
"use strict";

const KEY_STORAGE = "bisenet-api-key"; // sessionStorage: the key lives as long as this tab
const STAGES = ["decode", "queue", "inference", "encode"];
const $ = (id) => document.getElementById(id);

const state = {
  config: { budget_ms: 33.333, accuracy_modes: [], auto_model: false, api_key_required: false },
  palettes: {}, // model name -> [[r, g, b], ...]
  retry: null, // what to resend once an API key is given
  webcam: null, // {stream, frames, since} while the webcam runs
  photoUrl: null,
};

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE);
}

function headers() {
  const key = apiKey();
  return key ? { "X-API-Key": key } : {};
}

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function failure(response) {
  let code = "http_" + response.status;
  let message = response.statusText || "request failed";
  try {
    const body = await response.json();
    if (body && body.error) ({ code, message } = body.error);
  } catch (_) {
    /* not JSON: keep the status line */
  }
  return new ApiError(response.status, code, message);
}

async function getJson(path) {
  const response = await fetch(path, { headers: headers() });
  if (!response.ok) throw await failure(response);
  return response.json();
}

// ---- messages -----------------------------------------------------------------------------------
function showError(error) {
  const box = $("error");
  box.textContent = "";
  const title = document.createElement("strong");
  if (error instanceof ApiError) {
    title.textContent = `Error ${error.status} (${error.code}): `;
  } else {
    title.textContent = "Could not reach the service: ";
  }
  box.append(title, document.createTextNode(error.message));
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function askForKey(retry, wrong) {
  state.retry = retry;
  $("key-note").textContent = wrong
    ? "The service refused the API key. Enter the right one; it is kept for this browser tab only."
    : "This service needs an API key. It is kept for this browser tab only.";
  $("key-form").hidden = false;
  $("api-key").focus();
}

// ---- models and options -------------------------------------------------------------------------
async function loadModels() {
  try {
    const [config, models] = await Promise.all([getJson("/web/config"), getJson("/models")]);
    state.config = config;
    const select = $("model");
    select.textContent = "";
    if (config.auto_model) select.append(new Option("auto (chosen by the service)", "auto"));
    for (const m of models.models) {
      state.palettes[m.name] = m.palette;
      const miou = m.published_miou ? ` (mIoU ${m.published_miou})` : "";
      select.append(new Option(`${m.name}${miou}`, m.name, false, m.name === models.default));
    }
    const modes = config.accuracy_modes || [];
    $("tta-field").hidden = modes.length === 0;
    $("tta").textContent = "";
    for (const mode of modes) $("tta").append(new Option(mode, mode));
    const ready = models.models.every((m) => m.ready);
    $("service-status").textContent = ready
      ? `Ready: ${models.models.length} model${models.models.length === 1 ? "" : "s"}. Frame budget ${config.budget_ms.toFixed(1)} ms (${config.target_fps} fps).`
      : "The models are still loading; requests wait or get 503 until they are ready.";
    $("forget-key").hidden = !apiKey();
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) {
      $("service-status").textContent = "This service needs an API key.";
      askForKey(loadModels, Boolean(apiKey()));
      return;
    }
    $("service-status").textContent = "The service did not answer.";
    showError(error);
  }
}

function segmentUrl() {
  const params = new URLSearchParams({ format: "json" });
  if ($("model").value) params.set("model", $("model").value);
  if (!$("tta-field").hidden && $("tta").value) params.set("tta", $("tta").value);
  return "/segment?" + params;
}

// ---- one request --------------------------------------------------------------------------------
async function segment(blob, name) {
  const form = new FormData();
  form.append("image", blob, name);
  const started = performance.now();
  const response = await fetch(segmentUrl(), { method: "POST", body: form, headers: headers() });
  if (!response.ok) throw await failure(response);
  const result = await response.json();
  result.roundTripMs = performance.now() - started;
  result.batchSize = response.headers.get("X-Batch-Size");
  return result;
}

async function segmentFile(file) {
  if (!file) return;
  stopWebcam();
  clearError();
  $("busy").hidden = false;
  try {
    const result = await segment(file, file.name);
    showPhoto(URL.createObjectURL(file), file.name);
    showResult(result, file.name);
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) askForKey(() => segmentFile(file), Boolean(apiKey()));
    else showError(error);
  } finally {
    $("busy").hidden = true;
  }
}

function showPhoto(url, name) {
  if (state.photoUrl) URL.revokeObjectURL(state.photoUrl);
  state.photoUrl = url;
  $("photo").src = url;
  $("photo").alt = `The image sent: ${name}`;
}

// ---- showing a result ---------------------------------------------------------------------------
function showResult(result, name) {
  const palette = state.palettes[result.model] || [];
  const classes = [...result.classes].sort((a, b) => b.fraction - a.fraction);
  const top = classes.slice(0, 3).map((c) => `${c.name} ${percent(c.fraction)}`).join(", ");
  $("overlay").src = "data:image/png;base64," + result.labels_png;
  $("overlay").alt = `Segmentation of ${name}: ${top || "no class"}${classes.length > 3 ? ", and more" : ""}`;
  $("caption").textContent = `${name}: ${result.width}×${result.height} pixels, model ${result.model}`;
  $("figure").hidden = false;
  $("placeholder").hidden = true;
  showClasses(classes, palette);
  showTimings(result);
}

function percent(fraction) {
  const p = fraction * 100;
  if (p > 0 && p < 0.1) return "<0.1%";
  return (p >= 10 ? p.toFixed(0) : p.toFixed(1)) + "%";
}

function showClasses(classes, palette) {
  const rows = $("class-rows");
  rows.textContent = "";
  for (const c of classes) {
    const row = rows.insertRow();
    row.dataset.classId = c.id;
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    const [r, g, b] = palette[c.id] || [128, 128, 128];
    swatch.style.background = `rgb(${r}, ${g}, ${b})`;
    swatch.setAttribute("aria-hidden", "true");
    row.insertCell().append(swatch);
    row.insertCell().textContent = c.name;
    const share = document.createElement("div");
    share.className = "share";
    const track = document.createElement("span");
    track.className = "track";
    track.setAttribute("aria-hidden", "true");
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.style.width = Math.max(c.fraction * 100, 0.5) + "%";
    bar.style.background = swatch.style.background;
    track.append(bar);
    const text = document.createElement("span");
    text.className = "value";
    text.textContent = percent(c.fraction);
    share.append(track, text);
    row.insertCell().append(share);
  }
  $("classes-panel").hidden = false;
}

function showTimings(result) {
  const t = result.timings_ms || {};
  const budget = state.config.budget_ms;
  const server = STAGES.reduce((sum, s) => sum + (t[s] || 0), 0);
  const scale = Math.max(server, budget) * 1.05;
  const line = $("timeline");
  line.querySelectorAll(".stage").forEach((el) => el.remove());
  for (const s of STAGES) {
    const part = document.createElement("div");
    part.className = `stage stage-${s}`;
    part.style.width = ((t[s] || 0) / scale) * 100 + "%";
    part.title = `${s} ${(t[s] || 0).toFixed(1)} ms`;
    line.append(part);
  }
  $("budget-mark").style.left = (budget / scale) * 100 + "%";
  const rows = $("timing-rows");
  rows.textContent = "";
  for (const s of STAGES) addTimingRow(rows, s, t[s], `stage-${s}`);
  addTimingRow(rows, "server total", server, "total");
  addTimingRow(rows, "round trip (browser)", result.roundTripMs, "roundtrip");
  const within = server <= budget;
  const summary = $("timing-summary");
  summary.className = "summary " + (within ? "ok" : "over");
  summary.textContent =
    `${server.toFixed(1)} ms in the service: ${within ? "within" : "over"} the ${budget.toFixed(1)} ms frame budget ` +
    `(${((server / budget) * 100).toFixed(0)}%)` +
    (result.batchSize ? `, batch of ${result.batchSize}` : "") +
    (state.webcam ? `; ${state.webcam.fps.toFixed(1)} frames/s from the webcam` : "");
  $("timing-panel").hidden = false;
}

function addTimingRow(rows, name, ms, key) {
  const row = rows.insertRow();
  row.dataset.stage = name;
  const label = row.insertCell();
  const dot = document.createElement("span");
  dot.className = `dot ${key}`;
  dot.setAttribute("aria-hidden", "true");
  label.append(dot, document.createTextNode(name));
  row.insertCell().textContent = ms === undefined || ms === null ? "–" : ms.toFixed(1);
}

// ---- webcam: frames one after another, the next sent when the answer to the last is shown --------
async function startWebcam() {
  clearError();
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    $("webcam-note").textContent =
      "This browser offers no webcam here (browsers allow it on https:// pages and on localhost).";
    $("webcam-note").hidden = false;
    return;
  }
  try {
    const stream = await navigator.mediaDevices.getUserMedia({ video: { width: 1280, height: 720 }, audio: false });
    const video = $("video");
    video.srcObject = stream;
    await video.play();
    state.webcam = { stream, frames: 0, since: performance.now(), fps: 0 };
    $("webcam").hidden = true;
    $("webcam-stop").hidden = false;
    $("webcam-stop").focus();
    nextFrame();
  } catch (error) {
    $("webcam-note").textContent = `The webcam could not be opened: ${error.message}`;
    $("webcam-note").hidden = false;
  }
}

function stopWebcam() {
  if (!state.webcam) return;
  state.webcam.stream.getTracks().forEach((track) => track.stop());
  state.webcam = null;
  $("webcam").hidden = false;
  $("webcam-stop").hidden = true;
}

async function nextFrame() {
  const cam = state.webcam;
  if (!cam) return;
  const video = $("video");
  const canvas = $("grab");
  canvas.width = video.videoWidth;
  canvas.height = video.videoHeight;
  canvas.getContext("2d").drawImage(video, 0, 0);
  const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/jpeg", 0.85));
  try {
    const result = await segment(blob, "webcam.jpg");
    if (state.webcam !== cam) return; // stopped meanwhile
    cam.frames += 1;
    cam.fps = (cam.frames * 1000) / (performance.now() - cam.since);
    showPhoto(URL.createObjectURL(blob), `webcam frame ${cam.frames}`);
    showResult(result, `webcam frame ${cam.frames}`);
    requestAnimationFrame(nextFrame);
  } catch (error) {
    stopWebcam();
    if (error instanceof ApiError && error.status === 401) askForKey(startWebcam, Boolean(apiKey()));
    else showError(error);
  }
}

// ---- wiring -------------------------------------------------------------------------------------
function setOpacity() {
  const value = $("opacity").value;
  $("overlay").style.opacity = value / 100;
  $("opacity-value").textContent = value + "%";
}

function wire() {
  $("file").addEventListener("change", (e) => segmentFile(e.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("dragging");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("dragging"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("dragging");
    segmentFile(e.dataTransfer.files[0]);
  });
  $("opacity").addEventListener("input", setOpacity);
  $("webcam").addEventListener("click", startWebcam);
  $("webcam-stop").addEventListener("click", stopWebcam);
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape") stopWebcam();
  });
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
    $("api-key").value = "";
    $("key-form").hidden = true;
    $("forget-key").hidden = false;
    const retry = state.retry;
    state.retry = null;
    if (retry) retry();
  });
  $("forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    $("forget-key").hidden = true;
  });
  setOpacity();
}

wire();
loadModels();
