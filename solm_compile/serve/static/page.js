// solm serve's page: send the prompt with the budget sliders, stream the answer, shade each token by its compute.
// Colours come from the server (shade.py's viridis scale, in each chunk's "solm" object); nothing is fetched from
// anywhere but this server.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
let model = null;
let abort = null;
let costs = [];
let scale = null;
let staticCost = null;

function fmt(x, n = 2) { return x === null || x === undefined ? "–" : Number(x).toFixed(n); }

async function init() {
  for (const id of ["attn_keep", "mlp_keep"]) {
    $(id).addEventListener("input", () => { $(id + "_v").textContent = fmt($(id).value); });
  }
  $("ask").addEventListener("submit", send);
  $("stop").addEventListener("click", () => abort && abort.abort());
  document.addEventListener("click", (e) => { if (!e.target.classList.contains("t")) hideTip(); });
  const r = await fetch("/v1/models");
  model = (await r.json()).data[0];
  const s = model.solm;
  $("model").textContent = `${model.id} · ${s.kind} artifact`;
  if (s.budget_ranges) {
    $("attn_keep").min = s.budget_ranges[0][0];
    $("mlp_keep").min = s.budget_ranges[1][0];
  }
  if (s.kind === "dense") { $("attn_keep").disabled = $("mlp_keep").disabled = true; }
  $("chat").checked = s.chat;
  $("chat").disabled = !s.chat;
  $("ramp").style.background = `linear-gradient(to right, ${s.palette.join(", ")})`;
  drawChart();
}

function setStatus(state, text) {
  $("status").dataset.state = state;
  $("status").textContent = text;
}

async function send(ev) {
  ev.preventDefault();
  if (abort) abort.abort();
  $("answer").textContent = "";
  costs = [];
  scale = null;
  staticCost = null;
  hideTip();
  drawChart();
  const chat = $("chat").checked;
  const body = {
    model: model.id, stream: true, max_tokens: Number($("max_tokens").value),
    temperature: Number($("temperature").value),
    attn_keep: Number($("attn_keep").value), mlp_keep: Number($("mlp_keep").value),
  };
  if (chat) body.messages = [{ role: "user", content: $("prompt").value }];
  else body.prompt = $("prompt").value;
  abort = new AbortController();
  $("stop").disabled = false;
  setStatus("streaming", "generating…");
  try {
    const resp = await fetch(chat ? "/v1/chat/completions" : "/v1/completions", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      signal: abort.signal,
    });
    if (!resp.ok) {
      const err = await resp.json().catch(() => ({ error: { message: resp.statusText } }));
      setStatus("error", err.error.message);
      return;
    }
    await readEvents(resp.body.getReader(), chat);
  } catch (e) {
    setStatus(e.name === "AbortError" ? "stopped" : "error", e.name === "AbortError" ? "stopped" : String(e));
  } finally {
    $("stop").disabled = true;
    abort = null;
  }
}

async function readEvents(reader, chat) {
  const dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, i);
      buf = buf.slice(i + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ")) onData(line.slice(6), chat);
      }
    }
  }
}

function onData(data, chat) {
  if (data === "[DONE]") return;
  const obj = JSON.parse(data);
  if (obj.error) { setStatus("error", obj.error.message); return; }
  const choice = obj.choices[0];
  const text = chat ? (choice.delta.content || "") : choice.text;
  const s = obj.solm;
  if (s && s.token !== undefined) addToken(text, s);
  else if (text) $("answer").append(document.createTextNode(text));
  if (choice.finish_reason) {
    if (s && s.static_cost !== null && s.static_cost !== undefined) { staticCost = s.static_cost; drawChart(); }
    const mean = s && s.mean_cost !== null && s.mean_cost !== undefined ? `, mean compute ${fmt(s.mean_cost, 3)} of dense` : "";
    setStatus("done", `${costs.length} tokens (${choice.finish_reason})${mean}`);
  }
}

function addToken(text, s) {
  const span = document.createElement("span");
  span.className = "t";
  span.textContent = text;
  span.tabIndex = 0;
  span.dataset.token = s.token;
  if (s.token_cost !== null) {
    span.dataset.cost = String(s.token_cost);
    span.style.background = s.colour;
    span.style.color = s.ink;
    costs.push(s.token_cost);
    scale = s.scale;
    $("lo").textContent = fmt(scale[0]);
  }
  const c = s.controls;
  span.dataset.tip = [
    `token ${s.token} at KV length ${s.L}`,
    s.token_cost === null ? "compute: not known for this artifact" : `compute ${fmt(s.token_cost, 3)} of the dense budget`,
    c ? `attention keep κ ${fmt(c[0])} · MLP keep ρ ${fmt(c[1])} · bits ${fmt(c[2], 0)}` : "dense step (no controls)",
    s.action === null ? "" : `action ${s.action} (one action for every layer)`,
  ].filter(Boolean).join("\n");
  for (const ev of ["mouseenter", "focus", "click"]) span.addEventListener(ev, () => showTip(span));
  span.addEventListener("mouseleave", hideTip);
  span.addEventListener("blur", hideTip);
  $("answer").append(span);
  drawChart();
}

function showTip(span) {
  const tip = $("tip");
  tip.textContent = span.dataset.tip;
  tip.hidden = false;
  const r = span.getBoundingClientRect();
  const room = document.documentElement.clientWidth - tip.offsetWidth - 4;   // kept inside the window
  tip.style.left = `${window.scrollX + Math.max(4, Math.min(r.left, room))}px`;
  tip.style.top = `${window.scrollY + r.bottom + 4}px`;
}

function hideTip() { $("tip").hidden = true; }

function el(name, attrs, text) {
  const e = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text) e.textContent = text;
  return e;
}

function drawChart() {
  const svg = $("chart");
  svg.replaceChildren();
  const W = 640, H = 180, left = 40, right = 60, top = 10, bottom = 22;
  const lo = Math.min(scale ? scale[0] : 0, ...costs, 1);
  const y0 = Math.max(0, Math.floor((lo - 0.05) * 10) / 10), y1 = 1.05;
  const y = (v) => top + (H - top - bottom) * (y1 - v) / (y1 - y0);
  const n = Math.max(costs.length, 2);
  const x = (i) => left + (W - left - right) * i / (n - 1);
  for (const v of [y0, (y0 + 1) / 2, 1]) {
    svg.append(el("text", { x: 4, y: y(v) + 4 }, fmt(v)));
  }
  svg.append(el("line", { class: "dense", x1: left, x2: W - right, y1: y(1), y2: y(1) }));
  svg.append(el("text", { x: W - right + 4, y: y(1) + 4 }, "dense"));
  if (scale) {
    svg.append(el("line", { class: "floor", x1: left, x2: W - right, y1: y(scale[0]), y2: y(scale[0]) }));
    svg.append(el("text", { x: W - right + 4, y: y(scale[0]) + 4 }, "floor"));
  }
  if (staticCost !== null) {
    svg.append(el("line", { class: "static", x1: left, x2: W - right, y1: y(staticCost), y2: y(staticCost) }));
    svg.append(el("text", { x: W - right + 4, y: y(staticCost) + 4 }, "static"));
  }
  svg.append(el("text", { x: left, y: H - 6 }, costs.length ? `token 1 … ${costs.length}` : "no tokens yet"));
  if (costs.length) {
    const pts = costs.map((c, i) => `${x(i).toFixed(1)},${y(c).toFixed(1)}`).join(" ");
    svg.append(el("polyline", { class: "series", points: costs.length > 1 ? pts : `${pts} ${x(1).toFixed(1)},${y(costs[0]).toFixed(1)}` }));
  }
}

init().catch((e) => setStatus("error", `cannot reach the server: ${e}`));
