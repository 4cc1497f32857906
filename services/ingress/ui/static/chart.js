// Small SVG charts for the dashboard: a line chart of one or more series over time, and a bar chart of
// labelled values. No dependencies, no network: the page must work offline and under a strict CSP.
const NS = "http://www.w3.org/2000/svg";
const W = 600, H = 180, PAD = { l: 60, r: 8, t: 8, b: 22 };

function el(name, attrs = {}, text) {
  const node = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

function frame(container, label) {
  container.replaceChildren();
  const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": label, preserveAspectRatio: "none" });
  container.append(svg);
  return svg;
}

function empty(container) {
  const p = document.createElement("div");
  p.className = "empty";
  p.textContent = "No data yet";
  container.replaceChildren(p);
}

function fmt(v) {
  if (Math.abs(v) >= 1000) return `${(v / 1000).toFixed(1)}k`;
  if (Math.abs(v) >= 10 || v === 0) return v.toFixed(0);
  return v.toPrecision(2);
}

function yAxis(svg, max) {
  for (const f of [0, 0.5, 1]) {
    const y = PAD.t + (1 - f) * (H - PAD.t - PAD.b);
    svg.append(el("line", { x1: PAD.l, x2: W - PAD.r, y1: y, y2: y, class: "axis" }));
    svg.append(el("text", { x: PAD.l - 4, y: y + 3, "text-anchor": "end" }, fmt(max * f)));
  }
}

/** Lines over time. `series`: [{name, points: [[tSeconds, value|null], ...]}]; gaps where value is null. */
export function lineChart(container, series, label = "chart") {
  const all = series.flatMap((s) => s.points.filter((p) => p[1] !== null && p[1] !== undefined));
  if (!all.length) return empty(container);
  const svg = frame(container, label);
  const ts = all.map((p) => p[0]);
  const t0 = Math.min(...ts), t1 = Math.max(...ts, t0 + 1);
  const max = Math.max(...all.map((p) => p[1]), 1e-9);
  yAxis(svg, max);
  const x = (t) => PAD.l + ((t - t0) / (t1 - t0)) * (W - PAD.l - PAD.r);
  const y = (v) => PAD.t + (1 - v / max) * (H - PAD.t - PAD.b);
  series.forEach((s, i) => {
    let d = "", pen = "M";
    for (const [t, v] of s.points) {
      if (v === null || v === undefined) { pen = "M"; continue; }
      d += `${pen}${x(t).toFixed(1)},${y(v).toFixed(1)} `;
      pen = "L";
    }
    svg.append(el("path", { d, class: `s${i % 3}` }));
    for (const [t, v] of s.points) if (v !== null && v !== undefined) {
      const dot = el("circle", { cx: x(t), cy: y(v), r: 2.5, class: `s${i % 3}` });
      dot.append(el("title", {}, `${s.name}: ${v}`));
      svg.append(dot);
    }
    svg.append(el("text", { x: PAD.l + 4 + i * 70, y: H - 4, class: `s${i % 3}` }, s.name));
  });
  const when = (t) => new Date(t * 1000).toISOString().slice(5, 16).replace("T", " ");
  svg.append(el("text", { x: W - PAD.r, y: H - 4, "text-anchor": "end" }, `${when(t0)} → ${when(t1)}`));
}

/** Vertical bars, one per item: [{label, value}]. */
export function barChart(container, items, label = "chart") {
  if (!items.length) return empty(container);
  const svg = frame(container, label);
  const max = Math.max(...items.map((i) => i.value), 1e-9);
  yAxis(svg, max);
  const slot = (W - PAD.l - PAD.r) / items.length;
  items.forEach((item, i) => {
    const h = (item.value / max) * (H - PAD.t - PAD.b);
    const bar = el("rect", { x: PAD.l + i * slot + slot * 0.1, y: H - PAD.b - h, width: slot * 0.8,
                             height: Math.max(h, 0.5), class: "s0" });
    bar.append(el("title", {}, `${item.label}: ${item.value}`));
    svg.append(bar);
    if (items.length <= 16) {
      svg.append(el("text", { x: PAD.l + (i + 0.5) * slot, y: H - 8, "text-anchor": "middle" },
                    String(item.label).slice(0, 14)));
    }
  });
}
