// EfficientAD operator page: upload images, see score + verdict + heatmap, tune the threshold, watch the server.
// Plain browser JavaScript, no build step; talks only to the server that served this page (relative URLs).
"use strict";

(() => {
  const POLL_MS = 2000;
  const MAX_PARALLEL_REQUESTS = 4; // concurrent uploads let the server's dynamic batcher merge them
  const API_KEY_STORAGE = "efficientad.apiKey";
  const SLIDER_STEPS = 1000;

  const $ = (id) => document.getElementById(id);
  const elements = {
    modelName: $("model-name"),
    modelVersion: $("model-version"),
    modelInput: $("model-input"),
    modelBackend: $("model-backend"),
    readiness: $("readiness"),
    metricRate: $("metric-rate"),
    metricLatency: $("metric-latency"),
    metricBatch: $("metric-batch"),
    metricTotal: $("metric-total"),
    metricNote: $("metric-note"),
    dropZone: $("drop-zone"),
    fileInput: $("file-input"),
    thresholdSlider: $("threshold-slider"),
    thresholdInput: $("threshold-input"),
    thresholdReset: $("threshold-reset"),
    thresholdDefault: $("threshold-default"),
    heatmapStyle: $("heatmap-style"),
    apiKey: $("api-key"),
    apiKeyForm: $("api-key-form"),
    clearResults: $("clear-results"),
    banner: $("banner"),
    results: $("results"),
    resultsEmpty: $("results-empty"),
    resultsSummary: $("results-summary"),
    template: $("result-template"),
  };

  const state = {
    model: null, // the /v1/model answer once it loaded
    modelThreshold: null, // the model's default threshold (null: the model has none)
    threshold: null, // the threshold verdicts are judged against, client-side
    heatmapStyle: "jet",
    results: [], // one per uploaded image, see newResult()
    queue: [],
    running: 0,
    previousMetrics: null,
    appliedApiKey: "",
  };

  // ---------------------------------------------------------------- API helpers

  function apiKey() {
    return sessionStorage.getItem(API_KEY_STORAGE) || "";
  }

  function requestHeaders(extra = {}) {
    const headers = { ...extra };
    const key = apiKey();
    if (key) headers["X-API-Key"] = key;
    return headers;
  }

  // The message to show for a failed API call: the JSON `detail` the server sent, with the status.
  async function errorMessage(response) {
    let code = "";
    let detail = "";
    try {
      const body = await response.json();
      code = typeof body.error === "string" ? body.error : "";
      if (typeof body.detail === "string") detail = body.detail;
      else if (Array.isArray(body.detail)) detail = body.detail.map((item) => item.msg || JSON.stringify(item)).join("; ");
      else if (body.detail !== undefined) detail = JSON.stringify(body.detail);
    } catch {
      detail = response.statusText;
    }
    if (response.status === 401) {
      return `401 Unauthorized: ${detail || "API key missing or wrong"}. Enter the server's API key in the "API key" field above.`;
    }
    return `${response.status}${code ? " " + code : ""}: ${detail || response.statusText || "request failed"}`;
  }

  // The score exactly as the API wrote it in its JSON (JSON.parse would re-format it, e.g. 1e-05 -> 0.00001).
  function rawScoreText(bodyText, parsedScore) {
    const match = /(?<!\\)"score"\s*:\s*(-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)/.exec(bodyText);
    return match ? match[1] : String(parsedScore);
  }

  function showBanner(message) {
    elements.banner.textContent = message;
    elements.banner.hidden = !message;
  }

  // ---------------------------------------------------------------- threshold

  function formatNumber(value) {
    if (value === null || value === undefined || !Number.isFinite(value)) return "–";
    return Number(value.toPrecision(6)).toString();
  }

  function isAnomaly(score, threshold) {
    return score > threshold; // the same rule as the server's is_anomaly
  }

  function setSliderRange(maxValue) {
    const max = maxValue > 0 ? maxValue : 1;
    elements.thresholdSlider.max = String(max);
    elements.thresholdSlider.step = String(max / SLIDER_STEPS);
  }

  // Let the slider reach every score seen so far (the number input takes any value anyway).
  function widenSliderFor(score) {
    if (Number.isFinite(score) && score > Number(elements.thresholdSlider.max)) setSliderRange(score * 1.1);
  }

  function setThreshold(value, source) {
    state.threshold = value;
    if (source !== "input") elements.thresholdInput.value = value === null ? "" : String(value);
    if (value !== null) {
      widenSliderFor(value);
      if (source !== "slider") elements.thresholdSlider.value = String(value);
    }
    elements.thresholdInput.removeAttribute("aria-invalid");
    updateAllVerdicts();
  }

  function onThresholdInput() {
    const text = elements.thresholdInput.value.trim();
    const value = Number(text);
    if (text === "") {
      setThreshold(state.modelThreshold, "input");
    } else if (Number.isFinite(value)) {
      setThreshold(value, "input");
      elements.thresholdSlider.value = String(value);
    } else {
      elements.thresholdInput.setAttribute("aria-invalid", "true");
    }
  }

  // ---------------------------------------------------------------- results

  function newResult(file) {
    const element = elements.template.content.firstElementChild.cloneNode(true);
    const result = {
      file,
      element,
      objectUrl: URL.createObjectURL(file),
      generation: 0, // bumped per request, so a late answer to an old request is dropped
      status: null, // HTTP status of the last answer (0: no answer)
      score: null,
      scoreText: null,
      parts: {
        name: element.querySelector(".result-name"),
        verdict: element.querySelector(".verdict"),
        original: element.querySelector(".original"),
        heatmap: element.querySelector(".heatmap"),
        imageSize: element.querySelector(".image-size"),
        regions: element.querySelector(".regions"),
        regionCount: element.querySelector(".region-count"),
        styleName: element.querySelector(".heatmap-style-name"),
        score: element.querySelector(".score"),
        thresholdNote: element.querySelector(".threshold-note"),
        timings: element.querySelector(".timings"),
        error: element.querySelector(".error"),
      },
    };
    element.dataset.filename = file.name;
    result.parts.name.textContent = file.name;
    result.parts.name.title = file.name;
    result.parts.original.src = result.objectUrl;
    result.parts.original.alt = `Original image ${file.name}`;
    return result;
  }

  function setVerdict(result, verdict, text) {
    result.element.dataset.verdict = verdict;
    result.parts.verdict.dataset.verdict = verdict;
    result.parts.verdict.textContent = text;
  }

  function updateVerdict(result) {
    if (result.state !== "done") return;
    const threshold = state.threshold;
    if (threshold === null) {
      setVerdict(result, "none", "NO THRESHOLD");
      result.parts.thresholdNote.textContent = "(set a threshold to judge it)";
      return;
    }
    const anomalous = isAnomaly(result.score, threshold);
    setVerdict(result, anomalous ? "anomaly" : "ok", anomalous ? "ANOMALY" : "OK");
    result.parts.thresholdNote.textContent = `${anomalous ? ">" : "≤"} threshold ${formatNumber(threshold)}`;
  }

  function updateAllVerdicts() {
    for (const result of state.results) updateVerdict(result);
    updateSummary();
  }

  function updateSummary() {
    const count = (predicate) => state.results.filter(predicate).length;
    const total = state.results.length;
    elements.resultsEmpty.hidden = total > 0;
    if (total === 0) {
      elements.resultsSummary.textContent = "";
      return;
    }
    const anomalies = count((r) => r.element.dataset.verdict === "anomaly");
    const ok = count((r) => r.element.dataset.verdict === "ok");
    const errors = count((r) => r.state === "error");
    const pending = count((r) => r.state === "pending");
    const parts = [`${total} image${total === 1 ? "" : "s"}`, `${anomalies} anomaly`, `${ok} OK`];
    if (errors) parts.push(`${errors} failed`);
    if (pending) parts.push(`${pending} pending`);
    elements.resultsSummary.textContent = "— " + parts.join(" · ");
  }

  function setState(result, value) {
    result.state = value;
    result.element.dataset.state = value;
  }

  function showPending(result) {
    setState(result, "pending");
    result.parts.error.textContent = "";
    if (result.scoreText === null) {
      setVerdict(result, "pending", "…");
      result.parts.score.textContent = "…";
    }
  }

  function showError(result, message) {
    setState(result, "error");
    delete result.element.dataset.score;
    result.score = null;
    result.scoreText = null;
    setVerdict(result, "error", "ERROR");
    result.parts.score.textContent = "–";
    result.parts.thresholdNote.textContent = "";
    result.parts.timings.textContent = "";
    result.parts.heatmap.removeAttribute("src");
    result.parts.heatmap.alt = "";
    result.parts.regions.replaceChildren();
    result.parts.regionCount.textContent = "";
    result.parts.error.textContent = message;
  }

  function showPrediction(result, body, scoreText, style) {
    setState(result, "done");
    result.scoreText = scoreText;
    result.score = Number(scoreText);
    result.element.dataset.score = scoreText;
    result.parts.score.textContent = scoreText;
    result.parts.error.textContent = "";
    widenSliderFor(result.score);

    const [width, height] = Array.isArray(body.image_size) ? body.image_size : [null, null];
    if (width && height) {
      result.parts.imageSize.textContent = `${width}×${height}`;
      for (const image of [result.parts.original, result.parts.heatmap]) image.style.aspectRatio = `${width} / ${height}`;
    }
    result.parts.styleName.textContent = style;
    if (body.heatmap_png) {
      result.parts.heatmap.src = `data:image/png;base64,${body.heatmap_png}`;
      result.parts.heatmap.alt = `Anomaly heatmap (${style}) of ${result.file.name}`;
    } else {
      result.parts.heatmap.removeAttribute("src");
      result.parts.heatmap.alt = "";
      result.parts.styleName.textContent = "(none returned)";
    }
    showRegions(result, body);
    const timings = body.timings_ms || {};
    const stages = ["decode", "queue", "inference", "encode"]
      .filter((stage) => Number.isFinite(timings[stage]))
      .map((stage) => `${stage} ${timings[stage].toFixed(1)}`);
    const total = Number.isFinite(timings.total) ? ` · total ${timings.total.toFixed(1)} ms` : "";
    result.parts.timings.textContent = stages.length ? `${stages.join(" · ")}${total}` : "";
    updateVerdict(result);
  }

  // Defect regions from the server, as boxes over the original (percent of the image: any display size).
  function showRegions(result, body) {
    const frame = result.parts.regions;
    frame.replaceChildren();
    const regions = Array.isArray(body.regions) ? body.regions : [];
    const [width, height] = Array.isArray(body.image_size) ? body.image_size : [0, 0];
    if (width && height) {
      for (const region of regions) {
        const box = document.createElement("div");
        box.className = "region";
        box.style.left = `${(100 * region.x) / width}%`;
        box.style.top = `${(100 * region.y) / height}%`;
        box.style.width = `${(100 * region.width) / width}%`;
        box.style.height = `${(100 * region.height) / height}%`;
        box.title = `max score ${formatNumber(region.max_score)}, ${region.area} px`;
        frame.append(box);
      }
    }
    const at = body.threshold === null || body.threshold === undefined ? "" : ` at ${formatNumber(body.threshold)}`;
    result.parts.regionCount.textContent =
      regions.length ? `· ${regions.length} region${regions.length === 1 ? "" : "s"}${at}` : "";
    result.element.dataset.regions = String(regions.length);
  }

  async function inspect(result) {
    const generation = ++result.generation;
    const style = state.heatmapStyle;
    showPending(result);
    updateSummary();
    const query = new URLSearchParams({ heatmap: "png", heatmap_style: style });
    if (state.threshold !== null) query.set("threshold", String(state.threshold)); // regions at the page's threshold
    let response;
    let text;
    try {
      response = await fetch(`predict?${query}`, {
        method: "POST",
        headers: requestHeaders({
          "Content-Type": result.file.type || "application/octet-stream",
          Accept: "application/json",
        }),
        body: result.file,
      });
      text = response.ok ? await response.text() : null;
    } catch (error) {
      if (generation === result.generation) {
        result.status = 0;
        showError(result, `Server unreachable: ${error.message}`);
      }
      return;
    }
    if (generation !== result.generation || !state.results.includes(result)) return;
    result.status = response.status;
    if (!response.ok) {
      const message = await errorMessage(response);
      if (generation !== result.generation) return;
      showError(result, message);
      if (response.status === 401) showBanner(message);
      return;
    }
    let body;
    try {
      body = JSON.parse(text);
    } catch {
      showError(result, `${response.status}: the server's answer is not JSON`);
      return;
    }
    showBanner("");
    showPrediction(result, body, rawScoreText(text, body.score), style);
  }

  function enqueue(result) {
    if (!state.queue.includes(result)) state.queue.push(result);
    pump();
  }

  function pump() {
    while (state.running < MAX_PARALLEL_REQUESTS && state.queue.length) {
      const result = state.queue.shift();
      if (!state.results.includes(result)) continue;
      state.running += 1;
      inspect(result).finally(() => {
        state.running -= 1;
        updateSummary();
        pump();
      });
    }
  }

  function addFiles(fileList) {
    const files = Array.from(fileList || []);
    for (const file of files) {
      const result = newResult(file);
      state.results.push(result);
      elements.results.append(result.element);
      enqueue(result);
    }
    updateSummary();
  }

  function clearResults() {
    for (const result of state.results) URL.revokeObjectURL(result.objectUrl);
    state.results = [];
    state.queue = [];
    elements.results.replaceChildren();
    showBanner("");
    updateSummary();
  }

  // ---------------------------------------------------------------- model, readiness, metrics

  function inputSizeText(model) {
    if (Array.isArray(model.input_size)) return model.input_size.join("×");
    if (model.input_size && typeof model.input_size === "object") {
      return `${model.input_size.width}×${model.input_size.height}`;
    }
    if (model.input_width && model.input_height) return `${model.input_width}×${model.input_height}`;
    return "–";
  }

  async function loadModel() {
    let response;
    try {
      response = await fetch("v1/model", { headers: requestHeaders({ Accept: "application/json" }) });
    } catch (error) {
      elements.modelName.textContent = "server unreachable";
      return;
    }
    if (!response.ok) {
      const message = await errorMessage(response);
      elements.modelName.textContent = response.status === 401 ? "API key needed" : "unavailable";
      elements.modelName.title = message;
      if (response.status === 401) showBanner(message);
      return;
    }
    const model = await response.json();
    const firstLoad = state.model === null;
    state.model = model;
    elements.modelName.textContent = model.name || "–";
    elements.modelName.title = "";
    elements.modelVersion.textContent = model.version || "–";
    elements.modelInput.textContent = inputSizeText(model);
    const batch = model.max_batch_size ? ` · batch ≤ ${model.max_batch_size}` : "";
    elements.modelBackend.textContent = `${model.backend || "–"}${batch}`;
    const threshold = typeof model.threshold === "number" ? model.threshold : null;
    state.modelThreshold = threshold;
    elements.thresholdDefault.textContent =
      threshold === null ? "Model default: none (set one to judge)" : `Model default: ${formatNumber(threshold)}`;
    if (firstLoad) {
      setSliderRange(threshold === null ? 1 : 2 * threshold);
      setThreshold(threshold, "model");
    }
  }

  function parsePrometheus(text) {
    const samples = [];
    for (const line of text.split("\n")) {
      if (!line || line.startsWith("#")) continue;
      const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
      if (!match) continue;
      const labels = {};
      for (const label of (match[2] || "").matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) {
        labels[label[1]] = label[2].replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
      }
      samples.push({ name: match[1], labels, value: Number(match[3]) });
    }
    return samples;
  }

  // Only prediction traffic counts: the page's own polls of /metrics and /health must not look like load.
  function isPredictSample(sample) {
    return sample.labels.route === undefined || sample.labels.route.includes("predict");
  }

  function sumOf(samples, name, predicate = () => true) {
    return samples
      .filter((s) => s.name === name && predicate(s) && Number.isFinite(s.value))
      .reduce((total, s) => total + s.value, 0);
  }

  function metricsSnapshot(text) {
    const samples = parsePrometheus(text);
    return {
      time: performance.now(),
      requests: sumOf(samples, "ead_requests_total", isPredictSample),
      latencySum: sumOf(samples, "ead_request_seconds_sum", isPredictSample),
      latencyCount: sumOf(samples, "ead_request_seconds_count", isPredictSample),
      batchSum: sumOf(samples, "ead_batch_size_sum"),
      batchCount: sumOf(samples, "ead_batch_size_count"),
    };
  }

  function showMetrics(now, before) {
    elements.metricTotal.textContent = String(Math.round(now.requests));
    if (!before) return;
    const seconds = (now.time - before.time) / 1000;
    const requests = now.requests - before.requests;
    if (seconds <= 0 || requests < 0) return; // a restarted server resets its counters
    elements.metricRate.textContent = (requests / seconds).toFixed(1);
    // ead_request_seconds may cover every route; show it only while predictions are being served.
    const latencyCount = now.latencyCount - before.latencyCount;
    elements.metricLatency.textContent =
      requests > 0 && latencyCount > 0
        ? ((1000 * (now.latencySum - before.latencySum)) / latencyCount).toFixed(1)
        : "–";
    const batches = now.batchCount - before.batchCount;
    elements.metricBatch.textContent = batches > 0 ? ((now.batchSum - before.batchSum) / batches).toFixed(2) : "–";
    elements.metricNote.textContent = `Over the last ${seconds.toFixed(1)} s · polling /metrics every 2 s`;
  }

  async function pollMetrics() {
    try {
      const response = await fetch("metrics", { headers: requestHeaders({ Accept: "text/plain" }) });
      if (!response.ok) {
        elements.metricNote.textContent = `/metrics: ${await errorMessage(response)}`;
        return;
      }
      const snapshot = metricsSnapshot(await response.text());
      showMetrics(snapshot, state.previousMetrics);
      state.previousMetrics = snapshot;
    } catch (error) {
      elements.metricNote.textContent = `/metrics unreachable: ${error.message}`;
    }
  }

  async function pollReadiness() {
    const show = (value, text, title = "") => {
      elements.readiness.dataset.state = value;
      elements.readiness.textContent = text;
      elements.readiness.title = title;
    };
    try {
      const response = await fetch("health/ready", { headers: requestHeaders({ Accept: "application/json" }) });
      let body = {};
      try {
        body = await response.json();
      } catch {
        body = {};
      }
      if (response.ok) show("ready", "Ready");
      else show("not-ready", `Not ready (${response.status})`, body.detail || body.status || "");
    } catch (error) {
      show("down", "Server unreachable", error.message);
    }
  }

  async function poll() {
    await Promise.all([pollReadiness(), pollMetrics(), state.model === null ? loadModel() : null]);
    setTimeout(poll, POLL_MS);
  }

  // ---------------------------------------------------------------- API key

  function applyApiKey() {
    const key = elements.apiKey.value.trim();
    if (key) sessionStorage.setItem(API_KEY_STORAGE, key);
    else sessionStorage.removeItem(API_KEY_STORAGE);
    if (key === state.appliedApiKey) return;
    state.appliedApiKey = key;
    showBanner("");
    loadModel();
    for (const result of state.results) if (result.status === 401) enqueue(result); // retry with the new key
  }

  // ---------------------------------------------------------------- wiring

  function wire() {
    elements.dropZone.addEventListener("click", () => elements.fileInput.click());
    elements.fileInput.addEventListener("change", () => {
      addFiles(elements.fileInput.files);
      elements.fileInput.value = ""; // choosing the same file again re-inspects it
    });

    // Drops anywhere on the page count; the drop zone lights up while files are dragged over the window.
    let dragDepth = 0;
    const hasFiles = (event) => Array.from(event.dataTransfer?.types || []).includes("Files");
    window.addEventListener("dragenter", (event) => {
      if (!hasFiles(event)) return;
      dragDepth += 1;
      elements.dropZone.classList.add("dragging");
    });
    window.addEventListener("dragleave", () => {
      dragDepth = Math.max(0, dragDepth - 1);
      if (dragDepth === 0) elements.dropZone.classList.remove("dragging");
    });
    window.addEventListener("dragover", (event) => {
      if (!hasFiles(event)) return;
      event.preventDefault();
      event.dataTransfer.dropEffect = "copy";
    });
    window.addEventListener("drop", (event) => {
      if (!hasFiles(event)) return;
      event.preventDefault();
      dragDepth = 0;
      elements.dropZone.classList.remove("dragging");
      addFiles(event.dataTransfer.files);
    });

    elements.thresholdSlider.addEventListener("input", () => {
      const value = Number(elements.thresholdSlider.value);
      elements.thresholdInput.value = String(value);
      setThreshold(value, "slider");
    });
    elements.thresholdInput.addEventListener("input", onThresholdInput);
    elements.thresholdReset.addEventListener("click", () => setThreshold(state.modelThreshold, "reset"));

    state.heatmapStyle = elements.heatmapStyle.value;
    elements.heatmapStyle.addEventListener("change", () => {
      state.heatmapStyle = elements.heatmapStyle.value;
      // Ask again for every image shown or on its way (a late answer in the old style is dropped).
      for (const result of state.results) if (result.state !== "error") enqueue(result);
    });

    elements.apiKey.value = apiKey();
    state.appliedApiKey = elements.apiKey.value;
    elements.apiKey.addEventListener("change", applyApiKey);
    elements.apiKeyForm.addEventListener("submit", (event) => {
      event.preventDefault(); // Enter in the key field applies it; nothing is sent anywhere else
      applyApiKey();
    });

    elements.clearResults.addEventListener("click", clearResults);
  }

  wire();
  updateSummary();
  loadModel().finally(poll);
})();
