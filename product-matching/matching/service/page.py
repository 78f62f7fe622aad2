"""The web page at `/`: upload an image, see its matches with their scores.

One self-contained document (inline CSS and JS, nothing fetched from elsewhere), kept in a
Python string so it installs with the package. Every value from the server is put on the page
with `textContent`, never as HTML, so a posting title cannot inject markup.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Product matching</title>
<style>
  body { font: 15px/1.4 system-ui, sans-serif; margin: 0; color: #1d1d1f; background: #f6f6f4; }
  header { padding: 14px 24px; background: #fff; border-bottom: 1px solid #ddd; }
  h1 { font-size: 20px; margin: 0 0 4px; }
  #status { color: #666; font-size: 13px; }
  main { padding: 16px 24px; }
  form { display: flex; gap: 12px; align-items: center; flex-wrap: wrap; margin-bottom: 16px; }
  input[type=number] { width: 4em; }
  button { padding: 6px 16px; font: inherit; cursor: pointer; }
  #error { color: #b00020; white-space: pre-wrap; margin-bottom: 12px; }
  .query { display: flex; gap: 20px; background: #fff; border: 1px solid #ddd;
           border-radius: 8px; padding: 14px; margin-bottom: 16px; }
  .query > figure { margin: 0; flex: none; width: 168px; }
  .query h2 { font-size: 15px; margin: 0 0 6px; word-break: break-all; }
  .summary { color: #555; font-size: 13px; margin: 0 0 10px; }
  .grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(136px, 1fr));
          gap: 10px; flex: 1; }
  .card { border: 2px solid #e3e3e3; border-radius: 6px; padding: 6px; font-size: 12px;
          background: #fafafa; opacity: .7; }
  .card.match { border-color: #1a7f37; background: #effaf1; opacity: 1; }
  img { width: 100%; aspect-ratio: 1; object-fit: cover; image-rendering: pixelated;
        border-radius: 4px; background: #eee; display: block; }
  .score { font-weight: 600; font-size: 14px; }
  .badge { float: right; color: #fff; background: #1a7f37; border-radius: 3px;
           padding: 0 5px; font-size: 11px; }
  .id { font-family: ui-monospace, monospace; word-break: break-all; }
  .muted { color: #666; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
</style>
</head>
<body>
<header>
  <h1>Product matching</h1>
  <div id="status">loading...</div>
</header>
<main>
  <form id="form">
    <input id="files" name="files" type="file" accept="image/*" multiple required>
    <label>neighbours <input id="top_k" type="number" min="1" value="10"></label>
    <button id="submit" type="submit">Find matches</button>
  </form>
  <div id="error" role="alert"></div>
  <div id="results"></div>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const num = (x) => String(Number(x.toFixed(4)));  // 0.5700000000000001 -> "0.57"

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

async function loadHealth() {
  try {
    const h = await (await fetch("/health")).json();
    const min2 = h.min2 === null ? "" : ` (min2 ${num(h.min2)})`;
    $("status").textContent = `${h.model} | ${h.gallery_size} postings | ` +
      `threshold ${num(h.threshold)}${min2}`;
    $("top_k").value = h.top_k;
    $("top_k").max = h.max_top_k;
  } catch (err) {
    $("status").textContent = "service unreachable: " + err.message;
  }
}

function card(posting, isMatch) {
  const c = el("div", isMatch ? "card match" : "card");
  c.dataset.postingId = posting.posting_id;
  c.dataset.labelGroup = posting.label_group ?? "";
  const img = el("img");
  img.src = posting.image_url;
  img.alt = posting.posting_id;
  img.loading = "lazy";
  c.append(img);
  const score = el("div", "score", posting.similarity.toFixed(3));
  if (isMatch) score.append(el("span", "badge", "match"));
  c.append(score, el("div", "id", posting.posting_id));
  c.append(el("div", "muted", "group " + (posting.label_group ?? "-")));
  if (posting.title) {
    const t = el("div", "muted", posting.title);
    t.title = posting.title;
    c.append(t);
  }
  return c;
}

function render(data, files) {
  const out = $("results");
  data.results.forEach((res, i) => {
    const box = el("section", "query");
    const fig = el("figure");
    const img = el("img");
    img.src = URL.createObjectURL(files[i]);
    img.alt = "query";
    fig.append(img, el("figcaption", "muted", files[i].name));
    const body = el("div");
    body.style.flex = "1";
    body.append(el("h2", null, res.file));
    const min2 = data.min2 === null ? "" : `, min2 ${num(data.min2)}`;
    body.append(el("p", "summary", `${res.matches.length} match(es) at threshold ` +
      `${num(data.threshold)}${min2}; ${res.neighbours.length} nearest of ` +
      `${data.gallery_size} postings`));
    // Matches first (they may go past top_k), then the other neighbours, best first.
    const matched = new Set(res.matches.map((m) => m.posting_id));
    const others = res.neighbours.filter((n) => !matched.has(n.posting_id));
    const grid = el("div", "grid");
    res.matches.forEach((m) => grid.append(card(m, true)));
    others.forEach((n) => grid.append(card(n, false)));
    body.append(grid);
    box.append(fig, body);
    out.append(box);
  });
}

$("form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const files = Array.from($("files").files);
  $("error").textContent = "";
  $("results").replaceChildren();
  $("results").dataset.state = "busy";
  if (!files.length) { $("error").textContent = "Choose an image first."; return; }
  const body = new FormData();
  files.forEach((f) => body.append("files", f));
  $("submit").disabled = true;
  try {
    const k = encodeURIComponent($("top_k").value || "10");
    const response = await fetch(`/match?top_k=${k}`, { method: "POST", body });
    const text = await response.text();
    let data;
    try { data = JSON.parse(text); } catch { data = { detail: text }; }
    if (!response.ok) {
      const detail = typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail);
      throw new Error(`${response.status}: ${detail}`);
    }
    render(data, files);
    $("results").dataset.state = "done";
  } catch (err) {
    $("error").textContent = err.message;
    $("results").dataset.state = "error";
  } finally {
    $("submit").disabled = false;
  }
});

loadHealth();
</script>
</body>
</html>
"""
