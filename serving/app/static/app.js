// vtfuse playground: calls the public API (/v1/vqa with return_attention, /v1/match) and draws the heat map.
"use strict";

const COLORS = { red: [220, 40, 40], green: [40, 170, 60], blue: [40, 80, 220], yellow: [235, 200, 30] };
const SHAPES = ["circle", "square", "triangle"];
const view = document.getElementById("view");
const ctx = view.getContext("2d");
const state = { imageB64: null, bitmap: null, attention: null, scene: null };

function showError(message) {
  const el = document.getElementById("error");
  el.textContent = message;
  el.hidden = !message;
}

// Every API error is {"error": {"code", "message"}}: show both, with the HTTP status.
async function callApi(path, body) {
  let resp;
  try {
    resp = await fetch(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  } catch (e) {
    throw new Error(`The service could not be reached (${e.message}). Is it running?`);
  }
  let data = null;
  try { data = await resp.json(); } catch (e) { /* non-JSON body */ }
  if (!resp.ok) {
    const err = data && data.error ? `${data.error.code}: ${data.error.message}` : resp.statusText;
    const retry = resp.headers.get("Retry-After");
    throw new Error(`HTTP ${resp.status} — ${err}${retry ? ` (retry after ${retry} s)` : ""}`);
  }
  return data;
}

function draw() {
  ctx.clearRect(0, 0, view.width, view.height);
  if (!state.bitmap) return;
  ctx.imageSmoothingEnabled = true;
  ctx.drawImage(state.bitmap, 0, 0, view.width, view.height);
  const grid = state.attention;
  if (!grid || !document.getElementById("show-heat").checked) return;
  const rows = grid.length, cols = grid[0].length;
  const max = Math.max(...grid.flat());
  const cw = view.width / cols, ch = view.height / rows;
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) {
      const a = max > 0 ? grid[r][c] / max : 0;
      ctx.fillStyle = `rgba(255, 60, 0, ${(0.65 * a).toFixed(3)})`;
      ctx.fillRect(c * cw, r * ch, cw, ch);
    }
  }
  view.dataset.heatmap = "drawn";
}

async function setImageFromBlob(blob) {
  const buf = await blob.arrayBuffer();
  let bin = "";
  const bytes = new Uint8Array(buf);
  for (let i = 0; i < bytes.length; i += 0x8000) bin += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  state.imageB64 = btoa(bin);
  try {
    state.bitmap = await createImageBitmap(blob);
  } catch (e) {
    state.bitmap = null; // not decodable here: the API will say why
  }
  state.attention = null;
  delete view.dataset.heatmap;
  document.getElementById("answers").innerHTML = "";
  document.getElementById("ranking").innerHTML = "";
  draw();
}

// A shapes-world scene (SPEC §3), drawn locally so the page works offline.
function randomScene() {
  const rnd = (a, b) => a + Math.random() * (b - a);
  const objects = [];
  const n = 1 + Math.floor(Math.random() * 4);
  for (let tries = 0; objects.length < n && tries < 500; tries++) {
    const size = rnd(0.15, 0.3), x = rnd(0, 1 - size), y = rnd(0, 1 - size);
    if (objects.every(o => x + size + 0.01 <= o.x || o.x + o.size + 0.01 <= x || y + size + 0.01 <= o.y || o.y + o.size + 0.01 <= y)) {
      const color = Object.keys(COLORS)[Math.floor(Math.random() * 4)];
      objects.push({ shape: SHAPES[Math.floor(Math.random() * 3)], color, x, y, size });
    }
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
    const rgb = COLORS[o.color].map(v => Math.max(0, Math.min(255, v + Math.round(Math.random() * 30 - 15))));
    g.fillStyle = `rgb(${rgb.join(",")})`;
    const x0 = o.x * side, y0 = o.y * side, s = o.size * side;
    g.beginPath();
    if (o.shape === "circle") g.arc(x0 + s / 2, y0 + s / 2, s / 2, 0, 2 * Math.PI);
    else if (o.shape === "square") g.rect(x0, y0, s, s);
    else { g.moveTo(x0 + s / 2, y0); g.lineTo(x0 + s, y0 + s); g.lineTo(x0, y0 + s); g.closePath(); }
    g.fill();
  }
  return c;
}

async function randomImage() {
  const scene = randomScene();
  state.scene = scene;
  const blob = await new Promise(res => renderScene(scene, 256).toBlob(res, "image/png"));
  await setImageFromBlob(blob);
  const items = scene.objects.map(o => `a ${o.color} ${o.shape}`);
  const truth = items.join(" and ");
  const o = scene.objects[0];
  const otherColor = Object.keys(COLORS).find(c => c !== o.color);
  const distractor = [`a ${otherColor} ${o.shape}`, ...items.slice(1)].join(" and ");
  document.getElementById("captions").value = [distractor, truth].join("\n");
}

function selectAnswer(li, answer) {
  document.querySelectorAll("#answers li").forEach(x => x.classList.remove("selected"));
  li.classList.add("selected");
  state.attention = answer.attention || null;
  draw();
}

async function ask() {
  showError("");
  if (!state.imageB64) return showError("Pick, drop or generate an image first.");
  const questions = document.getElementById("questions").value.split("\n").map(s => s.trim()).filter(Boolean);
  if (!questions.length) return showError("Type at least one question.");
  const btn = document.getElementById("ask"), status = document.getElementById("ask-status");
  btn.disabled = true; status.textContent = "asking…";
  try {
    const data = await callApi("/v1/vqa", { image: state.imageB64, questions, top_k: 3, return_attention: true });
    const list = document.getElementById("answers");
    list.innerHTML = "";
    data.answers.forEach((a, i) => {
      const li = document.createElement("li");
      li.dataset.answer = a.answer;
      const others = (a.top_k || []).slice(1).map(t => `${t.answer} ${(100 * t.score).toFixed(1)}%`).join(", ");
      li.innerHTML = `<span class="q"></span> → <span class="answer"></span> <span class="score">${(100 * a.score).toFixed(1)}%</span>` +
        (others ? `<div class="topk">also: ${others}</div>` : "");
      li.querySelector(".q").textContent = a.question;
      li.querySelector(".answer").textContent = a.answer;
      li.addEventListener("click", () => selectAnswer(li, a));
      list.appendChild(li);
      if (i === 0) selectAnswer(li, a);
    });
    status.textContent = `model ${data.model}`;
  } catch (e) {
    status.textContent = "";
    showError(e.message);
  } finally {
    btn.disabled = false;
  }
}

async function rank() {
  showError("");
  if (!state.imageB64) return showError("Pick, drop or generate an image first.");
  const texts = document.getElementById("captions").value.split("\n").map(s => s.trim()).filter(Boolean);
  if (!texts.length) return showError("Type at least one caption.");
  const btn = document.getElementById("rank"), status = document.getElementById("rank-status");
  btn.disabled = true; status.textContent = "ranking…";
  try {
    const data = await callApi("/v1/match", { image: state.imageB64, texts });
    const order = data.scores.map((s, i) => [s, i]).sort((a, b) => b[0] - a[0]);
    const list = document.getElementById("ranking");
    list.innerHTML = "";
    for (const [s, i] of order) {
      const li = document.createElement("li");
      li.innerHTML = `<span class="caption"></span> <span class="score">${(100 * s).toFixed(1)}%</span><span class="bar" style="width:${Math.round(80 * s)}px"></span>`;
      li.querySelector(".caption").textContent = texts[i];
      list.appendChild(li);
    }
    status.textContent = "";
  } catch (e) {
    status.textContent = "";
    showError(e.message);
  } finally {
    btn.disabled = false;
  }
}

const drop = document.getElementById("drop");
drop.addEventListener("dragover", e => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", e => {
  e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files.length) setImageFromBlob(e.dataTransfer.files[0]);
});
document.getElementById("file").addEventListener("change", e => { if (e.target.files.length) setImageFromBlob(e.target.files[0]); });
document.getElementById("random").addEventListener("click", randomImage);
document.getElementById("ask").addEventListener("click", ask);
document.getElementById("rank").addEventListener("click", rank);
document.getElementById("show-heat").addEventListener("change", draw);
randomImage();
