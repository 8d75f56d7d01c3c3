// mmrag's search page: plain JavaScript against the /v1 API, no build step.
// Sources come first: a retrieval-only Ask (generate: false) and the full Ask start
// together; the thumbnails show as soon as the first answers, the cited answer when the
// second does. Every text from the server is set with textContent, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "mmrag.key";
const INLINE_IMAGE_BYTES = 256 * 1024;
const blobs = new Map(); // preview path -> object URL (the key is a header, so no <img src>)
let queryImage = ""; // base64 JPEG of the query image, or ""
let askSeq = 0;
const BLANK = "data:image/gif;base64,R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7";

function key() {
  return sessionStorage.getItem(KEY_STORE) || "";
}

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {}, { Authorization: "Bearer " + key() });
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try {
      message = (await response.json()).error || message;
    } catch (_) { /* not JSON */ }
    const error = new Error(message);
    error.status = response.status;
    throw error;
  }
  return response;
}

async function postJson(path, body) {
  const response = await api(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  return response.json();
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

function setLink(anchor, href) {
  anchor.hidden = !href;
  if (href) anchor.href = href;
}

// -- the key ---------------------------------------------------------------------------------
async function useKey(value) {
  if (value) sessionStorage.setItem(KEY_STORE, value.trim());
  if (!key()) {
    $("who").textContent = "no key yet";
    return;
  }
  try {
    const me = await (await api("/v1/me")).json();
    $("who").textContent = "tenant " + me.tenant + " (" + me.role + ")";
    setLink($("ui-link"), me.web_ui);
    showError("");
  } catch (e) {
    $("who").textContent = "";
    showError(e.message);
  }
}

// A key in the link's fragment (the demo prints one) is taken, then removed from the URL.
function keyFromLink() {
  const fromLink = new URLSearchParams(location.hash.slice(1)).get("key");
  if (!fromLink) return false;
  sessionStorage.setItem(KEY_STORE, fromLink);
  history.replaceState(null, "", location.pathname);
  return true;
}

// -- where a source points -------------------------------------------------------------------
function where(chunk) {
  if (chunk === "image") return "image";
  let m = /^frame:(\d+(?:\.\d+)?)$/.exec(chunk);
  if (m) {
    const t = Math.floor(parseFloat(m[1]));
    return "video at " + String(Math.floor(t / 60)).padStart(2, "0") + ":" +
      String(t % 60).padStart(2, "0");
  }
  // page:N (the page), page:N:text, page:N:p:K / page:N:passage:K (its K-th passage)
  m = /^page:(\d+)(?::([a-z]+)(?::(\d+))?)?$/.exec(chunk);
  if (m) {
    if (m[3]) return "page " + m[1] + ", passage " + m[3];
    return m[2] ? "page " + m[1] + ", text" : "page " + m[1];
  }
  return chunk;
}

function fileName(display) {
  const parts = String(display || "").split("/");
  return parts[parts.length - 1] || display;
}

async function loadPreview(img, path) {
  try {
    if (!blobs.has(path)) {
      const blob = await (await api(path + "&size=256")).blob();
      blobs.set(path, URL.createObjectURL(blob));
    }
    img.src = blobs.get(path);
    img.classList.remove("loading");
  } catch (e) {
    img.replaceWith(Object.assign(document.createElement("span"), {
      className: "nopreview", textContent: "no preview: " + e.message,
    }));
  }
}

function renderSources(sources) {
  const list = $("results");
  list.replaceChildren();
  $("no-results").textContent = sources.length ? "" : "Nothing matched.";
  for (const s of sources) {
    const item = document.createElement("li");
    item.className = "card";
    item.id = "src-" + s.id;
    item.tabIndex = -1;
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    const place = where(s.chunk);
    img.alt = s.id + ": " + place + " of " + fileName(s.display) + (s.snippet ? " — " + s.snippet.slice(0, 120) : "");
    img.width = 160;
    img.height = 160;
    img.className = "loading"; // a blank placeholder (no alt text, no broken icon) until loaded
    img.src = BLANK;
    figure.appendChild(img);
    const caption = document.createElement("figcaption");
    const parts = [
      ["sid", s.id],
      ["score", "score " + s.score.toFixed(3)],
      ["where", place],
      ["name", fileName(s.display)],
    ];
    for (const [cls, text] of parts) {
      const span = document.createElement("span");
      span.className = cls;
      span.textContent = text;
      if (cls === "name") span.title = s.display;
      caption.appendChild(span);
    }
    figure.appendChild(caption);
    item.appendChild(figure);
    list.appendChild(item);
    loadPreview(img, s.preview);
  }
}

function highlight(id) {
  for (const el of document.querySelectorAll(".card.cited")) el.classList.remove("cited");
  const card = $("src-" + id);
  if (!card) return;
  card.classList.add("cited");
  card.scrollIntoView({ block: "nearest", behavior: "smooth" });
}

function renderAnswer(result) {
  $("answer-box").hidden = false;
  const state = $("answer-state");
  const kind = result.answer_kind || "";
  state.className = "state " + (result.degraded ? "degraded " : "") + kind;
  const words = {
    generated: "Generated answer",
    extractive: "Extractive answer (no LLM): quoted from the sources",
    refused: "Refused: the answer did not stand up to its sources",
    none: "No answer",
  };
  state.textContent = result.degraded
    ? "Degraded answer: " + (result.degraded_reason || "a step fell back") +
      "; the sources below are still the search's"
    : words[kind] || kind;
  const answer = $("answer");
  answer.replaceChildren();
  const known = new Set(result.sources.map((s) => s.id));
  for (const piece of String(result.answer || "").split(/(\[S\d+\])/)) {
    const m = /^\[(S\d+)\]$/.exec(piece);
    if (m && known.has(m[1])) {
      const cite = document.createElement("button");
      cite.type = "button";
      cite.className = "cite";
      cite.textContent = "[" + m[1] + "]";
      cite.setAttribute("aria-label", "source " + m[1]);
      cite.addEventListener("click", () => highlight(m[1]));
      cite.addEventListener("focus", () => highlight(m[1]));
      answer.appendChild(cite);
    } else {
      answer.appendChild(document.createTextNode(piece));
    }
  }
  setLink($("ask-run"), result.web_ui);
}

// -- search ----------------------------------------------------------------------------------
function filters() {
  const f = { media_types: [], tags: {}, created_after: 0, created_before: 0 };
  if ($("f-type").value) f.media_types.push($("f-type").value);
  for (const pair of $("f-tags").value.split(",")) {
    const [k, ...v] = pair.split("=");
    if (k.trim() && v.length) f.tags[k.trim()] = v.join("=").trim();
  }
  if ($("f-from").value) f.created_after = Date.parse($("f-from").value) / 1000;
  if ($("f-to").value) f.created_before = Date.parse($("f-to").value) / 1000 + 86400;
  return f;
}

async function search(event) {
  event.preventDefault();
  showError("");
  const text = $("q").value.trim();
  if (!text && !queryImage) {
    showError("Type a question or choose an image.");
    return;
  }
  const seq = ++askSeq;
  const body = {
    text,
    image_base64: queryImage,
    top_k: Math.max(1, Math.min(50, parseInt($("f-k").value, 10) || 8)),
    filters: filters(),
  };
  const generate = $("f-generate").checked;
  const t0 = performance.now();
  const timing = { sources: 0, answer: 0 };
  const say = () => {
    const parts = [];
    if (timing.sources) parts.push("sources in " + timing.sources + " ms");
    if (timing.answer) parts.push("answer in " + timing.answer + " ms");
    $("timing").textContent = parts.join(" · ") || "searching…";
    $("timing").dataset.sourcesMs = timing.sources;
    $("timing").dataset.answerMs = timing.answer;
  };
  say();
  $("answer-box").hidden = true;
  // The button stays enabled: a new search replaces the one in flight (askSeq), and a
  // disabled submit button would make Enter in the search box do nothing.
  $("results").setAttribute("aria-busy", "true");
  let shown = false;
  const sourcesFirst = postJson("/v1/ask", Object.assign({}, body, { generate: false }))
    .then((r) => {
      if (seq !== askSeq || shown) return;
      shown = true;
      timing.sources = Math.round(performance.now() - t0);
      renderSources(r.sources);
      if (!generate) renderAnswer(r);
      say();
    });
  const full = generate
    ? postJson("/v1/ask", Object.assign({}, body, { generate: true })).then((r) => {
      if (seq !== askSeq) return;
      timing.answer = Math.round(performance.now() - t0);
      if (!shown) timing.sources = timing.answer;
      shown = true;
      renderSources(r.sources);
      renderAnswer(r);
      say();
    })
    : Promise.resolve();
  try {
    await Promise.all([sourcesFirst, full]);
  } catch (e) {
    if (seq === askSeq) showError(e.message);
  } finally {
    if (seq === askSeq) $("results").setAttribute("aria-busy", "false");
  }
}

// -- the query image -------------------------------------------------------------------------
function asBase64(dataUrl) {
  return dataUrl.slice(dataUrl.indexOf(",") + 1);
}

async function takeImage(file) {
  if (!file) return;
  if (!file.type.startsWith("image/")) {
    showError(file.name + " is not an image");
    return;
  }
  // Shrunk in the browser: the encoder sees 224 px, and an inline query image is <= 256 KB.
  const bitmap = await createImageBitmap(file);
  const scale = Math.min(1, 512 / Math.max(bitmap.width, bitmap.height));
  const canvas = document.createElement("canvas");
  canvas.width = Math.max(1, Math.round(bitmap.width * scale));
  canvas.height = Math.max(1, Math.round(bitmap.height * scale));
  canvas.getContext("2d").drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  let data = "";
  for (const quality of [0.9, 0.75, 0.6, 0.45]) {
    data = canvas.toDataURL("image/jpeg", quality);
    if (asBase64(data).length * 3 / 4 <= INLINE_IMAGE_BYTES) break;
  }
  queryImage = asBase64(data);
  const preview = $("image-preview");
  preview.src = data;
  preview.alt = "the query image: " + file.name;
  preview.hidden = false;
  $("image-clear").hidden = false;
}

function clearImage() {
  queryImage = "";
  $("image").value = "";
  $("image-preview").hidden = true;
  $("image-clear").hidden = true;
}

// -- ingest ----------------------------------------------------------------------------------
async function ingest(event) {
  event.preventDefault();
  showError("");
  const files = $("ingest-files").files;
  const tags = $("ingest-tags").value.split(",").map((t) => t.trim()).filter(Boolean);
  let started;
  try {
    if (files.length) {
      const form = new FormData();
      for (const f of files) form.append("files", f, f.name);
      for (const t of tags) form.append("tags", t);
      started = await (await api("/v1/ingest/uploads", { method: "POST", body: form })).json();
    } else {
      const sources = $("ingest-uris").value.split("\n").map((s) => s.trim()).filter(Boolean);
      if (!sources.length) {
        showError("Give a folder or URI, or choose files to upload.");
        return;
      }
      const tagMap = {};
      for (const t of tags) {
        const [k, ...v] = t.split("=");
        tagMap[k] = v.join("=");
      }
      started = await postJson("/v1/ingest", { sources, tags: tagMap });
    }
  } catch (e) {
    showError(e.message);
    return;
  }
  $("ingest-status").hidden = false;
  $("failures").hidden = true;
  const bar = $("ingest-progress");
  bar.removeAttribute("value"); // the total is unknown until the last source is listed
  setLink($("ingest-run"), started.web_ui);
  follow(started.id);
}

async function follow(id) {
  const text = $("ingest-text");
  const bar = $("ingest-progress");
  for (;;) {
    let s;
    try {
      s = await (await api("/v1/ingest/" + encodeURIComponent(id))).json();
    } catch (e) {
      text.textContent = "progress unavailable: " + e.message;
      await new Promise((r) => setTimeout(r, 1000));
      continue;
    }
    setLink($("ingest-run"), s.web_ui);
    if (s.status === "running") {
      const p = s.progress;
      text.textContent = p
        ? "running: " + p.seen + " done (" + p.ingested + " ingested, " + p.unchanged +
          " unchanged, " + p.failed + " failed), " + p.in_flight + " encoding; listing source " +
          Math.min(p.sources_done + 1, p.sources_total) + "/" + p.sources_total
        : "starting…";
      text.dataset.status = "running";
      await new Promise((r) => setTimeout(r, 500));
      continue;
    }
    text.dataset.status = s.status;
    if (s.status === "done") {
      const r = s.result;
      bar.max = Math.max(1, r.seen);
      bar.value = Math.max(1, r.seen);
      text.textContent = "done: " + r.ingested + " ingested, " + r.unchanged + " unchanged, " +
        r.failed + " failed (" + r.vectors + " vectors)";
    } else {
      bar.max = 1;
      bar.value = 0;
      text.textContent = s.error;
    }
    const body = $("failures").tBodies[0];
    body.replaceChildren();
    for (const f of s.failures) {
      const row = body.insertRow();
      row.insertCell().textContent = f.display;
      row.insertCell().textContent = f.reason;
    }
    $("failures").hidden = !s.failures.length;
    return;
  }
}

// -- wiring ----------------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", () => {
  keyFromLink();
  window.addEventListener("hashchange", () => keyFromLink() && useKey(""));
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    useKey($("key").value);
    $("key").value = "";
  });
  $("search-form").addEventListener("submit", search);
  $("ingest-form").addEventListener("submit", ingest);
  $("image").addEventListener("change", () => takeImage($("image").files[0]));
  $("image-clear").addEventListener("click", clearImage);
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    takeImage(e.dataTransfer.files[0]);
  });
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") {
      e.preventDefault();
      $("image").click();
    }
  });
  useKey("");
});
