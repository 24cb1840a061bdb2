// The demo page: submit a job, follow its event stream, show the clip. Talks only to the public API.
"use strict";

const $ = (id) => document.getElementById(id);
const HISTORY_KEY = "melfusion.history";
const API_KEY = "melfusion.apiKey";  // in sessionStorage (gone with the tab), or localStorage if "remember" is ticked
const HISTORY_SIZE = 5;
// Every form field but the image; an empty one is left out (the service's default).
const OPTIONAL_FIELDS = ["caption", "negative_caption", "num_outputs", "seconds", "format", "loudness_lufs", "steps",
  "image_steps", "image_strength", "guidance_scale", "seed", "expires_in"];

function authHeaders() {
  const key = $("api-key").value.trim();
  const [kept, dropped] = $("remember-key").checked ? [localStorage, sessionStorage] : [sessionStorage, localStorage];
  if (key) kept.setItem(API_KEY, key); else kept.removeItem(API_KEY);
  dropped.removeItem(API_KEY);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function clearErrors() {
  document.querySelectorAll(".error").forEach((el) => { el.textContent = ""; });
}

// The API's message, verbatim, next to the field it names (else under the button).
function showError(error) {
  const target = $(`error-${error.field}`) || $("error-form");
  target.textContent = error.message;
  const input = $(error.field);
  if (input && input.closest("details")) input.closest("details").open = true;
  if (input) input.focus();
}

async function errorOf(response) {
  try { return (await response.json()).error; } catch { return { message: `HTTP ${response.status}` }; }
}

function showImage(file) {
  if (!file) return;
  $("preview").src = URL.createObjectURL(file);
  $("preview").hidden = false;
  $("drop-hint").textContent = file.name;
}

function render(job) {
  $("job").hidden = false;
  const where = job.status === "queued" && job.queue_position != null ? ` (${job.queue_position} ahead)` : "";
  $("status").textContent = `${job.status}${where}` + (job.status === "running" ? ` ${Math.round(job.progress * 100)}%` : "");
  $("progress").value = job.progress;
  if (job.error) $("status").textContent = `${job.status}: ${job.error.message}`;
  if (job.result) {
    $("result").hidden = false;
    $("audio").src = job.result.url;
    $("spectrogram").src = job.result.spectrogram_url || "";
    const format = job.params.format || "wav";  // the file's extension is the format's name
    $("download").href = job.result.url;
    $("download").setAttribute("download", `melfusion-${job.id}.${format}`);
    $("download").textContent = `Download ${format.toUpperCase()}`;
    $("seed-used").textContent = job.params.seed;
    $("more-outputs").replaceChildren(...(job.outputs || []).slice(1).map((output, i) => {
      const li = document.createElement("li");
      const audio = document.createElement("audio");
      Object.assign(audio, { controls: true, preload: "metadata", src: output.url });
      const link = document.createElement("a");
      Object.assign(link, { href: output.url, download: `melfusion-${job.id}-${i + 2}.${format}` });
      link.textContent = `Download ${format.toUpperCase()} (seed ${job.params.seed + i + 1})`;
      li.append(audio, link);
      return li;
    }));
    $("expires").textContent = job.expires_at ? `kept until ${new Date(job.expires_at).toLocaleString()}` : "";
  }
}

// Server-Sent Events over fetch (EventSource cannot send an Authorization header).
async function follow(jobId) {
  const response = await fetch(`/jobs/${jobId}/events`, { headers: authHeaders() });
  if (!response.ok) { showError(await errorOf(response)); return null; }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "", job = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return job;
    buffer += value;
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const event = (block.match(/^event: ?(.*)$/m) || [])[1];
      const data = (block.match(/^data: ?(.*)$/m) || [])[1];
      if (!data) continue;
      job = event === "progress" ? { ...job, ...JSON.parse(data) } : JSON.parse(data);
      render(job);
      if (event === "completed") return job;
    }
  }
}

function readHistory() {
  try { return JSON.parse(localStorage.getItem(HISTORY_KEY)) || []; } catch { return []; }
}

function remember(job) {
  const entry = { id: job.id, caption: job.params.caption, seed: job.params.seed, status: job.status };
  const history = [entry, ...readHistory().filter((item) => item.id !== job.id)].slice(0, HISTORY_SIZE);
  localStorage.setItem(HISTORY_KEY, JSON.stringify(history));
  showHistory();
}

function showHistory() {
  const history = readHistory();
  $("history").hidden = history.length === 0;
  $("history-list").replaceChildren(...history.map((item) => {
    const li = document.createElement("li");
    li.textContent = `${item.caption ?? "(image only)"} (seed ${item.seed}, ${item.status})`;
    const open = document.createElement("button");
    open.type = "button";
    open.textContent = "Show";
    open.addEventListener("click", () => show(item.id));
    li.append(open);
    return li;
  }));
}

async function show(jobId) {
  clearErrors();
  const response = await fetch(`/jobs/${jobId}`, { headers: authHeaders() });
  if (!response.ok) { showError(await errorOf(response)); return; }
  render(await response.json());
}

async function submit(event) {
  event.preventDefault();
  clearErrors();
  const form = new FormData();
  const file = $("image").files[0];
  if (!file && !$("caption").value.trim()) {
    showError({ field: "caption", message: "give a caption, an image, or both" });
    return;
  }
  if (file) form.append("image", file);
  for (const name of OPTIONAL_FIELDS) if ($(name).value !== "") form.append(name, $(name).value);
  if ($("loop").checked) form.append("loop", "true");
  $("submit").disabled = true;
  $("result").hidden = true;
  try {
    const response = await fetch("/jobs", { method: "POST", body: form, headers: authHeaders() });
    if (!response.ok) { showError(await errorOf(response)); return; }
    const job = await response.json();
    render(job);
    const final = await follow(job.id);
    if (final) remember(final);
  } catch (error) {
    showError({ message: `could not reach the service: ${error.message}` });
  } finally {
    $("submit").disabled = false;
  }
}

function setUp() {
  $("remember-key").checked = localStorage.getItem(API_KEY) !== null;
  $("api-key").value = sessionStorage.getItem(API_KEY) || localStorage.getItem(API_KEY) || "";
  $("image").addEventListener("change", () => showImage($("image").files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    $("image").files = e.dataTransfer.files;
    showImage($("image").files[0]);
  });
  $("job-form").addEventListener("submit", submit);
  showHistory();
}

setUp();
