"use strict";
// sdtune ui: one page per tab, all data from the JSON API, run progress pushed by server-sent events.

const $ = (sel, root = document) => root.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  for (const child of children.flat()) node.append(child instanceof Node ? child : String(child));
  return node;
};
const fileUrl = (path, download) => `/api/file?path=${encodeURIComponent(path)}${download ? "&download=1" : ""}`;

async function api(method, path, body) {
  const options = { method, headers: { "X-Sdtune": "1" } };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  const response = await fetch(path, options);
  if (response.status === 401) {
    const token = prompt("This sdtune server needs its token (printed when it started):");
    if (token) {
      await fetch("/api/login", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ token }) });
      return api(method, path, body);
    }
  }
  const data = response.headers.get("content-type")?.includes("json") ? await response.json() : null;
  if (!response.ok) throw new Error((data && data.error) || `${response.status} ${response.statusText}`);
  return data;
}

function notice(text, ok = false) {
  const box = $("#notice");
  box.textContent = text;
  box.className = ok ? "ok" : "";
  box.hidden = !text;
  if (ok) setTimeout(() => { if (box.textContent === text) box.hidden = true; }, 4000);
}
const guarded = (fn) => async (...args) => { try { notice(""); await fn(...args); } catch (e) { notice(e.message); } };
const debounce = (fn, ms) => { let t; return (...a) => { clearTimeout(t); t = setTimeout(() => fn(...a), ms); }; };

// ---- pages ---------------------------------------------------------------------------------
const pages = {};
function show(page) {
  for (const section of document.querySelectorAll(".page")) section.hidden = section.id !== `page-${page}`;
  for (const link of document.querySelectorAll("nav a")) link.classList.toggle("active", link.dataset.page === page);
  (pages[page] || (() => {}))();
}
window.addEventListener("hashchange", () => show(location.hash.slice(1) || "dataset"));

// ---- option forms (training config and generation), from the declared options ------------------
function textOf(value) {
  if (value === null || value === undefined) return "";
  if (Array.isArray(value)) return value.map(String).join(value.some((v) => typeof v === "string") ? "|" : ",");
  return typeof value === "object" ? JSON.stringify(value) : String(value);
}

function buildForm(form, options, keyOf, onChange) {
  form.replaceChildren();
  const sections = {};
  for (const opt of options) {
    const key = keyOf(opt);
    if (opt.type === "list" || opt.type === "list[table]") continue; // e.g. data.sources: recipe only
    let input;
    if (opt.type === "bool") input = el("input", { type: "checkbox" });
    else if (opt.choices) input = el("select", {}, (opt.default === null ? [""] : []).concat(opt.choices).map((c) => el("option", { value: c }, c === "" ? "(default)" : c)));
    else if (opt.type === "lora") input = el("textarea", { rows: 2, placeholder: "runs/my-lora:0.8 (one per line)" });
    else input = el("input", { type: "text", inputmode: opt.type === "int" || opt.type === "float" ? "decimal" : undefined });
    input.dataset.key = key;
    input.id = `opt-${key.replace(/\W/g, "-")}`;
    const field = el("div", { class: "field" }, el("label", { for: input.id }, key), input,
      el("div", { class: "help" }, opt.help + (opt.valid ? ` ${opt.valid}` : "")), el("div", { class: "msg" }));
    input.addEventListener(opt.type === "bool" || opt.choices ? "change" : "input", () => onChange(key));
    const name = opt.section || key.split(".")[0];
    sections[name] = sections[name] || form.appendChild(el("fieldset", {}, el("legend", {}, name)));
    sections[name].append(field);
  }
}

function setValue(form, key, value) {
  const input = form.querySelector(`[data-key="${key}"]`);
  if (!input) return;
  if (input.type === "checkbox") input.checked = value === true || value === "true";
  else if (input.tagName === "TEXTAREA") input.value = Array.isArray(value) ? value.join("\n") : textOf(value);
  else input.value = textOf(value);
  input.dataset.initial = readValue(input);
}
function readValue(input) {
  if (input.type === "checkbox") return input.checked ? "true" : "false";
  return input.value;
}
function showMessages(form, box, messages) {
  for (const field of form.querySelectorAll(".field")) {
    const key = field.querySelector("[data-key]").dataset.key;
    field.classList.toggle("bad", key in messages);
    field.querySelector(".msg").textContent = messages[key] || "";
  }
  box.replaceChildren(...Object.entries(messages)
    .filter(([key]) => !form.querySelector(`[data-key="${key}"]`))
    .map(([key, text]) => el("div", {}, text)));
}

// ---- Dataset ------------------------------------------------------------------------------
const ds = { dir: null, items: [] };
pages.dataset = guarded(async () => {
  const folders = await api("GET", "/api/datasets");
  const select = $("#ds-folder");
  const keep = ds.dir || (folders[0] && folders[0].dir);
  select.replaceChildren(...folders.map((f) => el("option", { value: f.dir }, `${f.dir} (${f.images})`)));
  if (keep) { select.value = keep; await loadDataset(keep); }
  else $("#ds-grid").replaceChildren(el("p", { class: "muted" }, "No image folders in the workspace yet: copy one in, or make the sample dataset."));
});

async function loadDataset(dir) {
  ds.dir = dir;
  const view = await api("GET", `/api/dataset?dir=${encodeURIComponent(dir)}`);
  ds.items = view.items;
  $("#ds-count").textContent = `${view.items.length} images, ${view.items.filter((i) => !i.has_caption).length} without caption, ${view.skipped.length} skipped`;
  $("#ds-grid").replaceChildren(...view.items.map(datasetCard));
  $("#ds-tags").replaceChildren(...view.tags.map(([tag, n]) => el("li", {}, `${tag} `, el("span", { class: "muted" }, n))));
  $("#ds-skipped").replaceChildren(...(view.skipped.length ? view.skipped.map((s) => el("li", {}, el("b", {}, s.path), `: ${s.reason}`)) : [el("li", { class: "muted" }, "none")]));
}

function datasetCard(item) {
  const path = `${ds.dir}/${item.path}`;
  const area = el("textarea", { "data-image": item.path, placeholder: "(no caption)" });
  area.value = item.caption;
  const state = el("span", { class: "saved" });
  area.addEventListener("change", guarded(async () => {
    await api("POST", "/api/dataset/caption", { dir: ds.dir, image: item.path, text: area.value });
    state.textContent = "saved";
    setTimeout(() => { state.textContent = ""; }, 2000);
  }));
  const img = el("img", { loading: "lazy", src: `/api/thumb?path=${encodeURIComponent(path)}`, alt: item.path });
  // the image fills its square as large as it fits, so a crop box drawn on it lines up
  const fit = item.width >= item.height ? `width:100%;aspect-ratio:${item.width}/${item.height}` : `height:100%;aspect-ratio:${item.width}/${item.height}`;
  return el("div", { class: "ds-item", "data-path": item.path },
    el("div", { class: "thumb" }, el("div", { class: "thumb-inner", style: fit }, img)),
    el("div", { class: "name", title: item.path }, `${item.path} · ${item.width}×${item.height} `, state), area);
}

$("#ds-folder").addEventListener("change", guarded((e) => loadDataset(e.target.value)));
$("#ds-refresh").addEventListener("click", () => pages.dataset());
$("#ds-sample").addEventListener("click", guarded(async () => {
  const made = await api("POST", "/api/datasets/sample");
  ds.dir = made.dir;
  await pages.dataset();
  notice(made.created ? `made ${made.dir}` : `${made.dir} already exists`, true);
}));
$("#ds-trigger-apply").addEventListener("click", guarded(async () => {
  const out = await api("POST", "/api/dataset/trigger", { dir: ds.dir, trigger: $("#ds-trigger").value, replace: $("#ds-replace").value });
  await loadDataset(ds.dir);
  notice(`${out.changed} caption file(s) changed`, true);
}));
$("#ds-autocaption").addEventListener("click", guarded(async () => {
  const out = await api("POST", "/api/dataset/autocaption", { dir: ds.dir });
  followJob(out.job, $("#ds-job"), () => loadDataset(ds.dir));
}));
$("#ds-buckets").addEventListener("click", guarded(async () => {
  const q = new URLSearchParams({ dir: ds.dir, resolution: $("#ds-res").value, bucketing: $("#ds-bucketing").checked, center_crop: $("#ds-center").checked, validation_split: $("#ds-held").value || 0 });
  const plan = await api("GET", `/api/dataset/buckets?${q}`);
  const sizes = {};
  for (const box of plan) {
    const card = [...document.querySelectorAll(".ds-item")].find((c) => `${ds.dir}/${c.dataset.path}` === box.path || c.dataset.path === box.path);
    const label = `${box.bucket[0]}×${box.bucket[1]}`;
    sizes[label] = (sizes[label] || 0) + 1;
    if (!card) continue;
    const inner = $(".thumb-inner", card);
    inner.querySelector(".crop")?.remove();
    const [x0, y0, x1, y1] = box.crop;
    inner.append(el("div", { class: "crop", title: `bucket ${label}`, style: `left:${100 * x0 / box.width}%;top:${100 * y0 / box.height}%;width:${100 * (x1 - x0) / box.width}%;height:${100 * (y1 - y0) / box.height}%` }));
    $(".name", card).querySelector(".bucket-label")?.remove();
    $(".name", card).append(el("span", { class: "bucket-label" }, ` → ${label}${box.upscaled ? " (upscaled)" : ""}${box.random_crop ? " (random crop)" : ""}${box.held_out ? " (held out for validation)" : ""}`));
  }
  $("#ds-bucket-summary").textContent = Object.entries(sizes).map(([s, n]) => `${s}: ${n}`).join(", ");
}));

function followJob(id, label, done) {
  const timer = setInterval(guarded(async () => {
    const job = (await api("GET", "/api/jobs")).find((j) => j.id === id);
    if (!job) return;
    label.textContent = `${job.status}: ${job.log.slice(-1)[0] || ""}`;
    if (!["queued", "running"].includes(job.status)) { clearInterval(timer); if (done) done(job); }
  }), 1000);
}

// ---- New run ------------------------------------------------------------------------------
const nr = { recipes: [], form: null, built: false };
pages.newrun = guarded(async () => {
  if (!nr.built) {
    nr.options = await api("GET", "/api/config/form");
    buildForm($("#nr-form"), nr.options, (o) => o.key, debounce(checkRun, 300));
    nr.built = true;
  }
  nr.recipes = await api("GET", "/api/recipes");
  const select = $("#nr-recipe");
  const keep = select.value;
  select.replaceChildren(...nr.recipes.map((r) => el("option", { value: r.id }, r.name)));
  if (keep) select.value = keep;
  applyRecipe();
});

function applyRecipe() {
  const recipe = nr.recipes.find((r) => r.id === $("#nr-recipe").value);
  if (!recipe) return;
  $("#nr-description").textContent = recipe.description;
  for (const opt of nr.options) setValue($("#nr-form"), opt.key, opt.key in recipe.values ? recipe.values[opt.key] : opt.default);
  checkRun();
}
$("#nr-recipe").addEventListener("change", applyRecipe);
$("#nr-name").addEventListener("input", debounce(() => checkRun(), 300));

function runRequest() {
  const overrides = {};
  for (const input of $("#nr-form").querySelectorAll("[data-key]")) {
    const value = readValue(input);
    input.closest(".field").classList.toggle("changed", value !== input.dataset.initial);
    if (value !== input.dataset.initial) overrides[input.dataset.key] = value;
  }
  return { recipe: $("#nr-recipe").value, name: $("#nr-name").value, overrides };
}

const estimateLater = debounce(async (request) => {
  try {
    const out = await api("POST", "/api/config/estimate", request);
    $("#nr-estimate").textContent = out.text;
  } catch (e) { $("#nr-estimate").textContent = e.message; }
}, 700);

async function checkRun() {
  const request = runRequest();
  try {
    const { messages } = await api("POST", "/api/config/check", request);
    showMessages($("#nr-form"), $("#nr-messages"), messages);
    $("#nr-command").textContent = (await api("POST", "/api/config/command", request)).command;
    $("#nr-start").disabled = Object.keys(messages).length > 0;
    if (!Object.keys(messages).length) { $("#nr-estimate").textContent = "estimating…"; estimateLater(request); }
  } catch (e) { $("#nr-messages").replaceChildren(el("div", {}, e.message)); }
}
$("#nr-copy").addEventListener("click", () => navigator.clipboard?.writeText($("#nr-command").textContent));
$("#nr-start").addEventListener("click", guarded(async () => {
  const out = await api("POST", "/api/runs", runRequest());
  runs.selected = out.folder;
  location.hash = "runs";
}));

// ---- Runs ---------------------------------------------------------------------------------
const runs = { selected: null, source: null, steps: [], lrs: [] };
pages.runs = guarded(async () => {
  const list = await api("GET", "/api/runs");
  $("#runs-list tbody").replaceChildren(...list.map((r) => {
    const row = el("tr", { class: `run-row${r.folder === runs.selected ? " selected" : ""}`, "data-folder": r.folder, onclick: () => selectRun(r.folder) },
      el("td", {}, r.name), el("td", {}, el("span", { class: `status ${r.status}` }, r.status)),
      el("td", {}, r.max_steps ? `${r.step}/${r.max_steps}` : ""), el("td", {}, r.loss === null ? "" : r.loss.toFixed(4)));
    return row;
  }));
  if (runs.selected) selectRun(runs.selected);
});

function selectRun(folder) {
  if (runs.source && runs.folder === folder) return;
  if (runs.source) runs.source.close();
  runs.selected = runs.folder = folder;
  for (const row of document.querySelectorAll(".run-row")) row.classList.toggle("selected", row.dataset.folder === folder);
  runs.steps = []; runs.lrs = [];
  $("#run-panel").hidden = false;
  $("#run-title").textContent = folder;
  $("#run-log").textContent = "";
  $("#run-samples").replaceChildren();
  $("#run-error").hidden = true;
  drawCharts();
  const source = new EventSource(`/api/run/events?folder=${encodeURIComponent(folder)}`);
  runs.source = source;
  source.addEventListener("run", (e) => onRunEvent(JSON.parse(e.data)));
  source.addEventListener("log", (e) => {
    const log = $("#run-log");
    log.textContent = (log.textContent + JSON.parse(e.data).join("\n") + "\n").slice(-20000);
    log.scrollTop = log.scrollHeight;
  });
  source.addEventListener("status", (e) => onRunStatus(JSON.parse(e.data)));
  source.onerror = () => { // the server went away: follow the run again once it is back
    if (runs.source !== source) return;
    source.close();
    runs.source = null;
    setTimeout(() => { if (!runs.source && runs.folder === folder) { runs.folder = null; selectRun(folder); } }, 2000);
  };
}

function onRunEvent(event) {
  if (event.event === "step") {
    runs.steps = runs.steps.filter((p) => p[0] < event.step).concat([[event.step, event.loss]]);
    runs.lrs = runs.lrs.filter((p) => p[0] < event.step).concat([[event.step, event.lr]]);
    $("#run-progress").textContent = `step ${event.step}/${event.max_steps}`;
    $("#run-speed").textContent = `${event.images_per_s.toFixed(1)} img/s`;
    $("#run-eta").textContent = `${Math.round(event.eta_s)} s left`;
    const row = document.querySelector(`.run-row[data-folder="${runs.folder}"]`);
    if (row) updateRow(row, { status: $("#run-status").textContent || "running", step: event.step, max_steps: event.max_steps, loss: event.loss });
    drawCharts();
  } else if (event.event === "sample") {
    const img = el("img", { src: `${fileUrl(event.grid)}&t=${event.step}`, alt: `samples at step ${event.step}`, title: `step ${event.step}` });
    $("#run-samples").prepend(el("figure", { "data-step": event.step }, img, el("figcaption", {}, `step ${event.step}`)));
  } else if (event.event === "failed") {
    $("#run-error").hidden = false;
    $("#run-error").textContent = event.error;
  }
}

function onRunStatus(run) {
  const status = $("#run-status");
  status.textContent = run.status;
  status.className = `status ${run.status}`;
  $("#run-stop").disabled = !["running", "queued"].includes(run.status);
  $("#run-resume").disabled = !["stopped", "failed", "interrupted"].includes(run.status);
  $("#run-open-result").disabled = run.status !== "finished";
  if (run.error) { $("#run-error").hidden = false; $("#run-error").textContent = run.error; }
  const row = document.querySelector(`.run-row[data-folder="${run.folder}"]`);
  if (row) updateRow(row, run);
  else if (!$("#page-runs").hidden) pages.runs();
}

function updateRow(row, run) {
  const [, status, step, loss] = row.children;
  status.firstChild.textContent = run.status;
  status.firstChild.className = `status ${run.status}`;
  step.textContent = run.max_steps ? `${run.step}/${run.max_steps}` : "";
  loss.textContent = run.loss === null || run.loss === undefined ? "" : run.loss.toFixed(4);
}

function drawChart(canvas, points, log) {
  const ctx = canvas.getContext("2d");
  const { width: w, height: h } = canvas;
  ctx.clearRect(0, 0, w, h);
  ctx.strokeStyle = "#d8dee4"; ctx.strokeRect(30, 5, w - 35, h - 25);
  const values = points.map((p) => p[1]).filter((v) => v !== null && isFinite(v));
  canvas.dataset.points = points.length;
  if (points.length < 1 || !values.length) return;
  const f = log ? (v) => Math.log10(Math.max(v, 1e-12)) : (v) => v;
  const lo = Math.min(...values.map(f)), hi = Math.max(...values.map(f));
  const x0 = points[0][0], x1 = Math.max(points[points.length - 1][0], x0 + 1);
  const X = (s) => 30 + (w - 40) * (s - x0) / (x1 - x0);
  const Y = (v) => h - 22 - (h - 32) * (hi === lo ? 0.5 : (f(v) - lo) / (hi - lo));
  ctx.strokeStyle = "#2463eb"; ctx.lineWidth = 1.5; ctx.beginPath();
  points.forEach(([s, v], i) => (i ? ctx.lineTo(X(s), Y(v)) : ctx.moveTo(X(s), Y(v))));
  ctx.stroke();
  ctx.fillStyle = "#6a737d"; ctx.font = "10px sans-serif";
  ctx.fillText(Math.max(...values).toPrecision(3), 2, 12);
  ctx.fillText(Math.min(...values).toPrecision(3), 2, h - 22);
  ctx.fillText(`step ${x0}`, 30, h - 6); ctx.fillText(`${x1}`, w - 30, h - 6);
}
function drawCharts() { drawChart($("#chart-loss"), runs.steps, false); drawChart($("#chart-lr"), runs.lrs, false); }

$("#run-stop").addEventListener("click", guarded(async () => {
  const out = await api("POST", "/api/run/stop", { folder: runs.selected });
  notice(out.status === "stopping" ? "the run writes a checkpoint at its next step, then stops" : out.status, true);
}));
$("#run-resume").addEventListener("click", guarded(async () => {
  await api("POST", "/api/run/resume", { folder: runs.selected });
  notice("queued again: it goes on from its latest checkpoint", true);
}));
$("#run-open-result").addEventListener("click", () => { results.selected = runs.selected; location.hash = "results"; });

// ---- Results ------------------------------------------------------------------------------
const results = { selected: null };
pages.results = guarded(async () => {
  const finished = (await api("GET", "/api/runs")).filter((r) => r.status === "finished");
  const select = $("#res-run");
  select.replaceChildren(...finished.map((r) => el("option", { value: r.folder }, r.name)));
  if (results.selected && finished.some((r) => r.folder === results.selected)) select.value = results.selected;
  if (select.value) await loadResult(select.value);
  else $("#res-summary").textContent = "No finished run yet.";
});
async function loadResult(folder) {
  results.selected = folder;
  const out = await api("GET", `/api/run/result?folder=${encodeURIComponent(folder)}`);
  $("#res-summary").textContent = out.summary || out.summary_error || "";
  $("#res-card").textContent = out.card || "(no model card)";
  $("#res-files").replaceChildren(...out.files.map((f) => el("li", {}, el("a", { href: fileUrl(f, true), download: "" }, f))));
  $("#res-samples").replaceChildren(...out.samples.slice(-6).map((s) => el("img", { src: fileUrl(s), alt: s, title: s })));
}
$("#res-run").addEventListener("change", guarded((e) => loadResult(e.target.value)));
$("#res-convert").addEventListener("click", guarded(async () => {
  $("#res-status").textContent = "converting…";
  const out = await api("POST", "/api/run/convert", { folder: results.selected });
  $("#res-status").textContent = `wrote ${out.file}`;
  await loadResult(results.selected);
}));
$("#res-try").addEventListener("click", () => { gen.lora = results.selected; location.hash = "generate"; });

// ---- Generate -----------------------------------------------------------------------------
const gen = { built: false, lora: null, maskPath: null };
window.sdtuneMaskPath = () => gen.maskPath; // the uploaded mask, for tests and the console
pages.generate = guarded(async () => {
  if (!gen.built) {
    gen.options = await api("GET", "/api/generate/form");
    buildForm($("#gen-form"), gen.options.filter((o) => !["image", "mask", "depth_map", "out"].includes(o.name)), (o) => o.name, debounce(checkGenerate, 300));
    for (const opt of gen.options) setValue($("#gen-form"), opt.name, opt.default);
    gen.built = true;
    $("#gen-form").querySelector('[data-key="mode"]')?.addEventListener("change", showModeInputs);
  }
  if (gen.lora) { setValue($("#gen-form"), "lora", [gen.lora]); gen.lora = null; }
  showModeInputs();
  await loadGallery();
});

function generationValues() {
  const values = {};
  for (const input of $("#gen-form").querySelectorAll("[data-key]")) {
    const value = readValue(input);
    if (value === input.dataset.initial && input.dataset.key !== "lora") continue;
    values[input.dataset.key] = input.tagName === "TEXTAREA" ? value.split("\n").map((s) => s.trim()).filter(Boolean) : value;
  }
  const mode = values.mode || $("#gen-form").querySelector('[data-key="mode"]')?.value;
  if (["img2img", "inpaint", "depth2img", "upscale"].includes(mode) && $("#gen-image-path").textContent) values.image = $("#gen-image-path").textContent;
  if (mode === "inpaint" && gen.maskPath) values.mask = gen.maskPath;
  if (mode === "depth2img" && $("#gen-depth-path").textContent) values.depth_map = $("#gen-depth-path").textContent;
  return values;
}
async function checkGenerate() {
  const { messages } = await api("POST", "/api/generate/check", { values: generationValues() });
  showMessages($("#gen-form"), $("#gen-messages"), messages);
}
function showModeInputs() {
  const mode = $("#gen-form").querySelector('[data-key="mode"]')?.value || "txt2img";
  for (const box of document.querySelectorAll(".file-input")) {
    const need = { image: ["img2img", "inpaint", "depth2img", "upscale"], mask: ["inpaint"], depth_map: ["depth2img"] }[box.dataset.for];
    box.hidden = !need.includes(mode);
  }
}
async function upload(file) {
  const body = new FormData();
  body.append("file", file);
  const response = await fetch("/api/upload", { method: "POST", headers: { "X-Sdtune": "1" }, body });
  const data = await response.json();
  if (!response.ok) throw new Error(data.error);
  return data.path;
}
$("#gen-image-file").addEventListener("change", guarded(async (e) => {
  const path = await upload(e.target.files[0]);
  $("#gen-image-path").textContent = path;
  const base = $("#gen-mask-base");
  const mask = $("#gen-mask");
  delete mask.dataset.ready;
  base.onload = () => {
    mask.width = base.naturalWidth; mask.height = base.naturalHeight; // the mask has the image's pixels
    mask.style.width = `${base.width}px`; mask.style.height = `${base.height}px`;
    clearMask();
    mask.dataset.ready = path;
    guarded(checkGenerate)();
  };
  base.src = fileUrl(path);
}));
$("#gen-depth-file").addEventListener("change", guarded(async (e) => { $("#gen-depth-path").textContent = await upload(e.target.files[0]); await checkGenerate(); }));
function clearMask() { const c = $("#gen-mask"); const ctx = c.getContext("2d"); ctx.fillStyle = "#000"; ctx.fillRect(0, 0, c.width, c.height); gen.maskPath = null; }
$("#gen-mask-clear").addEventListener("click", clearMask);
(() => {
  const canvas = $("#gen-mask");
  let drawing = false;
  const paint = (e) => {
    if (!drawing) return;
    const r = canvas.getBoundingClientRect();
    const ctx = canvas.getContext("2d");
    const scale = canvas.width / r.width;
    ctx.fillStyle = "#fff"; ctx.beginPath();
    ctx.arc((e.clientX - r.left) * scale, (e.clientY - r.top) * scale, $("#gen-brush").value * scale / 2, 0, 2 * Math.PI);
    ctx.fill();
  };
  canvas.addEventListener("pointerdown", (e) => { drawing = true; paint(e); });
  canvas.addEventListener("pointermove", paint);
  window.addEventListener("pointerup", guarded(async () => {
    if (!drawing) return;
    drawing = false;
    const blob = await new Promise((done) => canvas.toBlob(done, "image/png"));
    gen.maskPath = await upload(new File([blob], "mask.png", { type: "image/png" }));
    await checkGenerate();
  }));
})();

$("#gen-start").addEventListener("click", guarded(async () => {
  const out = await api("POST", "/api/generate", { values: generationValues() });
  $("#gen-status").textContent = "queued";
  followJob(out.job, $("#gen-status"), async (job) => {
    if (job.status !== "finished") notice(job.log.filter((l) => l.includes("error")).slice(-1)[0] || `generation ${job.status}`);
    await loadGallery();
  });
}));
async function loadGallery() {
  const items = await api("GET", "/api/gallery");
  $("#gallery").replaceChildren(...items.map((item) => el("div", { class: "gal-item", "data-job": item.job },
    el("a", { href: fileUrl(item.path, true) }, el("img", { src: fileUrl(item.path), alt: item.path, loading: "lazy" })),
    el("pre", {}, item.parameters))));
}

// ---- start --------------------------------------------------------------------------------
guarded(async () => {
  const info = await api("GET", "/api/info");
  $("#workspace").textContent = `workspace ${info.workspace} · sdtune ${info.version}`;
})();
show(location.hash.slice(1) || "dataset");
