
(function () {
"use strict";
const D = JSON.parse(document.getElementById("pf-data").textContent);
const OUT = D.outcomes, LANES = D.lanes, BARS = D.bars;
const LH = LANES.length > 400 ? Math.max(6, Math.floor(8000 / LANES.length)) : 20;
// the axis: a row of time ticks, and below it a row naming where each run began
const AX = D.runs.length > 1 ? 34 : 18, TICK_ROW = 0, RUN_ROW = 17;
const canvas = document.getElementById("tl-canvas"), ctx = canvas.getContext("2d");
const scroller = document.getElementById("scroller"), spacer = document.getElementById("spacer");
const labels = document.getElementById("labels"), markersEl = document.getElementById("markers");
const axisEl = document.getElementById("axis");
labels.style.paddingTop = AX + "px";
const tip = document.getElementById("tip");
let zoom = 1;

function fmt(ms) {
  if (ms < 10000) return (ms / 1000).toFixed(ms % 1000 ? 2 : 0) + " s";
  if (ms < 120000) return (ms / 1000).toFixed(0) + " s";
  if (ms < 7200000) return (ms / 60000).toFixed(1) + " min";
  return (ms / 3600000).toFixed(1) + " h";
}

// each outcome: its colour with a pattern on top, so colour is never the only cue
const STROKES = {
  slash: [[0, 8, 8, 0], [-2, 2, 2, -2], [6, 10, 10, 6]],
  backslash: [[0, 0, 8, 8], [6, -2, 10, 2], [-2, 6, 2, 10]],
  cross: [[0, 0, 8, 8], [8, 0, 0, 8]],
  horizontal: [[0, 4, 8, 4]],
  vertical: [[4, 0, 4, 8]],
  grid: [[0, 4, 8, 4], [4, 0, 4, 8]],
};
function pattern(o, c) {
  const p = document.createElement("canvas");
  p.width = 8; p.height = 8;
  const g = p.getContext("2d");
  g.fillStyle = o.colour; g.fillRect(0, 0, 8, 8);
  const dark = ["#000000", "#0072B2", "#7f7f7f"].indexOf(o.colour) >= 0;
  g.strokeStyle = g.fillStyle = dark ? "rgba(255,255,255,.9)" : "rgba(0,0,0,.55)";
  g.lineWidth = 1.5;
  g.beginPath();
  (STROKES[o.pattern] || []).forEach(function (l) { g.moveTo(l[0], l[1]); g.lineTo(l[2], l[3]); });
  if (o.pattern === "dots") { g.arc(4, 4, 1.6, 0, 7); g.fill(); }
  if (o.pattern === "hollow") { g.fillStyle = "#fff"; g.fillRect(1, 1, 6, 6); }
  g.stroke();
  return c.createPattern(p, "repeat");
}
const fills = OUT.map(function (o) { return pattern(o, ctx); });
document.querySelectorAll("canvas.swatch").forEach(function (s) {
  const g = s.getContext("2d");
  g.fillStyle = pattern(OUT[+s.dataset.outcome], g);
  g.fillRect(0, 0, s.width, s.height);
});

// lanes in the DOM (their labels), bars on the canvas
const byLane = LANES.map(function () { return []; });
BARS.forEach(function (b) { byLane[b[0]].push(b); });
const manyRuns = LANES.some(function (m) { return m.run !== LANES[0].run; });
LANES.forEach(function (l, i) {
  const d = document.createElement("div");
  d.className = "lane"; d.dataset.lane = i; d.dataset.worker = l.worker; d.dataset.host = l.host;
  d.style.setProperty("--lh", LH + "px");
  d.textContent = l.label + (manyRuns ? " (run " + l.run + ")" : "");
  d.title = d.textContent + (l.after ? " — " + l.after : "");
  if (l.after) {
    const s = document.createElement("span");
    s.className = "after"; s.textContent = " (" + l.after + ")";
    d.appendChild(s);
  }
  labels.appendChild(d);
});
if (!LANES.length) labels.textContent = "no attempt was started";

// an outcome's marker: an element its CSS draws (report.css .mk-*), never a glyph
const OUT_ID = {};
OUT.forEach(function (o) { OUT_ID[o.id] = o; });
function shape(kind) {
  const i = document.createElement("i");
  i.className = "mk mk-" + (OUT_ID[kind] ? OUT_ID[kind].shape : "dot");
  i.setAttribute("aria-hidden", "true");
  return i;
}

function width() { return Math.max(200, scroller.clientWidth); }
function x(ms) { return 4 + ms / D.span * (width() * zoom - 12); }

function layout() {
  spacer.style.width = (width() * zoom) + "px";
  spacer.style.height = (AX + LANES.length * LH) + "px";
  placeMarkers();
  document.getElementById("zlabel").textContent = "zoom " + zoom + "x";
  draw();
}

// Markers where a lane's attempt ended lost or timed out: the outcome's shape, then a
// label. Labels never overlap nor leave the timeline: per lane, markers whose shapes would
// touch become one (its tooltip lists them all); a label is cut with an ellipsis where the
// next marker (or the end of the timeline) begins, or drawn to the left of its shape when
// there is more room there; lanes too low for a label get the shape alone, scaled to fit.
// The whole label is always in the marker's tooltip.
const MK_HALF = 9, MK_GAP = 3, MK_JOIN = 2 * MK_HALF + 2 * MK_GAP;
function placeMarkers() {
  markersEl.textContent = "";
  const limit = width() * zoom, lanes = {};
  D.markers.slice().sort(function (a, b) { return a.t - b.t; }).forEach(function (m) {
    const at = x(m.t), row = lanes[m.lane] || (lanes[m.lane] = []), last = row[row.length - 1];
    if (last && at - last.at < MK_JOIN) last.all.push(m);
    else row.push({at: at, lane: m.lane, all: [m]});
  });
  const labelled = LH >= 17;
  Object.keys(lanes).forEach(function (lane) {
    let leftBound = 0;
    lanes[lane].forEach(function (c, i, row) {
      const m = c.all[0], e = document.createElement("div");
      e.className = "tl-marker " + m.kind + (labelled ? "" : " compact");
      e.dataset.lane = m.lane;
      e.title = c.all.map(function (n) { return n.label + (n.key ? " (task " + n.key + ")" : ""); })
        .join("\n");
      e.appendChild(shape(m.kind));
      if (!labelled) {
        const k = Math.min(1, (LH - 2) / 10);
        e.style.left = Math.max(0, c.at - 5) + "px";
        e.style.top = (AX + m.lane * LH + (LH - 10) / 2) + "px";
        e.style.transform = "scale(" + k + ")";
        markersEl.appendChild(e);
        return;
      }
      const t = document.createElement("span");
      t.className = "ml";
      t.textContent = m.label + (c.all.length > 1 ? " +" + (c.all.length - 1) + " more" : "");
      e.appendChild(t);
      e.style.top = (AX + m.lane * LH + (LH - 17) / 2) + "px";
      e.style.visibility = "hidden";
      markersEl.appendChild(e);
      const natural = Math.ceil(e.getBoundingClientRect().width) + 1;
      const next = row[i + 1];
      const rightBound = (next ? next.at - MK_HALF - MK_GAP : limit);
      const start = Math.max(leftBound, c.at - MK_HALF), end = Math.min(rightBound, c.at + MK_HALF);
      const roomRight = rightBound - start, roomLeft = end - leftBound;
      let box;
      if (natural <= roomRight || roomRight >= roomLeft) {
        e.classList.add("right");
        box = [start, start + Math.min(natural, roomRight)];
      } else {
        e.classList.add("left");  // the shape at the right end, the label before it
        box = [Math.max(leftBound, end - natural), end];
      }
      if (box[1] - box[0] < 2 * MK_HALF + 24) {  // no room for a label: the shape alone
        t.hidden = true;
        const s0 = Math.max(leftBound, Math.min(c.at - MK_HALF, rightBound - 2 * MK_HALF));
        box = [s0, Math.min(rightBound, s0 + 2 * MK_HALF)];
      }
      e.style.left = box[0] + "px";
      e.style.width = (box[1] - box[0]) + "px";
      e.style.visibility = "";
      leftBound = box[1] + MK_GAP;
    });
  });
}

// the axis's texts, as elements over the canvas for the window in view: a tick's time
// is left out where it would run past the window's edge or into the one before it, and
// runs starting closer than their names are wide share one name ("runs 2, 3")
function axisLabels(left, w) {
  axisEl.textContent = "";
  axisEl.style.height = AX + "px";
  return function (text, at, row, title) {
    const e = document.createElement("div");
    e.className = "axis-label"; e.textContent = text; e.style.left = at + "px";
    e.style.top = row + "px";
    if (title) e.title = title;
    axisEl.appendChild(e);
    return e;
  };
}

function draw() {
  const dpr = window.devicePixelRatio || 1, w = width(), h = AX + Math.max(1, LANES.length * LH);
  canvas.style.width = w + "px"; canvas.style.height = h + "px";
  canvas.width = w * dpr; canvas.height = h * dpr;
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const left = scroller.scrollLeft;
  // time axis: about one tick per 110 px, on a 1-2-5 scale
  const per = D.span / (width() * zoom - 12) * 110;
  const p10 = Math.pow(10, Math.floor(Math.log10(Math.max(per, 1))));
  const step = [1, 2, 5, 10].map(function (m) { return m * p10; })
    .find(function (s) { return s >= per; }) || per;
  ctx.fillStyle = "#5a5a5a"; ctx.font = "11px system-ui,sans-serif"; ctx.strokeStyle = "#ccc";
  const label = axisLabels(left, w);
  let tickEnd = -1e9;
  for (let t = Math.floor(left / (width() * zoom) * D.span / step) * step; t <= D.span; t += step) {
    const tx = x(t) - left;
    if (tx > w) break;
    if (tx < 0) continue;
    ctx.beginPath(); ctx.moveTo(tx + .5, AX - 5); ctx.lineTo(tx + .5, h); ctx.stroke();
    const e = label(fmt(t), left + tx + 3, TICK_ROW);
    const ew = e.getBoundingClientRect().width;
    if (tx + 3 + ew > w - 2 || left + tx + 3 < tickEnd) e.remove();
    else tickEnd = left + tx + 3 + ew + 6;
  }
  ctx.translate(0, AX);
  ctx.strokeStyle = "#eee";
  for (let i = 0; i <= LANES.length; i++) {
    ctx.beginPath(); ctx.moveTo(0, i * LH - .5); ctx.lineTo(w, i * LH - .5); ctx.stroke();
  }
  const named = [];
  D.runs.forEach(function (r) {
    const rx = x(r.t) - left;
    if (D.runs.length < 2 || rx < 0 || rx > w) return;
    ctx.strokeStyle = "#999"; ctx.setLineDash([3, 3]);
    ctx.beginPath(); ctx.moveTo(rx, RUN_ROW - AX); ctx.lineTo(rx, h); ctx.stroke();
    ctx.setLineDash([]);
    const prev = named[named.length - 1];
    if (prev && left + rx + 3 < prev.end + 6) {
      prev.ids.push(r.id);
      prev.e.textContent = "runs " + prev.ids.join(", ");
    } else {
      const e = label("run " + r.id, left + rx + 3, RUN_ROW);
      named.push({e: e, ids: [r.id], start: left + rx + 3, end: 0});
    }
    const n = named[named.length - 1];
    n.end = n.start + n.e.getBoundingClientRect().width;
  });
  named.forEach(function (n, i) {  // a name never runs past the next one nor the window
    const room = Math.min(i + 1 < named.length ? named[i + 1].start - 6 : 1e12, left + w - 2);
    n.e.style.maxWidth = Math.max(0, room - n.start) + "px";
    n.e.title = n.e.textContent;
  });
  for (let pass = 0; pass < 2; pass++) {  // failures are drawn over successes
    for (const b of BARS) {
      if ((pass === 0) !== (b[3] === 0)) continue;
      const x0 = x(b[1]) - left, x1 = x(b[2]) - left;
      if (x1 < 0 || x0 > w) continue;
      const bw = Math.max(1.5, x1 - x0), y = b[0] * LH + 2, bh = Math.max(2, LH - 4);
      ctx.fillStyle = fills[b[3]]; ctx.fillRect(x0, y, bw, bh);
      if (bw > 3 && LH >= 10) {
        ctx.strokeStyle = "rgba(0,0,0,.45)"; ctx.lineWidth = 1;
        ctx.strokeRect(x0 + .5, y + .5, bw - 1, bh - 1);
      }
    }
  }
}

function hit(ev) {
  const r = canvas.getBoundingClientRect();
  const px = ev.clientX - r.left + scroller.scrollLeft;
  const lane = Math.floor((ev.clientY - r.top - AX) / LH);
  if (lane < 0 || lane >= LANES.length) return null;
  let best = null;
  for (const b of byLane[lane]) {
    const x0 = x(b[1]), x1 = Math.max(x(b[2]), x0 + 3);
    if (px >= x0 - 1 && px <= x1 + 1) { best = b; if (b[3] !== 0) break; }
  }
  return best;
}
canvas.addEventListener("mousemove", function (ev) {
  const b = hit(ev);
  if (!b) { tip.hidden = true; canvas.style.cursor = ""; return; }
  const o = OUT[b[3]];
  tip.hidden = false;
  tip.textContent = D.keys[b[4]] + "\nattempt " + b[5] + " on " + LANES[b[0]].label + "\n" +
    o.label + ", " + fmt(b[2] - b[1]) +
    (b[6] === 2 ? (o.id === "retried" ? "\nthe task asked to be tried again, and was"
      : "\nthe task was tried again") : b[6] === 1 ? "\nthe task failed with it" : "");
  // beside the pointer, but never past the window's edge
  const tw = tip.offsetWidth, th = tip.offsetHeight;
  const vw = document.documentElement.clientWidth, vh = document.documentElement.clientHeight;
  tip.style.left = Math.max(0, Math.min(ev.clientX + 12, vw - tw - 4)) + "px";
  tip.style.top = (ev.clientY + 12 + th > vh ? Math.max(0, ev.clientY - th - 8) : ev.clientY + 12) + "px";
  canvas.style.cursor = (b[4] in D.rows) ? "pointer" : "";
});
canvas.addEventListener("mouseleave", function () { tip.hidden = true; });
canvas.addEventListener("click", function (ev) {
  const b = hit(ev);
  if (b && (b[4] in D.rows)) openRow(D.rows[b[4]]);
});
function openRow(i) {
  const d = document.getElementById("f" + i);
  if (!d) return;
  clearGroup(); d.open = true; d.scrollIntoView({block: "center"});
}
function setZoom(z, anchorPx) {
  const old = zoom;
  zoom = Math.min(4096, Math.max(1, z));
  const a = anchorPx === undefined ? scroller.clientWidth / 2 : anchorPx;
  const t = (scroller.scrollLeft + a) / old;
  layout(); scroller.scrollLeft = t * zoom - a; draw();
}
document.getElementById("zin").onclick = function () { setZoom(zoom * 2); };
document.getElementById("zout").onclick = function () { setZoom(zoom / 2); };
document.getElementById("zfit").onclick = function () { setZoom(1); };
scroller.addEventListener("wheel", function (ev) {
  if (!ev.ctrlKey) return;
  ev.preventDefault();
  const a = ev.clientX - scroller.getBoundingClientRect().left;
  setZoom(ev.deltaY < 0 ? zoom * 1.5 : zoom / 1.5, a);
}, {passive: false});
scroller.addEventListener("scroll", draw);
// the scroller narrows when a page scrollbar appears (a row opened), not only on resize
let lastWidth = 0;
new ResizeObserver(function () {
  if (scroller.clientWidth !== lastWidth) { lastWidth = scroller.clientWidth; layout(); }
}).observe(scroller);

// failed-task rows: filter by text, or by digest group
const rows = Array.from(document.querySelectorAll("details.failure"));
const filter = document.getElementById("filter"), showall = document.getElementById("showall");
let group = null;
function apply() {
  const q = filter.value.toLowerCase();
  rows.forEach(function (r) {
    const t = r.querySelector("summary").textContent.toLowerCase();
    const out = (group !== null && r.dataset.group !== group) || (q && t.indexOf(q) < 0);
    r.classList.toggle("hidden", !!out);
  });
  // a heading stays only while a row under it is shown
  let head = null, section = null;
  const shown = new Set();
  document.querySelectorAll(".ftable > .fsection, .ftable > .dep-head, details.failure")
    .forEach(function (e) {
      if (e.classList.contains("fsection")) { section = e; head = null; return; }
      if (e.classList.contains("dep-head")) { head = e; return; }
      if (e.classList.contains("hidden")) return;
      if (head && e.dataset.root === head.dataset.root) shown.add(head);
      if (section) shown.add(section);
    });
  document.querySelectorAll(".ftable > .fsection, .ftable > .dep-head").forEach(function (e) {
    e.classList.toggle("hidden", !shown.has(e));
  });
  showall.hidden = group === null;
}
function clearGroup() { group = null; filter.value = ""; apply(); }
filter.addEventListener("input", apply);
showall.addEventListener("click", clearGroup);
document.querySelectorAll("button.gfilter").forEach(function (b) {
  b.addEventListener("click", function () {
    group = b.dataset.group; apply();
    document.getElementById("failures").scrollIntoView();
  });
});
layout();
})();
