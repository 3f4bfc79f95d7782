// finetune-operator console: draws loss curves (SVG) and streams the chat playground. No dependencies.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2"];

function el(name, attrs) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  return node;
}

// One chart, one polyline and one circle per history point for each training stage.
function drawCurves(box, curves) {
  box.textContent = "";
  const names = Object.keys(curves).filter((n) => curves[n].some((p) => typeof p.loss === "number"));
  if (names.length === 0) return;
  const W = 720, H = 300, L = 56, R = 16, T = 16, B = 36;
  const pts = names.flatMap((n) => curves[n].filter((p) => typeof p.loss === "number"));
  const xs = pts.map((p) => p.step), ys = pts.map((p) => p.loss);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
  let y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (y1 - y0 < 1e-9) { y0 -= 0.5; y1 += 0.5; }
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": "training loss" });
  svg.appendChild(el("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }));
  svg.appendChild(el("line", { x1: L, y1: T, x2: L, y2: H - B, class: "axis" }));
  const label = (x, y, text, cls) => { const t = el("text", { x, y, class: cls }); t.textContent = text; svg.appendChild(t); };
  label(L - 6, sy(y1) + 4, y1.toFixed(3), "tick y");
  label(L - 6, sy(y0) + 4, y0.toFixed(3), "tick y");
  label(sx(x0), H - B + 16, String(x0), "tick x");
  label(sx(x1), H - B + 16, String(x1), "tick x");
  label((L + W - R) / 2, H - 4, "step", "axis-label");
  names.forEach((name, i) => {
    const color = COLORS[i % COLORS.length];
    const series = curves[name].filter((p) => typeof p.loss === "number");
    svg.appendChild(el("polyline", {
      points: series.map((p) => `${sx(p.step).toFixed(1)},${sy(p.loss).toFixed(1)}`).join(" "),
      fill: "none", stroke: color, "stroke-width": 1.5, class: "curve", "data-stage": name,
    }));
    for (const p of series) {
      const c = el("circle", { cx: sx(p.step).toFixed(1), cy: sy(p.loss).toFixed(1), r: 2, fill: color, class: "pt", "data-stage": name });
      const tip = el("title"); tip.textContent = `${name} step ${p.step}: loss ${p.loss.toFixed(4)}`; c.appendChild(tip);
      svg.appendChild(c);
    }
    label(W - R - 4, T + 14 + 16 * i, name, "legend");
    svg.lastChild.setAttribute("fill", color);
  });
  box.appendChild(svg);
}

function initCurves() {
  const box = document.getElementById("curves");
  const data = document.getElementById("curve-data");
  if (!box || !data) return;
  drawCurves(box, JSON.parse(data.textContent || "{}"));
  const refresh = async () => {
    try {
      const resp = await fetch(box.dataset.src, { headers: { Accept: "application/json" } });
      if (!resp.ok) return;
      const job = await resp.json();
      drawCurves(box, job.curves || {});
      const state = document.getElementById("state");
      if (state && job.state) state.textContent = job.state;
      const empty = document.getElementById("no-curves");
      if (empty && Object.keys(job.curves || {}).length) empty.hidden = true;
    } catch (e) { /* keep the last drawing; the next refresh may work */ }
  };
  setInterval(refresh, 5000);
}

function initChat() {
  const chat = document.getElementById("chat");
  if (!chat) return;
  const form = document.getElementById("chat-form");
  const input = document.getElementById("chat-input");
  const send = document.getElementById("chat-send");
  const transcript = document.getElementById("transcript");
  const error = document.getElementById("chat-error");
  const messages = [];
  const bubble = (role, text) => {
    const div = document.createElement("div");
    div.className = `msg ${role}`;
    div.textContent = text;
    transcript.appendChild(div);
    return div;
  };
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = input.value.trim();
    if (!text) return;
    error.hidden = true;
    input.value = "";
    send.disabled = true;
    bubble("user", text);
    messages.push({ role: "user", content: text });
    const answer = bubble("assistant", "");
    answer.classList.add("streaming");
    try {
      const resp = await fetch(chat.dataset.url, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ messages, max_tokens: 256 }),
      });
      if (!resp.ok) {
        let msg = `HTTP ${resp.status}`;
        try { msg = (await resp.json()).error || msg; } catch (e) { /* not JSON */ }
        throw new Error(msg);
      }
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        answer.textContent += decoder.decode(value, { stream: true });
      }
      messages.push({ role: "assistant", content: answer.textContent });
      answer.classList.add("done");
    } catch (e) {
      messages.pop();
      answer.remove();
      error.textContent = `The model did not answer: ${e.message}`;
      error.hidden = false;
    } finally {
      answer.classList.remove("streaming");
      send.disabled = false;
    }
  });
}

document.addEventListener("DOMContentLoaded", () => { initCurves(); initChat(); });
