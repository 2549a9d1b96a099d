// The operator's page: drop or pick images; each is sent on its own (the server batches concurrent
// requests onto the model), and its card shows the verdict, the routed product, the score against the
// threshold and the heatmap. No framework, no build step.
"use strict";

const IN_FLIGHT = 4; // requests at once; more would only wait in the server's queue
const RETRIES_WHEN_BUSY = 3; // a 503 (queue full) is retried after the server's Retry-After
const VERDICT_CLASS = { normal: "normal", anomalous: "anomalous", "unknown product": "unknown" };

const $ = (selector, root = document) => root.querySelector(selector);
const counts = { normal: 0, anomalous: 0, "unknown product": 0, failed: 0, pending: 0 };

function fmt(x, digits = 3) {
  return Number.isFinite(x) ? Number(x).toPrecision(digits) : "–";
}

async function getJSON(path) {
  const response = await fetch(path);
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

async function loadServerInfo() {
  const status = $("#status");
  try {
    const [health, tasks] = await Promise.all([getJSON("/health"), getJSON("/tasks")]);
    status.textContent = `${health.status} · ${health.preset} preset on ${health.device} · moleflow ${health.moleflow}`;
    status.classList.toggle("down", health.status !== "ok");
    const mp = (health.limits.max_pixels / 1e6).toFixed(0);
    const mib = (health.limits.max_upload_bytes / 2 ** 20).toFixed(0);
    $("#limits").textContent = `PNG, JPEG, BMP, TIFF or WebP; up to ${mp} megapixels and ${mib} MiB per image.`;
    const body = $("#products tbody");
    body.replaceChildren();
    for (const p of tasks.products) {
      const row = body.insertRow();
      row.dataset.product = p.name;
      const cells = [p.name, (p.learned_at || "").slice(0, 10), String(p.train_images), fmt(p.image_threshold, 4)];
      cells.forEach((text, i) => {
        const cell = row.insertCell();
        cell.textContent = text;
        if (i >= 2) cell.className = "num";
      });
    }
  } catch (error) {
    status.textContent = `server unreachable: ${error.message}`;
    status.classList.add("down");
  }
}

function updateSummary() {
  const done = counts.normal + counts.anomalous + counts["unknown product"] + counts.failed;
  const parts = [`${counts.normal} normal`, `${counts.anomalous} anomalous`, `${counts["unknown product"]} unknown product`];
  if (counts.failed) parts.push(`${counts.failed} failed`);
  const waiting = counts.pending ? ` (${counts.pending} checking…)` : "";
  $("#summary").textContent = done || counts.pending ? `${done} image(s): ${parts.join(", ")}${waiting}` : "";
  $("#clear").hidden = !(done || counts.pending);
}

function newCard(file) {
  const card = $("#card").content.firstElementChild.cloneNode(true);
  card.dataset.image = file.name;
  $(".name", card).textContent = file.name;
  $(".original", card).src = URL.createObjectURL(file);
  $("#results").append(card);
  return card;
}

function showResult(card, r) {
  const kind = VERDICT_CLASS[r.verdict] || "failed";
  card.classList.remove("pending");
  card.classList.add(kind);
  card.dataset.verdict = r.verdict;
  $(".badge", card).textContent = r.verdict;
  $(".product", card).textContent = r.unknown_product ? `unknown product (nearest: ${r.nearest_product})` : r.routed;
  const share = Math.max(0, Math.min(2, r.normalized_score)) / 2; // the bar spans 0 to 2x the threshold
  $(".fill", card).style.width = `${(100 * share).toFixed(1)}%`;
  const relation = r.normalized_score > 1 ? "above" : "below";
  if (r.unknown_product) {
    // scored as the nearest product, which it is not: how far it lies from every product matters more
    $(".score", card).textContent = `${fmt(r.normalized_score)} of 1.00 as ${r.nearest_product}`;
    $(".raw", card).textContent = `routing distance ${fmt(r.routing_distance, 4)} (limit ${fmt(r.routing_threshold, 4)})`;
  } else {
    $(".score", card).textContent = `${fmt(r.normalized_score)} of 1.00 (${relation})`;
    $(".raw", card).textContent = `${fmt(r.score, 4)} (threshold ${fmt(r.threshold, 4)})`;
  }
  if (r.heatmap_png) $(".heatmap", card).src = `data:image/png;base64,${r.heatmap_png}`;
}

function showError(card, message) {
  card.classList.remove("pending");
  card.classList.add("failed");
  $(".badge", card).textContent = "not checked";
  const error = $(".error", card);
  error.textContent = message;
  error.hidden = false;
}

async function check(file, card) {
  for (let attempt = 0; ; attempt++) {
    const form = new FormData();
    form.append("image", file, file.name);
    let response;
    try {
      response = await fetch("/predict?heatmap=base64", { method: "POST", body: form });
    } catch (error) {
      return showError(card, `server unreachable: ${error.message}`);
    }
    if (response.status === 503 && attempt < RETRIES_WHEN_BUSY) {
      const wait = Number(response.headers.get("Retry-After") || 1);
      await new Promise((resolve) => setTimeout(resolve, 1000 * wait));
      continue;
    }
    let body = {};
    try {
      body = await response.json();
    } catch (error) {
      body = { detail: `HTTP ${response.status} without a JSON body` };
    }
    if (!response.ok) return showError(card, `${response.status}: ${body.detail || "request failed"}`);
    return showResult(card, body.results[0]);
  }
}

async function checkAll(files) {
  const queue = Array.from(files).map((file) => [file, newCard(file)]);
  counts.pending += queue.length;
  updateSummary();
  const worker = async () => {
    for (let next = queue.shift(); next; next = queue.shift()) {
      const [file, card] = next;
      await check(file, card);
      if (!card.isConnected) continue; // cleared meanwhile: its counts are gone
      counts.pending -= 1;
      counts[card.classList.contains("failed") ? "failed" : card.dataset.verdict] += 1;
      updateSummary();
    }
  };
  await Promise.all(Array.from({ length: IN_FLIGHT }, worker));
}

function setUp() {
  const drop = $("#drop");
  const input = $("#files");
  input.addEventListener("change", () => {
    checkAll(input.files);
    input.value = "";
  });
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    checkAll(event.dataTransfer.files);
  });
  $("#clear").addEventListener("click", () => {
    for (const img of document.querySelectorAll("#results img.original")) URL.revokeObjectURL(img.src);
    $("#results").replaceChildren();
    for (const key of Object.keys(counts)) counts[key] = 0;
    updateSummary();
  });
  loadServerInfo();
}

setUp();
