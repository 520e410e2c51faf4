// vtfuse playground: calls the public API (/v1/vqa with return_attention, /v1/match, /v1/caption streamed)
// and draws the heat map. Plain JS, no build step and nothing loaded from elsewhere: the page works offline.
"use strict";

const $ = id => document.getElementById(id);
const COLORS = { red: [220, 40, 40], green: [40, 170, 60], blue: [40, 80, 220], yellow: [235, 200, 30] };
const SHAPES = ["circle", "square", "triangle"];
// Heat colour map (dark purple → red → yellow), stops at 0, 0.25, 0.5, 0.75, 1.
const HEAT = [[20, 10, 60], [120, 28, 110], [215, 50, 70], [250, 140, 30], [252, 240, 110]];
const view = $("view");
const ctx = view.getContext("2d");
const state = {
  imageB64: null, bitmap: null, imageName: "", attention: null, scene: null,
  autoQuestions: $("questions").value, autoCaptions: "", pixelsWithoutHeat: null,
};

// ---- API calls and their errors ---------------------------------------------------------------

class ApiError extends Error {
  constructor(message, hint) { super(message); this.hint = hint || ""; }
}

// Friendlier guidance for the API's error codes (the API's own message is always shown too).
function hintFor(status, code, message, items, retry) {
  const m = /\b(?:texts?|questions)[ .](\d+)\b/.exec(message || "");
  const item = m && items ? items[+m[1]] : undefined;
  const short = item && item.length > 60 ? `${item.slice(0, 57)}…` : item;
  const which = item !== undefined ? `Line ${+m[1] + 1}: “${short}”. ` : "";
  switch (code) {
    case "schema_violation": return which + "Fix the text and try again.";
    case "payload_too_large": return "Try a smaller image (fewer pixels or bytes) or fewer lines.";
    case "unsupported_media_type": return "Use a PNG, JPEG or WebP image.";
    case "invalid_input": case "invalid_json": case "invalid_base64": return "The request was malformed.";
    case "unauthorized": return "This service needs an API key: set it under Settings below.";
    case "overloaded": return `The service is busy${retry ? `; try again in ${retry} s` : "; try again shortly"}.`;
    case "upstream_unavailable": return `The model server is not ready${retry ? `; try again in ${retry} s` : ""}.`;
    case "upstream_timeout": return "The model took too long to answer; try again.";
    default: return status >= 500 ? "The service failed; the message above has a request id to report." : "";
  }
}

function apiHeaders() {
  const headers = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) headers["X-API-Key"] = key;
  return headers;
}

// POST a JSON body; a network failure becomes an ApiError saying so (an abort stays an AbortError).
async function post(path, body, signal) {
  try {
    return await fetch(path, { method: "POST", headers: apiHeaders(), body: JSON.stringify(body), signal });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(`The service at ${location.origin} could not be reached (${e.message}).`,
      "Is it running? Start it with `make serve`.");
  }
}

// Every API error is {"error": {"code", "message"}}: shown as "HTTP status — code: message" plus a hint.
function httpError(resp, data, items) {
  const retry = resp.headers.get("Retry-After");
  const err = data && data.error ? data.error : { code: "", message: resp.statusText || "no details" };
  const text = `HTTP ${resp.status} — ${err.code ? `${err.code}: ` : ""}${err.message}`;
  return new ApiError(text, hintFor(resp.status, err.code, err.message, items, retry));
}

async function callApi(path, body, items) {
  const resp = await post(path, body);
  let data = null;
  try { data = await resp.json(); } catch (e) { /* not JSON: a proxy's error page */ }
  if (!resp.ok) throw httpError(resp, data, items);
  if (!data) throw new ApiError(`HTTP ${resp.status} — the response was not JSON.`, "");
  return data;
}

// The JSON of each event of a text/event-stream body, as it arrives (only `data:` lines matter here).
async function* sseEvents(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "", data = [], done = false;
  try {
    while (!done) {
      const chunk = await reader.read();
      done = chunk.done;
      buf += decoder.decode(chunk.value || new Uint8Array(0), { stream: !done });
      let nl;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl).replace(/\r$/, "");
        buf = buf.slice(nl + 1);
        if (line === "" && data.length) {  // a blank line ends an event
          yield JSON.parse(data.join("\n"));
          data = [];
        } else if (line.startsWith("data:")) {
          data.push(line.slice(5).replace(/^ /, ""));
        }
      }
    }
  } finally {
    // Left early (an error event, Stop, a new image): closing the body closes the connection,
    // and the server frees the decoder slot.
    if (!done) reader.cancel().catch(() => {});
  }
}

function showError(id, err) {
  const el = $(id);
  el.replaceChildren();
  if (!err) { el.hidden = true; return; }
  const msg = document.createElement("span");
  msg.className = "message";
  msg.textContent = err.message || String(err);
  el.appendChild(msg);
  if (err.hint) {
    const hint = document.createElement("span");
    hint.className = "hint";
    hint.textContent = err.hint;
    el.appendChild(hint);
  }
  el.hidden = false;
}

async function busy(button, statusId, label, work) {
  const status = $(statusId);
  button.disabled = true;
  status.textContent = label;
  status.classList.add("working");
  const t0 = performance.now();
  try {
    const note = await work();
    status.textContent = note ? `${note} · ${Math.round(performance.now() - t0)} ms` : "";
  } catch (e) {
    status.textContent = "";
    throw e;
  } finally {
    status.classList.remove("working");
    button.disabled = false;
  }
}

// ---- drawing ----------------------------------------------------------------------------------

function heatColor(a) {
  const x = Math.max(0, Math.min(1, a)) * (HEAT.length - 1);
  const i = Math.min(HEAT.length - 2, Math.floor(x)), f = x - i;
  return HEAT[i].map((v, k) => Math.round(v + f * (HEAT[i + 1][k] - v)));
}

// The image keeps its aspect ratio; the model saw it stretched to a square, so the grid covers the whole image.
function imageRect() {
  const b = state.bitmap;
  const side = 512;
  if (!b) return { w: side, h: side };
  const s = side / Math.max(b.width, b.height);
  return { w: Math.max(1, Math.round(b.width * s)), h: Math.max(1, Math.round(b.height * s)) };
}

function draw() {
  const { w, h } = imageRect();
  if (view.width !== w || view.height !== h) { view.width = w; view.height = h; }
  ctx.clearRect(0, 0, w, h);
  delete view.dataset.heatmap;
  if (!state.bitmap) {
    $("drop").classList.toggle("empty", !state.imageB64);
    if (state.imageB64) {  // sent as is; the browser could not preview it
      ctx.fillStyle = "#888";
      ctx.font = "24px system-ui, sans-serif";
      ctx.textAlign = "center";
      ctx.fillText("no preview for this file", w / 2, h / 2);
    }
    return;
  }
  $("drop").classList.remove("empty");
  ctx.imageSmoothingEnabled = true;
  ctx.imageSmoothingQuality = "high";
  ctx.drawImage(state.bitmap, 0, 0, w, h);
  const grid = state.attention;
  if (!grid || !grid.length || !$("show-heat").checked) return;
  const rows = grid.length, cols = grid[0].length;
  const max = Math.max(...grid.flat());
  const opacity = $("heat-opacity").value / 100;
  // One pixel per patch, then scaled up: smoothed (bilinear) or as blocks, one per patch.
  const small = document.createElement("canvas");
  small.width = cols; small.height = rows;
  const g = small.getContext("2d");
  const img = g.createImageData(cols, rows);
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) {
      const a = max > 0 ? grid[r][c] / max : 0;
      const [R, G, B] = heatColor(a);
      const o = 4 * (r * cols + c);
      img.data[o] = R; img.data[o + 1] = G; img.data[o + 2] = B;
      img.data[o + 3] = Math.round(255 * opacity * (0.08 + 0.92 * Math.pow(a, 0.75)));
    }
  }
  g.putImageData(img, 0, 0);
  ctx.imageSmoothingEnabled = $("smooth-heat").checked;
  ctx.drawImage(small, 0, 0, w, h);
  ctx.imageSmoothingEnabled = true;
  let best = 0;
  grid.flat().forEach((v, i, all) => { if (v > all[best]) best = i; });
  view.dataset.heatmap = "drawn";
  view.dataset.grid = `${rows}x${cols}`;
  view.dataset.peak = `${Math.floor(best / cols)},${best % cols}`;
}

// ---- images -----------------------------------------------------------------------------------

function bytesToB64(bytes) {
  let bin = "";
  for (let i = 0; i < bytes.length; i += 0x8000) bin += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(bin);
}

async function setImage(blob, name) {
  showError("image-error", null);
  const bytes = new Uint8Array(await blob.arrayBuffer());
  state.imageB64 = bytesToB64(bytes);
  state.imageName = name || blob.name || "image";
  try {
    state.bitmap = await createImageBitmap(blob);
  } catch (e) {
    state.bitmap = null;
    showError("image-error", new ApiError("This browser could not decode the file as an image.",
      "It will still be sent as is: the API says whether it can read it. PNG, JPEG and WebP are accepted."));
  }
  state.attention = null;
  resetCaption();
  $("answers").replaceChildren();
  $("ranking").replaceChildren();
  $("tokens-panel").hidden = true;
  $("ask-status").textContent = $("rank-status").textContent = "";
  showError("ask-error", null);
  showError("rank-error", null);
  const kb = (bytes.length / 1024).toFixed(bytes.length < 10240 ? 1 : 0);
  const dims = state.bitmap ? `${state.bitmap.width}×${state.bitmap.height}, ` : "";
  $("image-info").textContent = `${state.imageName}: ${dims}${kb} KiB`;
  draw();
}

// A shapes-world scene (1–4 coloured circles, squares and triangles), rendered here so the page works offline.
function randomScene() {
  const rnd = (a, b) => a + Math.random() * (b - a);
  const pick = xs => xs[Math.floor(Math.random() * xs.length)];
  const n = 1 + Math.floor(Math.random() * 4);
  let objects = [];
  while (objects.length < n) {
    let placed = false;
    for (let tries = 0; tries < 200 && !placed; tries++) {
      const size = rnd(0.15, 0.3), x = rnd(0, 1 - size), y = rnd(0, 1 - size);
      if (objects.every(o => x + size + 0.01 <= o.x || o.x + o.size + 0.01 <= x
                          || y + size + 0.01 <= o.y || o.y + o.size + 0.01 <= y)) {
        const color = pick(Object.keys(COLORS));
        const rgb = COLORS[color].map(v => Math.max(0, Math.min(255, v + Math.round(rnd(-25, 25)))));
        objects.push({ shape: pick(SHAPES), color, x, y, size, rgb });
        placed = true;
      }
    }
    if (!placed) objects = [];
  }
  return { bg: [0, 0, 0].map(() => Math.floor(rnd(200, 256))), objects };
}

function renderScene(scene, side) {
  const c = document.createElement("canvas");
  c.width = c.height = side;
  const g = c.getContext("2d");
  g.fillStyle = `rgb(${scene.bg.join(",")})`;
  g.fillRect(0, 0, side, side);
  for (const o of scene.objects) {
    g.fillStyle = `rgb(${o.rgb.join(",")})`;
    const x0 = o.x * side, y0 = o.y * side, s = o.size * side;
    g.beginPath();
    if (o.shape === "circle") g.arc(x0 + s / 2, y0 + s / 2, s / 2, 0, 2 * Math.PI);
    else if (o.shape === "square") g.rect(x0, y0, s, s);
    else { g.moveTo(x0 + s / 2, y0); g.lineTo(x0 + s, y0 + s); g.lineTo(x0, y0 + s); g.closePath(); }
    g.fill();
  }
  return c;
}

// A few of the question kinds the shapes world asks about a scene (the ones the model was trained on).
function sceneQuestions(scene) {
  const count = (shape, color) => scene.objects.filter(o => (!shape || o.shape === shape) && (!color || o.color === color)).length;
  const out = [];
  const unique = SHAPES.filter(s => count(s) === 1);
  if (unique.length) out.push(`what color is the ${unique[0]}?`);
  const colors = Object.keys(COLORS).filter(c => count(null, c) === 1);
  if (colors.length) out.push(`what shape is the ${colors[colors.length - 1]} object?`);
  const most = SHAPES.slice().sort((a, b) => count(b) - count(a))[0];
  out.push(`how many ${most}s are there?`);
  const o = scene.objects[0];
  out.push(`is there a ${o.color} ${o.shape}?`);
  return out.slice(0, 3);
}

async function randomImage() {
  const scene = randomScene();
  state.scene = scene;
  const blob = await new Promise(res => renderScene(scene, 256).toBlob(res, "image/png"));
  await setImage(blob, "random shapes image");
  const items = scene.objects.map(o => `a ${o.color} ${o.shape}`);
  const o = scene.objects[0];
  const otherColor = Object.keys(COLORS).filter(c => c !== o.color)[Math.floor(Math.random() * 3)];
  const otherShape = SHAPES.filter(s => s !== o.shape)[Math.floor(Math.random() * 2)];
  const captions = [
    [`a ${otherColor} ${o.shape}`, ...items.slice(1)].join(" and "),
    items.join(" and "),
    [`a ${o.color} ${otherShape}`, ...items.slice(1)].join(" and "),
  ];
  // Replace the suggestions only where the person has not typed their own.
  const q = $("questions"), cap = $("captions");
  if (!q.value.trim() || q.value === state.autoQuestions) q.value = state.autoQuestions = sceneQuestions(scene).join("\n");
  if (!cap.value.trim() || cap.value === state.autoCaptions) cap.value = state.autoCaptions = captions.join("\n");
}

// ---- asking and ranking -------------------------------------------------------------------------

const lines = id => $(id).value.split("\n").map(s => s.trim()).filter(Boolean);
const pct = s => `${(100 * s).toFixed(1)}%`;

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function selectAnswer(li, answer) {
  document.querySelectorAll("#answers li").forEach(x => {
    x.classList.toggle("selected", x === li);
    x.querySelector("button").setAttribute("aria-pressed", String(x === li));
  });
  state.attention = answer.attention || null;
  const tokens = $("tokens");
  tokens.replaceChildren(...(answer.tokens || []).map(t => {
    const chip = el("span", "token", t);
    if (/^\[.*\]$/.test(t)) chip.classList.add("special");
    return chip;
  }));
  $("tokens-panel").hidden = !(answer.tokens && answer.tokens.length);
  draw();
}

function answerItem(a) {
  const li = el("li");
  li.dataset.answer = a.answer;
  const b = el("button", "answer-card");
  b.type = "button";
  b.setAttribute("aria-pressed", "false");
  b.appendChild(el("span", "q", a.question));
  const line = el("span", "a-line");
  line.append(el("span", "answer", a.answer), el("span", "score", pct(a.score)));
  b.appendChild(line);
  const bars = el("span", "topk");
  for (const t of a.top_k || []) {
    const row = el("span", "topk-row");
    const bar = el("span", "bar");
    bar.style.width = `${Math.max(1, Math.round(100 * t.score))}%`;
    const track = el("span", "track");
    track.appendChild(bar);
    row.append(el("span", "label", t.answer), track, el("span", "score", pct(t.score)));
    bars.appendChild(row);
  }
  b.appendChild(bars);
  b.addEventListener("click", () => selectAnswer(li, a));
  li.appendChild(b);
  return li;
}

async function ask() {
  showError("ask-error", null);
  if (!state.imageB64) return showError("ask-error", new ApiError("Pick, drop or generate an image first."));
  const questions = lines("questions");
  if (!questions.length) return showError("ask-error", new ApiError("Type at least one question."));
  const topK = Math.max(1, Math.min(14, parseInt($("top-k").value, 10) || 3));
  try {
    await busy($("ask"), "ask-status", "asking…", async () => {
      const data = await callApi("/v1/vqa", { image: state.imageB64, questions, top_k: topK, return_attention: true }, questions);
      const list = $("answers");
      list.replaceChildren();
      data.answers.forEach((a, i) => {
        const li = answerItem(a);
        list.appendChild(li);
        if (i === 0) selectAnswer(li, a);
      });
      return `model ${data.model}`;
    });
  } catch (e) {
    // What is shown must match what was asked: drop the previous answers and their heat map.
    $("answers").replaceChildren();
    $("tokens-panel").hidden = true;
    state.attention = null;
    draw();
    showError("ask-error", e);
  }
}

async function rank() {
  showError("rank-error", null);
  if (!state.imageB64) return showError("rank-error", new ApiError("Pick, drop or generate an image first."));
  const texts = lines("captions");
  if (!texts.length) return showError("rank-error", new ApiError("Type at least one caption."));
  try {
    await busy($("rank"), "rank-status", "ranking…", async () => {
      const data = await callApi("/v1/match", { image: state.imageB64, texts }, texts);
      const order = data.scores.map((s, i) => [s, i]).sort((a, b) => b[0] - a[0]);
      const list = $("ranking");
      list.replaceChildren();
      for (const [s, i] of order) {
        const li = el("li");
        li.dataset.caption = texts[i];
        const track = el("span", "track");
        const bar = el("span", "bar");
        bar.style.width = `${Math.max(1, Math.round(100 * s))}%`;
        track.appendChild(bar);
        li.append(el("span", "caption", texts[i]), track, el("span", "score", pct(s)));
        list.appendChild(li);
      }
      return `model ${data.model}`;
    });
  } catch (e) {
    $("ranking").replaceChildren();
    showError("rank-error", e);
  }
}

// ---- captioning, streamed ----------------------------------------------------------------------------

let captionAbort = null;  // the running caption's AbortController

// Drop a running caption (its connection is closed) and clear what was shown.
function resetCaption() {
  if (captionAbort) {
    captionAbort.abort();
    captionAbort = null;  // the dropped run then leaves the panel alone
  }
  $("caption-stop").disabled = true;
  const out = $("caption-text");
  out.textContent = "";
  out.className = "generated";
  out.setAttribute("aria-busy", "false");
  for (const k of ["state", "events", "finishReason", "tokens"]) delete out.dataset[k];
  $("caption-meta").textContent = $("caption-status").textContent = "";
  showError("caption-error", null);
}

async function caption() {
  resetCaption();
  if (!state.imageB64) return showError("caption-error", new ApiError("Pick, drop or generate an image first."));
  const body = { image: state.imageB64, stream: true };
  const prompt = $("caption-prompt").value.trim();
  if (prompt) body.prompt = prompt;
  const out = $("caption-text"), stop = $("caption-stop");
  const abort = new AbortController();
  captionAbort = abort;
  out.dataset.state = "streaming";
  out.dataset.events = "0";
  out.setAttribute("aria-busy", "true");  // read out once whole, not token by token
  stop.disabled = false;
  const t0 = performance.now();
  let firstMs = null;
  try {
    await busy($("caption"), "caption-status", "captioning…", async () => {
      const resp = await post("/v1/caption", body, abort.signal);
      if (!resp.ok) {
        let data = null;
        try { data = await resp.json(); } catch (e) { /* not JSON */ }
        throw httpError(resp, data, null);
      }
      let text = "";
      for await (const ev of sseEvents(resp)) {
        if (ev.error) {  // failed after the stream began: the status was already 200
          throw new ApiError(`Failed mid-stream — ${ev.error.code}: ${ev.error.message}`,
            hintFor(500, ev.error.code, ev.error.message, null, null));
        }
        text += ev.delta || "";
        out.textContent = text;
        if (!("caption" in ev)) {
          out.dataset.events = String(+out.dataset.events + 1);
          if (firstMs === null) firstMs = performance.now() - t0;
          continue;
        }
        // The last event: the whole result (its text is what the deltas added up to).
        out.textContent = ev.caption;
        out.dataset.state = "done";
        out.dataset.finishReason = ev.finish_reason;
        out.dataset.tokens = String(ev.usage.generated_tokens);
        const why = ev.finish_reason === "stop" ? "stop (end token)" : "length (token limit)";
        const first = firstMs === null ? "" : ` · first token after ${Math.round(firstMs)} ms`;
        $("caption-meta").textContent = `finish reason: ${why} · ${ev.usage.generated_tokens} tokens${first}`;
        return `model ${ev.model}`;
      }
      throw new ApiError("The stream ended before the caption was complete.", "The connection was cut; try again.");
    });
  } catch (e) {
    if (e.name === "AbortError") {
      if (captionAbort === abort) {  // Stop, not a new caption or image
        out.dataset.state = "stopped";
        out.classList.add("incomplete");
        $("caption-status").textContent = "stopped";
      }
    } else {
      out.dataset.state = "error";
      out.classList.add("incomplete");  // what arrived before the error stays, marked unfinished
      showError("caption-error", e);
    }
  } finally {
    if (captionAbort === abort) {
      captionAbort = null;
      stop.disabled = true;
      out.setAttribute("aria-busy", "false");
    }
  }
}

// ---- service health -------------------------------------------------------------------------------

async function checkHealth() {
  const pill = $("health");
  try {
    const r = await fetch("/readyz", { cache: "no-store" });
    const data = await r.json().catch(() => null);
    if (r.ok) {
      pill.textContent = "ready";
      pill.className = "pill ok";
      pill.title = data && data.models ? `Triton models: ${Object.keys(data.models).join(", ")}` : "";
      return;
    }
    pill.textContent = "not ready";
    pill.className = "pill warn";
    pill.title = data && data.error ? data.error.message : `HTTP ${r.status}`;
  } catch (e) {
    pill.textContent = "unreachable";
    pill.className = "pill bad";
    pill.title = `the service at ${location.origin} could not be reached`;
  }
  setTimeout(checkHealth, 5000);  // poll until ready
}

// ---- wiring ---------------------------------------------------------------------------------------

const drop = $("drop");
drop.addEventListener("dragover", e => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", e => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) setImage(e.dataTransfer.files[0]);
});
drop.addEventListener("click", () => $("file").click());
drop.addEventListener("keydown", e => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file").click(); } });
document.addEventListener("paste", e => {
  const item = [...(e.clipboardData ? e.clipboardData.items : [])].find(i => i.type.startsWith("image/"));
  if (item) { e.preventDefault(); setImage(item.getAsFile(), "pasted image"); }
});
$("file").addEventListener("change", e => { if (e.target.files.length) setImage(e.target.files[0]); e.target.value = ""; });
$("random").addEventListener("click", randomImage);
$("ask").addEventListener("click", ask);
$("rank").addEventListener("click", rank);
$("caption").addEventListener("click", caption);
$("caption-stop").addEventListener("click", () => { if (captionAbort) captionAbort.abort(); });
$("caption-prompt").addEventListener("keydown", e => {
  if (e.key === "Enter") { e.preventDefault(); if (!$("caption").disabled) caption(); }
});
for (const id of ["show-heat", "smooth-heat", "heat-opacity"]) $(id).addEventListener("input", draw);
$("questions").addEventListener("keydown", e => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); ask(); } });
$("captions").addEventListener("keydown", e => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); rank(); } });
$("api-key").value = sessionStorage.getItem("vtfuse-api-key") || "";
$("api-key").addEventListener("change", e => sessionStorage.setItem("vtfuse-api-key", e.target.value.trim()));
checkHealth();
randomImage();
