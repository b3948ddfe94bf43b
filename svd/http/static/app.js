// The web page at /ui: pick an image, set a few knobs, watch the progress, get the video.
//
// It builds its form from controls.json (the service's own fields) and calls the service's API
// on the same origin: POST /generate_task/submit, then follows the task's event stream
// (/generate_task/events, or /progress and /generate_task/status when the stream is refused) until
// the task ends, showing the live preview, its place in the queue and its ETA, then
// /generate_task/get for the video and its X-Seed and X-Settings. Cancel sends PUT /generate_task/cancel, which stops the
// job on the GPU at its next step.
// A token given as `?token=` or under Advanced is sent as `Authorization: Bearer`.
"use strict";
const $ = (id) => document.getElementById(id);
const form = $("form"), fileInput = $("image"), drop = $("drop");
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
let previewUrl = null, videoUrl = null, lastSeed = null, runningTask = null;

// --- Token: from ?token= (kept in the address, since reloading the page needs it there when the
// service wants a token) or typed under Advanced; kept for this tab only.
const fromUrl = new URLSearchParams(location.search).get("token");
if (fromUrl) sessionStorage.setItem("svd-token", fromUrl);
$("token").value = sessionStorage.getItem("svd-token") || "";
$("token").addEventListener("input", (e) => sessionStorage.setItem("svd-token", e.target.value.trim()));

// Every call goes to this service, relative to /ui/, with the token when there is one.
function api(path, options = {}) {
  const token = sessionStorage.getItem("svd-token");
  const headers = new Headers(options.headers || {});
  if (token) headers.set("Authorization", "Bearer " + token);
  return fetch(new URL("../" + path, location.href), { ...options, headers });
}

// --- The image: chosen or dropped, shown at once.
function showPreview() {
  const file = fileInput.files[0];
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = file ? URL.createObjectURL(file) : null;
  $("preview").hidden = !file;
  if (file) $("preview").src = previewUrl;
  fileInput.removeAttribute("aria-invalid");
}
$("preview").addEventListener("error", () => { $("preview").hidden = true; });
fileInput.addEventListener("change", showPreview);
["dragenter", "dragover"].forEach((type) => drop.addEventListener(type, (e) => {
  e.preventDefault(); drop.classList.add("over");
}));
["dragleave", "drop"].forEach((type) => drop.addEventListener(type, () => drop.classList.remove("over")));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  if (e.dataTransfer.files.length) { fileInput.files = e.dataTransfer.files; showPreview(); }
});

// --- The settings: one field per control the service declares, with its default, range and label.
function field(control) {
  const box = document.createElement("div");
  box.className = "field";
  const label = document.createElement("label");
  label.htmlFor = control.name;
  label.textContent = control.label;
  let input;
  if (control.options) {
    input = document.createElement("select");
    for (const [value, words] of control.options) input.add(new Option(words, value));
  } else {
    input = document.createElement("input");
    input.type = control.slider ? "range" : "number";
    if (control.min !== null) input.min = control.min;
    if (control.max !== null) input.max = control.max;
    input.step = control.step;
    if (control.placeholder) input.placeholder = control.placeholder;
  }
  input.id = input.name = control.name;
  input.title = control.description;
  if (control.default !== null) input.value = control.default;
  box.append(label, input);
  if (control.slider) {
    const shown = document.createElement("output");
    shown.id = control.name + "-value";
    shown.htmlFor = control.name;
    shown.value = input.value;
    label.append(": ", shown);
    input.addEventListener("input", () => { shown.value = input.value; });
  }
  return box;
}

// The seed is sent only when Random is unticked; a result's seed can be reused.
function seedChoice() {
  const seed = $("seed"), random = document.createElement("input"), label = document.createElement("label");
  random.type = "checkbox";
  random.id = "seed-random";
  random.checked = true;
  seed.disabled = true;
  label.append(random, " Random");
  seed.after(label);
  random.addEventListener("change", () => {
    seed.disabled = random.checked;
    if (!random.checked && !seed.value && lastSeed) seed.value = lastSeed;
  });
  $("reuse-seed").addEventListener("click", () => {
    random.checked = false; seed.disabled = false; seed.value = lastSeed;
  });
}

async function buildForm() {
  const response = await api("ui/controls.json");
  if (!response.ok) throw await problem(response);
  for (const control of await response.json()) {
    $(control.advanced ? "advanced-fields" : "basic-fields").append(field(control));
  }
  seedChoice();
  $("generate").disabled = false;
}

// --- Errors, in words. The service answers {"error"}, {"error", "detail": [...]} or [{"error"}].
class Problem extends Error {
  constructor(heading, lines = [], fields = []) { super(heading); this.lines = lines; this.fields = fields; }
}
const HEADINGS = {
  400: "The service could not use these settings:", 401: "The service needs a valid API token (under Advanced).",
  403: "This API token is not allowed to do that.", 404: "The service does not know this task any more.",
  413: "The image is too large:", 415: "The file is not an image the service can read:",
  429: "The service is busy:", 503: "The service is not ready:", 504: "The video took too long:",
  507: "The service could not keep the video:",
};

function labelOf(name) {
  const label = document.querySelector(`label[for="${CSS.escape(name)}"]`);
  return label ? label.firstChild.textContent.replace(/\s*\(.*\)|[:\s]+$/g, "") : name;
}

async function problem(response) {
  const text = await response.text().catch(() => "");
  let body = null;
  try { body = JSON.parse(text); } catch (_) { /* not JSON */ }
  const lines = [], fields = [];
  for (const item of Array.isArray(body) ? body : [body]) {
    if (item && Array.isArray(item.detail)) {
      for (const d of item.detail) {
        const name = (d.loc || []).filter((part) => part !== "body").join(".");
        const message = String(d.msg || "is invalid").replace(/^Value error, /, "");
        if (name) fields.push(name);
        lines.push(name ? `${labelOf(name)} (${name}): ${message}` : message);
      }
    } else if (item && item.error) {
      lines.push(String(item.error));
    }
  }
  const plain = text.trim().split("\n")[0];
  if (!lines.length && plain && plain.length < 300 && !/^</.test(plain) && !/Traceback/.test(text)) lines.push(plain);
  if (response.status === 401) fields.push("token");
  const retry = response.headers.get("Retry-After");
  if (retry) lines.push(`Try again in ${retry} s.`);
  const heading = HEADINGS[response.status] ||
    (response.status >= 500 ? `The service failed (${response.status}):` : `The service answered ${response.status}:`);
  return new Problem(heading, lines, fields);
}

function showError(err) {
  const box = $("error");
  box.replaceChildren();
  const heading = document.createElement("p");
  const strong = document.createElement("strong");
  strong.textContent = err instanceof Problem ? err.message : "Something went wrong: " + err.message;
  heading.append(strong);
  box.append(heading);
  if (err instanceof Problem && err.lines.length) {
    const list = document.createElement("ul");
    for (const line of err.lines) {
      const li = document.createElement("li");
      // `name` in a message reads as code.
      line.split(/`([^`]+)`/).forEach((part, i) => {
        if (i % 2) { const code = document.createElement("code"); code.textContent = part; li.append(code); }
        else li.append(part);
      });
      list.append(li);
    }
    box.append(list);
  }
  for (const name of (err.fields || [])) {
    const input = $(name);
    if (input) {
      input.setAttribute("aria-invalid", "true");
      if ($("advanced").contains(input)) $("advanced").open = true;
    }
  }
  box.hidden = false;
  box.scrollIntoView({ block: "nearest" });
}

// --- Progress: one line in words, one bar for the whole run.
// Each stage's words and its span of the bar; a segment's stages share its part of the bar.
const STAGES = {
  queued: ["Waiting in the queue", null], encode: ["Encoding the image", [0, 0.04]],
  denoise: ["Denoising step", [0.04, 0.82]], decode: ["Decoding frames", [0.82, 1]],
  interpolate: ["Interpolating frames", null], video: ["Writing the video", null],
  done: ["Done", [1, 1]], unknown: ["Starting", null],
};
const IN_SEGMENT = new Set(["encode", "denoise", "decode"]);

// Where the job is in the queue and when its video will be ready: "3rd in line, about 2 min".
function ordinal(n) {
  const ends = ["th", "st", "nd", "rd"], last = n % 100;
  return n + (ends[(last - 20) % 10] || ends[last] || ends[0]);
}
function placeText(p) {
  const parts = [];
  if (p.queue_position != null) parts.push(`${ordinal(p.queue_position + 1)} in line`);
  // Scaled to zero: no worker takes jobs, so no time can be promised until one has started.
  if (p.waiting_for === "worker") parts.push("waiting for a GPU worker to start");
  else if (p.eta_seconds != null) {
    parts.push(p.eta_seconds < 60 ? `about ${Math.max(1, Math.round(p.eta_seconds))} s` : `about ${Math.round(p.eta_seconds / 60)} min`);
  }
  return parts.length ? " — " + parts.join(", ") : "";
}

function showProgress(stage, step, steps, started, segment = 1, segments = 1, place = "") {
  const [words, span] = STAGES[stage] || [stage, null];
  const counted = (stage === "denoise" || stage === "decode") && steps > 0;
  const elapsed = Math.round((performance.now() - started) / 1000);
  const part = segments > 1 && IN_SEGMENT.has(stage) ? `Segment ${segment} of ${segments}: ` : "";
  $("progress-text").textContent = part + (counted ? `${words} ${step} of ${steps}` : words + (stage === "done" ? "" : "…")) +
    place + ` (${elapsed} s)`;
  $("progress-text").dataset.stage = stage;
  const bar = $("progress");
  if (!span) { if (stage !== "interpolate" && stage !== "video") bar.removeAttribute("value"); return; }
  const within = span[0] + (span[1] - span[0]) * (counted ? step / steps : 0);
  bar.value = stage === "done" ? 1 : (segment - 1 + within) / segments;
}

// --- The live preview: while the job denoises and decodes, /progress names its latest preview,
// at an address that changes with each new one. It is fetched only then, with the token (which
// an <img src> could not send), and shown above the progress bar.
let livePath = null, liveUrl = null;
async function showLivePreview(path) {
  if (!path || path === livePath) return;
  livePath = path;
  try {
    const response = await api(path.replace(/^\//, ""));
    if (!response.ok) return;  // the job ended meanwhile, and its preview with it: the next poll says so
    const url = URL.createObjectURL(await response.blob());
    if (liveUrl) URL.revokeObjectURL(liveUrl);
    liveUrl = url;
    $("live-preview").src = url;
    $("live-preview").hidden = false;
  } catch (_) { /* a preview missed: the next poll brings a newer one */ }
}

function hideLivePreview() {
  $("live-preview").hidden = true;
  $("live-preview").removeAttribute("src");
  if (liveUrl) URL.revokeObjectURL(liveUrl);
  livePath = liveUrl = null;
}

// One change of the task, from its stream or a poll: true once it has ended with a video or an error
// (which /generate_task/get then says).
async function showChange(p, started) {
  if (p.status === "completed" || p.status === "failed") return true;
  if (p.status === "canceled") throw new Problem("Cancelled: the service stopped the job and made no video.");
  showProgress(p.stage, p.step, p.steps, started, p.segment, p.segments, placeText(p));
  $("progress-text").dataset.via = p.via;
  await showLivePreview(p.preview);
  return false;
}

// Follows the task's server-sent events, picking up after the last one when the connection drops;
// false when the stream is refused (a proxy, an older service), and the page polls instead.
async function followEvents(taskId, started) {
  let lastId = null, drops = 0;
  for (;;) {
    let response;
    try {
      const headers = lastId ? { "Last-Event-ID": lastId } : {};
      response = await api("generate_task/events?task_id=" + encodeURIComponent(taskId), { headers });
    } catch (err) {
      if (++drops >= 10) throw new Problem("Lost contact with the service:", [err.message]);
      await sleep(1000);
      continue;
    }
    if (!response.ok || !response.body) return false;
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      let chunk;
      try {
        chunk = await reader.read();
      } catch (_) {
        break;  // dropped: reconnect below
      }
      if (chunk.done) break;
      buffer += chunk.value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const lines = buffer.slice(0, end).split("\n");
        buffer = buffer.slice(end + 2);
        const data = lines.filter((line) => line.startsWith("data: ")).map((line) => line.slice(6)).join("\n");
        if (!data) continue;  // a heartbeat
        lastId = (lines.find((line) => line.startsWith("id: ")) || "id: ").slice(4) || lastId;
        drops = 0;
        if (await showChange({ ...JSON.parse(data), via: "events" }, started)) return true;
      }
    }
    if (++drops >= 10) throw new Problem("Lost contact with the service: its event stream keeps closing.");
    await sleep(1000);
  }
}

async function waitForTask(taskId, started) {
  if (await followEvents(taskId, started)) return;
  const query = "?task_id=" + encodeURIComponent(taskId);
  let misses = 0;
  for (;;) {
    await sleep(400);
    let progress, status;
    try {
      [progress, status] = await Promise.all([
        api("progress", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ task_id: taskId }) }),
        api("generate_task/status" + query),
      ]);
    } catch (err) {
      if (++misses >= 10) throw new Problem("Lost contact with the service:", [err.message]);
      continue;
    }
    misses = 0;
    // The job queue (Redis) restarting: the job goes on, and so does the page.
    if (status.status === 503) {
      $("progress-text").textContent = "The job queue is unreachable; still following the job…";
      continue;
    }
    if (!status.ok) throw await problem(status);
    const p = progress.ok ? await progress.json() : { stage: "unknown" };
    const { status: state } = await status.json();
    if (await showChange({ ...p, status: state, via: "polling" }, started)) return;
  }
}

// --- The result: the video, its seed and settings, a download link.
function showResult(blob, headers) {
  const type = (headers.get("Content-Type") || blob.type || "").split(";")[0];
  const settings = JSON.parse(headers.get("X-Settings") || "{}");
  lastSeed = headers.get("X-Seed") || settings.seed;
  if (videoUrl) URL.revokeObjectURL(videoUrl);
  videoUrl = URL.createObjectURL(blob);
  let media;
  if (type === "image/gif") {
    media = document.createElement("img");
    media.alt = "The generated animation";
  } else {
    media = document.createElement("video");
    Object.assign(media, { controls: true, autoplay: true, loop: true, muted: true, playsInline: true });
    media.setAttribute("aria-label", "The generated video");
  }
  media.src = videoUrl;
  $("media").replaceChildren(media);
  const ext = settings.format || (type.split("/")[1] || "mp4");
  const size = settings.width ? `-${settings.width}x${settings.height}` : "";
  $("download").href = videoUrl;
  $("download").download = `svd-seed${lastSeed}${size}.${ext}`;
  $("download").textContent = `Download ${$("download").download}`;

  const rows = [["Seed", lastSeed]];
  for (const [key, value] of Object.entries(settings)) if (key !== "seed") rows.push([key, value]);
  const timing = (headers.get("Server-Timing") || "").split(",").map((part) => part.trim().match(/^(\w+);dur=([\d.]+)/)).filter(Boolean);
  if (timing.length) {
    const total = timing.reduce((sum, m) => sum + Number(m[2]), 0) / 1000;
    rows.push(["time", `${total.toFixed(1)} s (` + timing.map((m) => `${m[1]} ${(m[2] / 1000).toFixed(1)} s`).join(", ") + ")"]);
  }
  const body = $("settings").tBodies[0];
  body.replaceChildren();
  for (const [key, value] of rows) {
    const tr = body.insertRow();
    const th = document.createElement("th");
    th.scope = "row"; th.textContent = key;
    const td = document.createElement("td");
    td.textContent = String(value);
    if (key === "Seed") td.id = "result-seed";
    tr.append(th, td);
  }
  $("result").hidden = false;
}

// --- Recent videos, kept by the service (SVD_OUTPUT_DIR); none listed when it keeps none.
async function showRecent() {
  const response = await api("outputs/?limit=8").catch(() => null);
  if (!response || !response.ok) return;
  const { outputs } = await response.json();
  const list = $("recent-list");
  list.replaceChildren();
  for (const record of outputs) {
    const settings = record.settings || {};
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = `${record.created.replace("T", " ").slice(0, 16)}: seed ${record.seed}, ` +
      `${settings.width}x${settings.height}, ${settings.format}`;
    button.addEventListener("click", () => openOutput(record.id));
    const item = document.createElement("li");
    item.append(button);
    list.append(item);
  }
  $("recent").hidden = !outputs.length;
}

async function openOutput(id) {
  $("error").hidden = true;
  try {
    const response = await api("outputs/" + encodeURIComponent(id));
    if (!response.ok) throw await problem(response);
    showResult(await response.blob(), response.headers);
    $("placeholder").hidden = true;
  } catch (err) {
    showError(err instanceof TypeError ? new Problem("Could not reach the service:", [err.message]) : err);
  }
}

buildForm().then(showRecent).catch(showError);

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  $("error").hidden = true;
  form.querySelectorAll("[aria-invalid]").forEach((el) => el.removeAttribute("aria-invalid"));
  if (!fileInput.files.length) {
    showError(new Problem("Choose an image first.", [], ["image"]));
    return;
  }
  const data = new FormData(form);  // every named, enabled field; empty ones use the service's defaults
  for (const [key, value] of [...data.entries()]) if (typeof value === "string" && !value.trim()) data.delete(key);
  const button = $("generate");
  button.disabled = true;
  $("cancel").disabled = true;  // until there is a task to cancel
  const started = performance.now();
  $("status").hidden = false;
  $("placeholder").hidden = true;
  showProgress("unknown", 0, 0, started);
  $("status").scrollIntoView({ block: "nearest" });
  try {
    const submitted = await api("generate_task/submit", { method: "POST", body: data });
    if (!submitted.ok) throw await problem(submitted);
    const { task_id: taskId } = await submitted.json();
    runningTask = taskId;
    $("cancel").disabled = false;
    await waitForTask(taskId, started);
    const result = await api("generate_task/get?task_id=" + encodeURIComponent(taskId));
    if (!result.ok) throw await problem(result);
    showResult(await result.blob(), result.headers);
    showProgress("done", 0, 0, started);
    $("progress").value = 1;
    showRecent();
  } catch (err) {
    $("status").hidden = true;
    showError(err instanceof TypeError ? new Problem("Could not reach the service:", [err.message]) : err);
  } finally {
    hideLivePreview();  // the video, or the reason there is none, takes its place
    runningTask = null;
    button.disabled = false;
  }
});

// Stops the running job; the progress loop then sees it cancelled. A job that finished
// meanwhile answers 409 and is shown as usual.
$("cancel").addEventListener("click", async () => {
  if (!runningTask) return;
  $("cancel").disabled = true;
  $("progress-text").textContent = "Cancelling…";
  const response = await api("generate_task/cancel?task_id=" + encodeURIComponent(runningTask), { method: "PUT" });
  if (!response.ok && response.status !== 409) showError(await problem(response));
});
