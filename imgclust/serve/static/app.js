// imgclust serve: selection and curation on cluster pages, the map. No libraries.
"use strict";

function say(text, bad) {
  let box = document.getElementById("status");
  if (!box) { box = document.createElement("div"); box.id = "status"; document.body.appendChild(box); }
  box.textContent = text;
  box.style.background = bad ? "#b71c1c" : "#263238";
}

async function edit(body) {
  const r = await fetch("/api/curation", {method: "POST", headers: {"Content-Type": "application/json"},
                                          body: JSON.stringify(body)});
  const answer = await r.json().catch(() => ({error: "no answer"}));
  if (!r.ok) { say(answer.error || ("failed: " + r.status), true); return false; }
  say("saved"); location.reload(); return true;
}

async function split(cluster, parts) {
  say("splitting cluster " + cluster + " into " + parts + " (re-clustering its members)...");
  const r = await fetch("/api/split", {method: "POST", headers: {"Content-Type": "application/json"},
                                       body: JSON.stringify({cluster, parts})});
  const answer = await r.json().catch(() => ({error: "no answer"}));
  if (!r.ok) { say(answer.error || ("failed: " + r.status), true); return; }
  say("split into clusters " + answer.into.join(", ")); location.href = "/";
}

function clusterTools() {
  const tools = document.querySelector(".tools[data-cluster]");
  if (!tools) return;
  const cluster = Number(tools.dataset.cluster);
  const picked = () => Array.from(document.querySelectorAll("figure.member.picked"));
  const count = document.getElementById("picked");
  document.querySelectorAll("input.pick").forEach(box => box.addEventListener("change", () => {
    box.closest("figure").classList.toggle("picked", box.checked);
    count.textContent = picked().length + " selected";
  }));
  tools.querySelectorAll("form.tool").forEach(form => form.addEventListener("submit", ev => {
    ev.preventDefault();
    if (form.dataset.action === "rename") edit({action: "rename", cluster, name: form.elements.name.value});
    if (form.dataset.action === "merge") edit({action: "merge", into: cluster, clusters: [Number(form.elements.other.value)]});
    if (form.dataset.action === "split") split(cluster, Number(form.elements.parts.value));
  }));
  const selection = () => {
    const figs = picked();
    if (!figs.length) { say("select images first", true); return null; }
    return {paths: figs.map(f => f.dataset.path), indices: figs.map(f => Number(f.dataset.index))};
  };
  const move = document.getElementById("move");
  if (move) move.addEventListener("click", () => {
    const s = selection(); if (s) edit({action: "move", cluster: Number(document.getElementById("move-to").value), ...s});
  });
  const reject = document.getElementById("reject");
  if (reject) reject.addEventListener("click", () => { const s = selection(); if (s) edit({action: "reject", ...s}); });
}

async function drawMap() {
  const canvas = document.getElementById("map");
  if (!canvas) return;
  const r = await fetch("/api/map");
  if (!r.ok) { say("the map could not be made", true); return; }
  const m = await r.json();
  const ctx = canvas.getContext("2d"), W = canvas.width, H = canvas.height, pad = 12;
  const xs = m.x, ys = m.y;
  const [x0, x1] = [Math.min(...xs), Math.max(...xs)], [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  const px = xs.map(x => pad + (x - x0) / ((x1 - x0) || 1) * (W - 2 * pad));
  const py = ys.map(y => H - pad - (y - y0) / ((y1 - y0) || 1) * (H - 2 * pad));
  const colour = c => c < 0 ? "#999" : `hsl(${(c * 137.508) % 360}, 65%, 45%)`;
  for (let i = 0; i < px.length; i++) { ctx.fillStyle = colour(m.cluster[i]); ctx.fillRect(px[i] - 2, py[i] - 2, 4, 4); }
  canvas.dataset.points = String(px.length);
  const peek = document.getElementById("peek");
  const nearest = ev => {
    const b = canvas.getBoundingClientRect(), x = (ev.clientX - b.left) * W / b.width, y = (ev.clientY - b.top) * H / b.height;
    let best = -1, bd = 100;
    for (let i = 0; i < px.length; i++) { const d = (px[i] - x) ** 2 + (py[i] - y) ** 2; if (d < bd) { bd = d; best = i; } }
    return best;
  };
  canvas.addEventListener("mousemove", ev => {
    const i = nearest(ev);
    if (i < 0) { peek.hidden = true; return; }
    peek.src = "/thumb/" + m.index[i]; peek.hidden = false;
    peek.style.left = (px[i] * canvas.clientWidth / W + 10) + "px"; peek.style.top = (py[i] * canvas.clientHeight / H + 10) + "px";
  });
  canvas.addEventListener("click", ev => { const i = nearest(ev); if (i >= 0) location.href = "/cluster/" + m.cluster[i]; });
}

clusterTools();
drawMap();
