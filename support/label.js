// The script of label.py's page (label.html). It is a file of its own, as the server's policy runs no
// inline script, and every name (a class, an image, a file's text) goes into the page as text, never HTML.

// state: what the server sent, the image shown, the chosen class, the view (zoom and pan, in CSS pixels)
let S = null, cur = 0, cls = 0, view = {zoom: 1, panX: 0, panY: 0}, showMap = false;
let picture = new Image(), overlay = null, suggestions = [];
let k = 0;  // blind mode: the sample point shown, its place in the sample's order
// the key to write with: from the address label.py printed (after #, so never sent to a server)
const TOKEN = new URLSearchParams(location.hash.slice(1)).get("token") || "";
const canvas = document.getElementById("canvas"), ctx = canvas.getContext("2d");
const RADIUS = 6;  // a click within this many CSS pixels of a point or a stroke removes it
const DRAG = 4;  // a press that moves more CSS pixels than this is a drag (a stroke, a pan), not a click
const STEP = 2;  // a stroke keeps a vertex every STEP full-image pixels or more
let box = {width: 0, height: 0};  // the canvas's size in CSS pixels, as fit() sets it: never read per point

// screen -> full-image pixel: the image fills the canvas box, then zoom and pan move it
function toImage(clientX, clientY) {
  const r = canvas.getBoundingClientRect(), im = S.images[cur];
  const cx = (clientX - r.left - view.panX) / view.zoom, cy = (clientY - r.top - view.panY) / view.zoom;
  return {x: Math.floor(cx * im.width / r.width), y: Math.floor(cy * im.height / r.height)};
}

// full-image pixel -> where its centre is, in CSS pixels of the canvas
function toCanvas(x, y) {
  const im = S.images[cur];
  return {x: (x + 0.5) * box.width / im.width * view.zoom + view.panX,
          y: (y + 0.5) * box.height / im.height * view.zoom + view.panY};
}

// the point of `points` nearest to a screen position, if within RADIUS CSS pixels, else null
function nearest(points, clientX, clientY) {
  const r = canvas.getBoundingClientRect();
  let best = null, bestD = RADIUS;
  for (const p of points) {
    const c = toCanvas(p.x, p.y), d = Math.hypot(c.x - (clientX - r.left), c.y - (clientY - r.top));
    if (d <= bestD) { best = p; bestD = d; }
  }
  return best;
}

// the stroke of `strokes` nearest to a screen position, if within RADIUS CSS pixels of a segment, else null
function nearestStroke(strokes, clientX, clientY) {
  const r = canvas.getBoundingClientRect(), px = clientX - r.left, py = clientY - r.top;
  let best = null, bestD = RADIUS;
  for (const s of strokes) {
    const c = s.points.map(p => toCanvas(p[0], p[1]));
    for (let i = 0; i < c.length; i++) {  // each segment a to b (one vertex: a point)
      const a = c[i], b = c[Math.min(i + 1, c.length - 1)], dx = b.x - a.x, dy = b.y - a.y;
      const along = dx || dy ? ((px - a.x) * dx + (py - a.y) * dy) / (dx * dx + dy * dy) : 0;
      const t = Math.max(0, Math.min(1, along));  // the nearest place on the segment
      const d = Math.hypot(a.x + t * dx - px, a.y + t * dy - py);
      if (d <= bestD) { best = s; bestD = d; }
    }
  }
  return best;
}

const here = () => S.clicks.filter(c => c.image === S.images[cur].name);
const hereStrokes = () => S.strokes.filter(s => s.image === S.images[cur].name);
const samples = () => [...S.clicks].sort((a, b) => a.sample - b.sample);  // blind mode: in their order

function ring(p, radius, styles) {  // a circle around point p: [colour, line width, dash] drawn in turn
  const c = toCanvas(p.x, p.y);
  for (const [style, width, dash] of styles) {
    ctx.setLineDash(dash); ctx.strokeStyle = style; ctx.lineWidth = width;
    ctx.beginPath(); ctx.arc(c.x, c.y, radius, 0, 2 * Math.PI); ctx.stroke();
  }
  ctx.setLineDash([]);
}

function line(points, colour) {  // a stroke: its class colour on a white edge, like the points
  const c = points.map(p => toCanvas(p[0], p[1]));
  ctx.lineCap = ctx.lineJoin = "round";
  for (const [style, width] of [["#fff", 6], [colour, 3]]) {
    ctx.strokeStyle = style; ctx.lineWidth = width; ctx.beginPath(); ctx.moveTo(c[0].x, c[0].y);
    for (const q of c.length > 1 ? c.slice(1) : [{x: c[0].x + 0.01, y: c[0].y}]) ctx.lineTo(q.x, q.y);
    ctx.stroke();
  }
}

// a point: a dot of its class colour on a white edge, drawn once per colour and then copied to whole
// pixels: 25,000 points on one image, drawn one by one, take a headless browser 0.7 s; copied, 0.1 s
const dots = {};
function dot(colour) {
  if (!dots[colour]) {
    const d = dots[colour] = document.createElement("canvas"), g = d.getContext("2d");
    const dpr = window.devicePixelRatio || 1;
    d.width = d.height = Math.ceil(12 * dpr);
    g.scale(dpr, dpr);
    g.fillStyle = colour; g.strokeStyle = "#fff"; g.lineWidth = 1.5;
    g.beginPath(); g.arc(6, 6, 4, 0, 2 * Math.PI); g.fill(); g.stroke();
  }
  return dots[colour];
}

function draw() {
  const dpr = window.devicePixelRatio || 1, w = canvas.width / dpr, h = canvas.height / dpr;
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  ctx.setTransform(dpr * view.zoom, 0, 0, dpr * view.zoom, dpr * view.panX, dpr * view.panY);
  ctx.drawImage(picture, 0, 0, w, h);
  if (showMap && overlay) { ctx.globalAlpha = 0.45; ctx.drawImage(overlay, 0, 0, w, h); ctx.globalAlpha = 1; }
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  const colour = Object.fromEntries(S.classes.map(c => [c.name, c.colour]));
  // where the model is least sure: a dashed white ring on a dark one
  for (const s of suggestions) ring(s, RADIUS + 6, [["#000", 4, []], ["#fff", 2, [4, 3]]]);
  const points = here(), strokes = hereStrokes();
  for (const s of strokes) line(s.points, colour[s.class]);
  // the stroke being drawn
  if (down && down.path && down.moved) line(down.path.map(p => [p.x, p.y]), S.classes[cls].colour);
  for (const p of points) {
    if (!p.class) { ring(p, 4, [["#000", 3, []], ["#fff", 1.5, []]]); continue; }  // a row to fill in
    const c = toCanvas(p.x, p.y);
    ctx.drawImage(dot(colour[p.class]), Math.round(c.x) - 6, Math.round(c.y) - 6, 12, 12);
  }
  if (S.blind && samples()[k].image === S.images[cur].name) ring(samples()[k], RADIUS + 8,
                                                                   [["#000", 5, []], ["#ff0", 3, []]]);
  // how many points and strokes of each class, on this image and in all: one pass over each list
  const tally = list => list.reduce((n, p) => { n[p.class] = (n[p.class] || 0) + 1; return n; }, {});
  const [p1, pAll, s1, sAll] = [points, S.clicks, strokes, S.strokes].map(tally);
  const lines = name => sAll[name] ? `, ${s1[name] || 0} / ${sAll[name]} strokes` : "";
  const counts = name => `${p1[name] || 0} / ${pAll[name] || 0}${lines(name)}`;
  [...document.getElementById("classes").children].forEach((item, i) => {
    item.classList.toggle("on", i === cls);
    item.lastChild.textContent = `${i + 1} ${S.classes[i].name} (${counts(S.classes[i].name)})`;
  });
  const im = S.images[cur], done = S.clicks.filter(p => p.class).length;
  document.getElementById("title").textContent = S.blind ?
    `point ${k + 1}: ${done} of ${S.clicks.length} labelled · ${im.name}` :
    `${cur + 1}/${S.images.length} ${im.name} (${im.width}x${im.height})`;
}

// the classes in the header, built once: a swatch and a text each (draw() writes the counts); a click
// chooses the class
function legend() {
  document.getElementById("classes").replaceChildren(...S.classes.map((c, i) => {
    const item = document.createElement("span"), swatch = document.createElement("span");
    item.className = "class";
    swatch.className = "swatch";
    swatch.style.background = c.colour;
    item.append(swatch, document.createTextNode(""));
    item.addEventListener("click", () => { cls = i; draw(); });
    return item;
  }));
}

// the canvas box has the image's shape and fills the window below the header
function fit() {
  draw();  // the header first: the canvas gets the room below it
  const im = S.images[cur], dpr = window.devicePixelRatio || 1;
  const room = {w: window.innerWidth - 20, h: window.innerHeight - canvas.offsetTop - 10};
  const scale = Math.min(room.w / im.width, room.h / im.height);
  box = {width: Math.floor(im.width * scale), height: Math.floor(im.height * scale)};
  canvas.style.width = `${box.width}px`;
  canvas.style.height = `${box.height}px`;
  canvas.width = Math.floor(im.width * scale * dpr);
  canvas.height = Math.floor(im.height * scale * dpr);
  if (S.blind) centre(); else draw();
}

// blind mode: sample point i (in the sample's order), centred and zoomed in
function visit(i) {
  k = (i + S.clicks.length) % S.clicks.length;
  const image = S.images.findIndex(im => im.name === samples()[k].image);
  if (image !== cur || !picture.naturalWidth) show(image); else centre();  // load it, then centre
}

// the current sample point in the middle of the canvas, about 100 image pixels across
function centre() {
  const p = samples()[k], im = S.images[cur], r = canvas.getBoundingClientRect();
  view.zoom = Math.max(1, Math.min(im.width, im.height) / 100);
  view.panX = r.width / 2 - (p.x + 0.5) * r.width / im.width * view.zoom;
  view.panY = r.height / 2 - (p.y + 0.5) * r.height / im.height * view.zoom;
  draw();
}

// blind mode: the current point takes class i; then on to the next point without a class
async function label(i) {
  const p = samples()[k];
  if (!await change({image: p.image, x: p.x, y: p.y, class: S.classes[i].name})) return;
  const list = samples(), next = list.findIndex((q, j) => j > k && !q.class);
  const left = next >= 0 ? next : list.findIndex(q => !q.class);
  if (left >= 0) visit(left);
  else { draw(); document.getElementById("status").textContent = `all ${list.length} points labelled`; }
}

function show(i) {
  cur = (i + S.images.length) % S.images.length;
  view = {zoom: 1, panX: 0, panY: 0}; overlay = null; suggestions = [];
  down = null;  // a stroke being drawn ends with its image
  picture = new Image();
  picture.onload = fit;
  picture.onerror = () => fetch(picture.src).then(r => {  // the server's reason: an image it cannot read
    const status = document.getElementById("status");
    if (!r.ok) status.textContent = `image ${cur + 1}: ${r.status} ${r.statusText}`;
  });
  picture.src = `/image/${cur}`;
  if (S.model) {
    const o = new Image(), asked = cur;
    o.onload = () => { if (asked === cur) { overlay = o; draw(); } };
    o.src = `/map/${cur}`;
    fetch(`/suggestions/${cur}`).then(r => r.json())
      .then(s => { if (asked === cur) { suggestions = s; draw(); } });
  }
}

// send one change -> whether the file holds it; the status line says which
async function change(body) {
  const status = document.getElementById("status");
  let r;
  try {
    r = await fetch("/change", {method: "POST", body: JSON.stringify({...body, version: S.version}),
                                headers: {"Content-Type": "application/json", "X-Token": TOKEN}});
  } catch (e) { status.textContent = `not saved: the server does not answer (${e.message})`; return false; }
  if (!r.ok) { status.textContent = `not saved: ${r.status} ${r.statusText}`; return false; }
  // what changed, as the file now holds it; or all of it, when another tab or program changed it since
  const saved = await r.json(), there = c => c.image === body.image && c.x === body.x && c.y === body.y;
  if (saved.state) S = saved.state;
  else {
    if ("x" in body) S.clicks = S.clicks.filter(c => !there(c)).concat(saved.clicks);  // at that pixel
    else S.strokes = S.strokes.filter(s => s.stroke !== body.stroke).concat(saved.strokes);  // added, removed
    S.version = saved.version;
  }
  status.textContent = `saved ${S.clicks.filter(c => c.class).length} clicks, ${S.strokes.length} strokes`;
  draw();
  return true;
}

// a press on the canvas: a click (points), a drag that draws a stroke, or one that pans (shift or right
// button; in blind mode every drag). Pointer events: a mouse, a pen or a finger alike.
let down = null;
canvas.addEventListener("pointerdown", e => {
  if (!S || (e.button !== 0 && e.button !== 2)) return;
  canvas.setPointerCapture(e.pointerId);  // the moves outside the canvas, and the release, come here too
  const at = toImage(e.clientX, e.clientY), pan = S.blind || e.shiftKey || e.button === 2 || !onImage(at);
  down = {x: e.clientX, y: e.clientY, moved: false, button: e.button, path: pan ? null : [at], ended: false};
});
canvas.addEventListener("pointermove", e => {
  if (!down || !down.moved && Math.hypot(e.clientX - down.x, e.clientY - down.y) <= DRAG) return;
  down.moved = true;
  if (!down.path) {  // a pan
    view.panX += e.clientX - down.x; view.panY += e.clientY - down.y;
    down.x = e.clientX; down.y = e.clientY;
  } else extend(down, e.clientX, e.clientY);
  draw();
});
// a stroke goes on as the pointer moves, a vertex each STEP image pixels, and the release's own pixel
// last; it ends where the pointer leaves the canvas or the image (never a line along the edge), or at
// the most vertices the server takes
function extend(d, clientX, clientY, release) {
  const p = toImage(clientX, clientY), r = canvas.getBoundingClientRect();
  const seen = clientX >= r.left && clientX < r.right && clientY >= r.top && clientY < r.bottom;
  if (!seen || !onImage(p) || d.path.length >= S.vertices) d.ended = true;
  if (d.ended) return;
  const last = d.path[d.path.length - 1], far = Math.hypot(p.x - last.x, p.y - last.y);
  if (far >= STEP || release && far > 0) d.path.push(p);
}
const onImage = p => p.x >= 0 && p.y >= 0 && p.x < S.images[cur].width && p.y < S.images[cur].height;

canvas.addEventListener("pointerup", e => {
  const d = down;
  down = null;
  if (!d) return;
  const image = S.images[cur].name;
  if (d.path && d.moved) {
    extend(d, e.clientX, e.clientY, true);
    change({image, stroke: d.path.map(p => [p.x, p.y]), class: S.classes[cls].name});
  } else if (!d.moved && d.button === 0 && !S.blind) {  // blind mode: a click adds nothing (the sample stays)
    const hit = nearest(here(), e.clientX, e.clientY);
    const stroke = hit ? null : nearestStroke(hereStrokes(), e.clientX, e.clientY);
    if (hit && hit.class) change({image, x: hit.x, y: hit.y});
    else if (stroke) change({image, stroke: stroke.stroke});
    else change({image, ...(hit || toImage(e.clientX, e.clientY)), class: S.classes[cls].name});
  }
  if (d.moved) draw();  // the stroke being drawn goes (a click changes nothing here: change() draws)
});
canvas.addEventListener("pointercancel", () => { down = null; draw(); });
canvas.addEventListener("contextmenu", e => e.preventDefault());  // the right button pans
canvas.addEventListener("wheel", e => {  // zoom about the cursor
  e.preventDefault();
  const r = canvas.getBoundingClientRect(), f = e.deltaY < 0 ? 1.25 : 0.8;
  const cx = e.clientX - r.left, cy = e.clientY - r.top;
  view.panX = cx - (cx - view.panX) * f; view.panY = cy - (cy - view.panY) * f; view.zoom *= f; draw();
}, {passive: false});
window.addEventListener("keydown", e => {
  if (!S) return;
  const digit = e.key >= "1" && e.key <= "9" && +e.key <= S.classes.length;
  if (S.blind) {  // no map key: the person must not see what the map says
    if (digit) { cls = +e.key - 1; label(cls); }
    else if (e.key === "n" || e.key === "ArrowRight") visit(k + 1);
    else if (e.key === "p" || e.key === "ArrowLeft") visit(k - 1);
    else if (e.key === "0") centre();
    return;
  }
  if (digit) cls = +e.key - 1;
  else if (e.key === "n" || e.key === "ArrowRight") return show(cur + 1);
  else if (e.key === "p" || e.key === "ArrowLeft") return show(cur - 1);
  else if (e.key === "m") showMap = !showMap;
  else if (e.key === "0") view = {zoom: 1, panX: 0, panY: 0};
  draw();
});
window.addEventListener("resize", () => S && fit());
fetch("/state").then(r => r.json()).then(state => {
  S = state;
  legend();
  if (!S.blind) return show(0);
  document.getElementById("help").textContent = "blind mode (an accuracy sample): 1-9 labels the ringed " +
    "point and moves on · n / p: next / previous point · no map, and a click adds nothing: the sample must " +
    "stay a probability sample · drag pans, wheel zooms, 0 recentres";
  visit(Math.max(0, samples().findIndex(q => !q.class)));
});
