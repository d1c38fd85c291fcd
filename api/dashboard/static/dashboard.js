// DiG-IN dashboard: polls the /ui/.../live endpoints while jobs or a batch run, and updates
// the page in place (no build step, no dependencies).
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

document.addEventListener("DOMContentLoaded", () => {
  if (liveJobs().length > 0) setTimeout(pollJobs, POLL_MS);
  const batch = document.querySelector("[data-live-batch][data-batch-status='running']");
  if (batch) setTimeout(() => pollBatch(batch), BATCH_POLL_MS);
});
