// DiG-IN dashboard: follows a job's or a batch's live events (/ui/.../events) on its page, polls
// the /ui/.../live endpoints for the jobs table (and when a stream fails), and updates the page
// in place (no build step, no dependencies).
"use strict";

const POLL_MS = 1500;
const BATCH_POLL_MS = 3000;

function liveJobs() {
  return Array.from(document.querySelectorAll("[data-live-job][data-terminal='false']"));
}

function updateJobElement(el, job) {
  el.dataset.status = job.status;
  const status = el.querySelector("[data-role='status']");
  if (status) {
    status.textContent = job.status;
    status.className = status.className.replace(/status-\S+/, "status-" + job.status);
  }
  const progress = el.querySelector("[data-role='progress']");
  if (progress) {
    progress.hidden = job.fraction === null;
    const bar = progress.querySelector("progress");
    if (bar && job.fraction !== null) bar.value = job.fraction;
    const stage = progress.querySelector("[data-role='stage']");
    if (stage) stage.textContent = (job.stage || "") + (job.total ? " " + job.step + "/" + job.total : "");
  }
}

async function replaceRow(el, id) {
  const response = await fetch("/ui/jobs/" + id + "/row", { credentials: "same-origin" });
  if (!response.ok) return;
  const body = document.createElement("tbody");
  body.innerHTML = (await response.text()).trim();
  const row = body.querySelector("tr");
  if (row) el.replaceWith(row);
}

async function pollJobs() {
  const elements = liveJobs();
  if (elements.length === 0) return;
  const ids = [...new Set(elements.map((el) => el.dataset.liveJob))].slice(0, 200);
  const query = ids.map((id) => "id=" + encodeURIComponent(id)).join("&");
  try {
    const response = await fetch("/ui/jobs/live?" + query, { credentials: "same-origin" });
    if (response.status === 401) { window.location.reload(); return; }
    if (!response.ok) throw new Error("HTTP " + response.status);
    const { jobs } = await response.json();
    let reload = false;
    for (const job of jobs) {
      for (const el of elements.filter((e) => e.dataset.liveJob === job.id)) {
        updateJobElement(el, job);
        if (!job.terminal) continue;
        el.dataset.terminal = "true";
        if (el.dataset.reloadOnFinish === "true" || el.closest("[data-live-batch]")) reload = true;
        else if (el.matches("tr.job-row")) await replaceRow(el, job.id);
      }
    }
    if (reload) { window.location.reload(); return; }
  } catch (error) {
    console.warn("dashboard: polling jobs failed", error);
  }
  setTimeout(pollJobs, POLL_MS);
}

async function pollBatch(main) {
  const id = main.dataset.liveBatch;
  try {
    const response = await fetch("/ui/batches/" + id + "/live", { credentials: "same-origin" });
    if (response.ok) {
      const batch = await response.json();
      document.getElementById("batch-progress").value = batch.progress;
      document.getElementById("batch-percent").textContent = (100 * batch.progress).toFixed(1) + " %";
      for (const [name, n] of Object.entries(batch.counts)) {
        const el = document.querySelector("[data-count='" + name + "']");
        if (el) { el.dataset.value = n; el.textContent = name + " " + n; }
      }
      const eta = document.getElementById("batch-eta");
      if (eta) eta.textContent = batch.eta_seconds === null ? "–" : Math.round(batch.eta_seconds) + " s";
      const status = document.getElementById("batch-status");
      status.textContent = batch.status;
      if (batch.status !== "running") { window.location.reload(); return; }
    }
  } catch (error) {
    console.warn("dashboard: polling the batch failed", error);
  }
  setTimeout(() => pollBatch(main), BATCH_POLL_MS);
}

// A job's or batch's page follows its live events (server-sent events); if the stream fails
// (an old server, a proxy that buffers), the page polls as before.
function follow(url, handlers, fallback) {
  if (!window.EventSource) { fallback(); return; }
  const source = new EventSource(url, { withCredentials: true });
  let opened = false;
  source.onopen = () => { opened = true; };
  for (const [name, handle] of Object.entries(handlers)) {
    source.addEventListener(name, (event) => handle(JSON.parse(event.data), source));
  }
  // EventSource reconnects by itself (with Last-Event-ID); a stream that never opened, or that
  // the server refused, is given up for polling
  source.onerror = () => {
    if (!opened || source.readyState === EventSource.CLOSED) { source.close(); fallback(); }
  };
  source.addEventListener("error", (event) => { if (event.data) { source.close(); fallback(); } });
}

function jobState(job) {
  const progress = job.progress || {};
  const total = progress.total || null;
  const terminal = ["succeeded", "failed", "canceled"].includes(job.status);
  const fraction = job.status === "succeeded" ? 1 : total ? (progress.step || 0) / total : null;
  return { status: job.status, stage: progress.stage, step: progress.step, total, fraction, terminal };
}

function followJob(main) {
  const id = main.dataset.liveJob;
  let state = null;
  const show = (job) => { state = jobState(job); updateJobElement(main, state); };
  follow("/ui/jobs/" + id + "/events", {
    snapshot: (job, source) => {
      show(job);
      if (state.terminal) { source.close(); window.location.reload(); }
    },
    status: (event) => { if (state) show({ ...event, progress: null, status: event.status }); },
    progress: (event) => { if (state) show({ status: state.status, progress: event }); },
  }, () => setTimeout(pollJobs, POLL_MS));
}

function showBatch(batch) {
  document.getElementById("batch-progress").value = batch.progress;
  document.getElementById("batch-percent").textContent = (100 * batch.progress).toFixed(1) + " %";
  for (const [name, n] of Object.entries(batch.counts)) {
    const el = document.querySelector("[data-count='" + name + "']");
    if (el) { el.dataset.value = n; el.textContent = name + " " + n; }
  }
  const eta = document.getElementById("batch-eta");
  if (eta) eta.textContent = batch.eta_seconds === null ? "–" : Math.round(batch.eta_seconds) + " s";
  document.getElementById("batch-status").textContent = batch.status;
}

function followBatch(main) {
  follow("/ui/batches/" + main.dataset.liveBatch + "/events", {
    snapshot: (batch, source) => {
      showBatch(batch);
      if (batch.status !== "running") { source.close(); window.location.reload(); }
    },
  }, () => setTimeout(() => pollBatch(main), BATCH_POLL_MS));
}

document.addEventListener("DOMContentLoaded", () => {
  const page = document.querySelector("main[data-live-job][data-terminal='false']");
  if (page) followJob(page);
  else if (liveJobs().length > 0) setTimeout(pollJobs, POLL_MS);
  const batch = document.querySelector("[data-live-batch][data-batch-status='running']");
  if (batch) followBatch(batch);
});
