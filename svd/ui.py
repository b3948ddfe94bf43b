"""The web page at /ui: pick an image, set a few knobs, watch the progress, get the video.

One self-contained page (HTML, CSS and vanilla JavaScript, nothing fetched from
elsewhere) that calls the service's own API on the same origin:
POST /generate_task/submit, then /progress and /generate_task/status until the
task ends, then /generate_task/get for the video and its X-Seed and X-Settings.
A token given as `?token=` or under Advanced is sent as `Authorization: Bearer`.
"""

from __future__ import annotations

import base64
import hashlib

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

STYLE = """
:root { color-scheme: light dark; --accent: #2f6fde; --bad: #c62828; --line: #8884; }
* { box-sizing: border-box; }
body { font: 16px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1120px; padding: 1rem 1.25rem 3rem; }
header h1 { font-size: 1.5rem; margin: .2rem 0; }
header p { margin: 0 0 1rem; opacity: .85; }
main { display: grid; grid-template-columns: minmax(300px, 400px) 1fr; gap: 1.5rem; align-items: start; }
@media (max-width: 760px) { main { grid-template-columns: 1fr; } }
/* Side by side, the result stays in view while the form scrolls. */
@media (min-width: 761px) { #output { position: sticky; top: 1rem; max-height: calc(100vh - 2rem); overflow: auto; } }
fieldset { border: 1px solid var(--line); border-radius: 8px; margin: 0 0 1rem; padding: .6rem .9rem .9rem; min-width: 0; }
legend { font-weight: 600; padding: 0 .3rem; }
.grid { display: grid; grid-template-columns: 1fr 1fr; gap: .6rem .9rem; }
.field label, .field > span { display: block; font-size: .9rem; margin-bottom: .15rem; }
input, select, button { font: inherit; }
input[type=number], input[type=password], select { width: 100%; padding: .3rem .4rem; }
input[type=range] { width: 100%; }
[aria-invalid=true] { outline: 2px solid var(--bad); }
.note { font-size: .85rem; opacity: .8; margin: .5rem 0 0; }
.drop { display: block; border: 2px dashed var(--line); border-radius: 8px; padding: .8rem; text-align: center; cursor: pointer; }
.drop.over { border-color: var(--accent); background: #2f6fde14; }
.drop input { display: block; margin: .5rem auto 0; max-width: 100%; }
#preview { display: block; max-width: 100%; max-height: 220px; margin: .6rem auto 0; border-radius: 4px; }
details { border: 1px solid var(--line); border-radius: 8px; padding: .5rem .9rem; margin: 0 0 1rem; }
summary { cursor: pointer; font-weight: 600; }
details[open] summary { margin-bottom: .6rem; }
#generate { width: 100%; padding: .6rem; font-weight: 600; border: 0; border-radius: 8px; background: var(--accent); color: #fff; cursor: pointer; }
#generate:disabled { opacity: .55; cursor: progress; }
#progress { width: 100%; height: 1rem; }
#progress-text { margin: .3rem 0 1rem; }
#error { border-left: 4px solid var(--bad); padding: .4rem .9rem; margin-bottom: 1rem; background: #c6282812; }
#error p { margin: .3rem 0; }
#error ul { margin: .3rem 0; padding-left: 1.2rem; }
#media video, #media img { display: block; width: 100%; height: auto; border-radius: 6px; background: #000; }
.actions { margin: .6rem 0; display: flex; gap: 1rem; align-items: center; flex-wrap: wrap; }
table { border-collapse: collapse; font-size: .9rem; }
th, td { text-align: left; padding: .15rem .8rem .15rem 0; border-bottom: 1px solid var(--line); vertical-align: top; }
th { font-weight: 500; opacity: .8; }
code { font-size: .9em; }
.empty { opacity: .7; border: 1px dashed var(--line); border-radius: 8px; padding: 2rem; text-align: center; }
"""

BODY = """
<header>
  <h1>Stable Video Diffusion XT</h1>
  <p>Turn a still image into a short video. This page uses the service's own API
  (<a href="../">API docs</a>).</p>
</header>
<main>
<form id="form" novalidate>
  <fieldset>
    <legend>Image</legend>
    <label class="drop" id="drop" for="image">
      <span>Drop an image here, or choose one (PNG, JPEG, WebP, BMP, GIF, TIFF)</span>
      <input type="file" id="image" name="image" accept="image/*">
      <img id="preview" alt="The chosen image" hidden>
    </label>
  </fieldset>
  <fieldset>
    <legend>Settings</legend>
    <div class="grid">
      <div class="field">
        <label for="seed">Seed</label>
        <input type="number" id="seed" name="seed" min="0" max="4294967295" step="1" placeholder="random" disabled>
        <label><input type="checkbox" id="seed-random" checked> Random</label>
      </div>
      <div class="field">
        <label for="fps">Frame rate (fps)</label>
        <input type="number" id="fps" name="fps" min="1" max="60" value="7">
      </div>
      <div class="field">
        <label for="num_frames">Frames</label>
        <input type="number" id="num_frames" name="num_frames" min="1" max="25" placeholder="model's (25)">
      </div>
      <div class="field">
        <label for="motion_bucket_id">Motion: <output id="motion-value" for="motion_bucket_id">127</output></label>
        <input type="range" id="motion_bucket_id" name="motion_bucket_id" min="0" max="255" value="127">
      </div>
      <div class="field">
        <label for="sizing">Fit the image by</label>
        <select id="sizing" name="sizing">
          <option value="stretch">stretching it</option>
          <option value="crop">cropping to cover</option>
          <option value="pad">padding to fit</option>
        </select>
      </div>
      <div class="field">
        <label for="format">Format</label>
        <select id="format" name="format">
          <option value="mp4">MP4</option>
          <option value="webm">WebM</option>
          <option value="gif">GIF</option>
        </select>
      </div>
    </div>
  </fieldset>
  <details id="advanced">
    <summary>Advanced</summary>
    <div class="grid">
      <div class="field"><label for="width">Width (px)</label>
        <input type="number" id="width" name="width" min="64" max="1024" step="64" value="1024"></div>
      <div class="field"><label for="height">Height (px)</label>
        <input type="number" id="height" name="height" min="64" max="1024" step="64" value="576"></div>
      <div class="field"><label for="num_inference_steps">Steps</label>
        <input type="number" id="num_inference_steps" name="num_inference_steps" min="1" max="100" value="25"></div>
      <div class="field"><label for="decode_chunk_size">Decode chunk</label>
        <input type="number" id="decode_chunk_size" name="decode_chunk_size" min="1" max="64" value="2"></div>
      <div class="field"><label for="noise_aug_strength">Noise</label>
        <input type="number" id="noise_aug_strength" name="noise_aug_strength" min="0" max="1" step="0.01" value="0.02"></div>
      <div class="field"><label for="min_guidance_scale">Min guidance</label>
        <input type="number" id="min_guidance_scale" name="min_guidance_scale" min="0" max="20" step="0.1" value="1.0"></div>
      <div class="field"><label for="max_guidance_scale">Max guidance</label>
        <input type="number" id="max_guidance_scale" name="max_guidance_scale" min="0" max="20" step="0.1" value="3.0"></div>
      <div class="field"><label for="token">API token</label>
        <input type="password" id="token" autocomplete="off" placeholder="if the service needs one"></div>
    </div>
    <p class="note">Sides are multiples of 64 up to 1024; the model was made for 1024&times;576.
    Smaller is faster: the time grows with width &times; height, frames and steps.</p>
  </details>
  <button type="submit" id="generate">Generate</button>
</form>
<section id="output" aria-label="Result">
  <div id="status" hidden>
    <progress id="progress" max="1" aria-labelledby="progress-text"></progress>
    <p id="progress-text" role="status" aria-live="polite"></p>
  </div>
  <div id="error" role="alert" hidden></div>
  <div id="result" hidden>
    <div id="media"></div>
    <div class="actions">
      <a id="download" href="#" download>Download the video</a>
      <button type="button" id="reuse-seed">Reuse this seed</button>
    </div>
    <table id="settings" aria-label="Seed and settings of this video"><tbody></tbody></table>
  </div>
  <p class="empty" id="placeholder">Your video appears here.</p>
</section>
</main>
"""

SCRIPT = r"""
"use strict";
const $ = (id) => document.getElementById(id);
const form = $("form"), fileInput = $("image"), drop = $("drop");
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
let previewUrl = null, videoUrl = null, lastSeed = null;

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

$("seed-random").addEventListener("change", (e) => {
  $("seed").disabled = e.target.checked;
  if (!e.target.checked && !$("seed").value && lastSeed) $("seed").value = lastSeed;
});
$("motion_bucket_id").addEventListener("input", (e) => { $("motion-value").value = e.target.value; });
$("reuse-seed").addEventListener("click", () => {
  $("seed-random").checked = false; $("seed").disabled = false; $("seed").value = lastSeed;
});

// --- Errors, in words. The service answers {"error"}, {"error", "detail": [...]} or [{"error"}].
class Problem extends Error {
  constructor(heading, lines = [], fields = []) { super(heading); this.lines = lines; this.fields = fields; }
}
const HEADINGS = {
  400: "The service could not use these settings:", 401: "The service needs a valid API token (under Advanced).",
  403: "This API token is not allowed to do that.", 404: "The service does not know this task any more.",
  413: "The image is too large:", 415: "The file is not an image the service can read:",
  429: "The service is busy:", 503: "The service is not ready:", 504: "The video took too long:",
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
const STAGES = {
  queued: ["Waiting in the queue", null], encode: ["Encoding the image", [0, 0.03]],
  denoise: ["Denoising step", [0.03, 0.8]], decode: ["Decoding frames", [0.8, 0.97]],
  video: ["Writing the video", [0.97, 1]], done: ["Done", [1, 1]], unknown: ["Starting", null],
};

function showProgress(stage, step, steps, started) {
  const [words, span] = STAGES[stage] || [stage, null];
  const counted = (stage === "denoise" || stage === "decode") && steps > 0;
  const elapsed = Math.round((performance.now() - started) / 1000);
  $("progress-text").textContent = (counted ? `${words} ${step} of ${steps}` : words + (stage === "done" ? "" : "…")) +
    ` (${elapsed} s)`;
  $("progress-text").dataset.stage = stage;
  const bar = $("progress");
  if (!span) bar.removeAttribute("value");
  else bar.value = span[0] + (span[1] - span[0]) * (counted ? step / steps : 0);
}

async function waitForTask(taskId, started) {
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
    if (!status.ok) throw await problem(status);
    const p = progress.ok ? await progress.json() : { stage: "unknown" };
    const { status: state } = await status.json();
    if (state === "completed") return;
    if (state === "failed") return;  // /generate_task/get says why
    if (state === "canceled") throw new Problem("The task was cancelled.");
    showProgress(p.stage, p.step, p.steps, started);
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
  const started = performance.now();
  $("status").hidden = false;
  $("placeholder").hidden = true;
  showProgress("unknown", 0, 0, started);
  $("status").scrollIntoView({ block: "nearest" });
  try {
    const submitted = await api("generate_task/submit", { method: "POST", body: data });
    if (!submitted.ok) throw await problem(submitted);
    const { task_id: taskId } = await submitted.json();
    await waitForTask(taskId, started);
    const result = await api("generate_task/get?task_id=" + encodeURIComponent(taskId));
    if (!result.ok) throw await problem(result);
    showResult(await result.blob(), result.headers);
    showProgress("done", 0, 0, started);
    $("progress").value = 1;
  } catch (err) {
    $("status").hidden = true;
    showError(err instanceof TypeError ? new Problem("Could not reach the service:", [err.message]) : err);
  } finally {
    button.disabled = false;
  }
});
"""


def _csp_hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


PAGE = (
    '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
    '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
    '<title>Stable Video Diffusion XT</title>\n<link rel="icon" href="data:,">\n'
    f"<style>{STYLE}</style>\n</head>\n<body>{BODY}<script>{SCRIPT}</script>\n</body>\n</html>\n"
)

# Only this page's own script and style run; it talks to its own origin and shows blob: media.
HEADERS = {
    "Content-Security-Policy": "; ".join(
        [
            "default-src 'none'",
            f"script-src {_csp_hash(SCRIPT)}",
            f"style-src {_csp_hash(STYLE)}",
            "img-src 'self' blob: data:",
            "media-src 'self' blob:",
            "connect-src 'self'",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


async def page(_request: Request) -> HTMLResponse:
    return HTMLResponse(PAGE, headers=HEADERS)


ui_app = Starlette(routes=[Route("/", page)])
