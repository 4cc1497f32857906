// The dashboard's charts, drawn by uPlot (https://github.com/leeoniya/uPlot, MIT), which `switchyard ui install`
// fetches and verifies and ingress serves from /ui/vendor/. This module only configures it: series, colours
// from the page's light/dark palette, sizes that follow the container. Without the library each chart says
// how to get it instead of breaking the page.
const LIBRARY = "/ui/vendor/uPlot.esm.js";
const HEIGHT = 200;
let library = null;

function load() {
  library ??= import(LIBRARY).then((m) => m.default).catch(() => null);
  return library;
}

const charts = new WeakMap(); // container -> { plot, observer }

function note(container, text, cls) {
  forget(container);
  const p = document.createElement("div");
  p.className = cls;
  p.textContent = text;
  container.replaceChildren(p);
}

function forget(container) {
  const old = charts.get(container);
  if (old) { old.observer.disconnect(); old.plot.destroy(); charts.delete(container); }
}

function palette() {
  const css = getComputedStyle(document.documentElement);
  const v = (name) => css.getPropertyValue(name).trim();
  return { series: [v("--s1"), v("--s2"), v("--s3")], axis: v("--muted"), grid: v("--line") };
}

function fmt(v) {
  if (v === null || v === undefined) return "—";
  if (Math.abs(v) >= 1000) return `${(v / 1000).toFixed(1)}k`;
  if (Math.abs(v) >= 10 || v === 0) return v.toFixed(0);
  return String(Number(v.toPrecision(2)));
}

// The y axis is as wide as its longest label (small dollar amounts are long), so no label is cut off.
const ySize = (u, values) => (values?.length ? Math.max(...values.map((v) => String(v).length)) * 7 + 16 : 40);

async function draw(container, label, hasData, build) {
  const uPlot = await load();
  if (!uPlot) {
    note(container, "Charts unavailable: run `switchyard ui install` where the gateway runs, then reload.", "empty unavailable");
    return;
  }
  if (!hasData) return note(container, "No data yet", "empty");
  forget(container);
  container.replaceChildren();
  const colours = palette();
  const axis = { stroke: colours.axis, grid: { stroke: colours.grid, width: 1 }, ticks: { stroke: colours.grid, width: 1 } };
  const { options, data } = build(uPlot, colours, axis);
  const width = () => Math.max(container.clientWidth, 200);
  const plot = new uPlot({ title: undefined, width: width(), height: HEIGHT, ...options }, data, container);
  plot.root.setAttribute("role", "img");
  plot.root.setAttribute("aria-label", label);
  // Pages are hidden while their data loads: follow the container's real width once it shows, and on resize.
  const observer = new ResizeObserver(() => { if (container.clientWidth) plot.setSize({ width: width(), height: HEIGHT }); });
  observer.observe(container);
  charts.set(container, { plot, observer });
}

/** Lines over time. `series`: [{name, points: [[tSeconds, value|null], ...]}]; gaps where value is null.
 * `range`: [fromSeconds, toSeconds], the window the x axis spans (else the data's own extent). */
export async function lineChart(container, series, label = "chart", range = null) {
  const hasData = series.some((s) => s.points.some((p) => p[1] !== null && p[1] !== undefined));
  await draw(container, label, hasData, (uPlot, colours, axis) => {
    const xs = [...new Set(series.flatMap((s) => s.points.map((p) => p[0])))].sort((a, b) => a - b);
    const ys = series.map((s) => {
      const byT = new Map(s.points.map(([t, v]) => [t, v ?? null]));
      return xs.map((t) => (byT.has(t) ? byT.get(t) : null));
    });
    return {
      data: [xs, ...ys],
      options: {
        series: [{ label: "time" },
                 ...series.map((s, i) => ({ label: s.name, stroke: colours.series[i % 3], width: 2,
                                           points: { show: true, size: 5 }, value: (u, v) => fmt(v) }))],
        axes: [{ ...axis }, { ...axis, values: (u, vals) => vals.map(fmt), size: ySize }],
        scales: { x: { time: true, ...(range ? { range: () => range } : {}) } },
      },
    };
  });
}

/** Vertical bars, one per item: [{label, value}]; `name` is the series' name in the legend, `xName` the bars'. */
export async function barChart(container, items, label = "chart", name = "USD", xName = "") {
  await draw(container, label, items.length > 0, (uPlot, colours, axis) => {
    const labels = items.map((i) => String(i.label));
    const stride = Math.ceil(labels.length / 12);
    return {
      data: [labels.map((_, i) => i), items.map((i) => i.value)],
      options: {
        series: [{ label: xName, value: (u, v) => (v === null || v === undefined ? "—" : labels[Math.round(v)] ?? "") },
                 { label: name, stroke: colours.series[0], fill: colours.series[0], width: 1,
                   paths: uPlot.paths.bars({ size: [0.7, 80] }), points: { show: false }, value: (u, v) => fmt(v) }],
        axes: [{ ...axis, splits: () => labels.map((_, i) => i).filter((i) => i % stride === 0),
                 values: (u, vals) => vals.map((v) => (labels[v] ?? "").slice(0, 14)) },
               { ...axis, values: (u, vals) => vals.map(fmt), size: ySize }],
        scales: { x: { time: false, range: () => [-0.5, labels.length - 0.5] }, y: { range: (u, min, max) => [0, max > 0 ? max * 1.1 : 1] } },
      },
    };
  });
}
