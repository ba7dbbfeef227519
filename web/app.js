// The page: loads the exported file, reads everything it shows from the file's manifest (labels, levels, tasks,
// operating points, the disclaimer), preprocesses each image exactly as the Python SDK does, and runs it on this
// device. Research and triage aid, not a diagnostic device.
import { ModelFileError, Predictor, Preprocess, readModelFile } from "./derm-core.js";
import { Runtime } from "./runtime.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);

/** State the page's own tests read (tests/test_web.py): what was shown, from which tensors. */
const derm = (window.derm = { state: "loading", error: null, model: null, results: [], violations: [], loads: 0 });
let current = null; // {file, manifest, runtime, predictor, name}

document.addEventListener("securitypolicyviolation", (e) => {
  derm.violations.push({ blocked: e.blockedURI, directive: e.violatedDirective }); // e.g. MediaPipe's metrics POST
});

function showError(message) {
  derm.error = message;
  $("error").textContent = message;
  $("error").hidden = !message;
}

/** The browser applies the EXIF orientation here (as the SDK does before resizing); no colour management, so the
 *  pixels are the file's, as Pillow decodes them. */
const decode = (blob) =>
  createImageBitmap(blob, { imageOrientation: "from-image", colorSpaceConversion: "none", premultiplyAlpha: "none" });

async function decodeToRgb(blob) {
  const bitmap = await decode(blob);
  try {
    const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    ctx.drawImage(bitmap, 0, 0);
    const { data } = ctx.getImageData(0, 0, bitmap.width, bitmap.height);
    return Preprocess.fromRGBA(bitmap.width, bitmap.height, data);
  } finally {
    bitmap.close();
  }
}

async function loadModel(bytes, name, delegate) {
  const file = await readModelFile(bytes, name);
  const manifest = file.manifest;
  const verified = await file.verify();
  // One run on a mid-grey image: warms the runtime up and gives the tensors to check against the manifest's outputs.
  // The GPU delegate can fail here rather than at load (an operator it lacks), so both are tried together.
  const size = manifest.inputSize;
  const grey = new ImageData(new Uint8ClampedArray(size * size * 4).fill(128), size, size);
  const start = async (on) => {
    const rt = await Runtime.load(bytes, manifest, on);
    try {
      return [rt, rt.classify(grey)];
    } catch (e) {
      rt.close();
      throw e;
    }
  };
  let runtime, outputs;
  let notice = "";
  try {
    [runtime, outputs] = await start(delegate);
  } catch (e) {
    if (delegate !== "GPU") throw new ModelFileError(`${name}: MediaPipe cannot run this file (${firstLine(e)}).`);
    [runtime, outputs] = await start("CPU"); // the GPU delegate cannot run it here: say so, carry on
    notice = `The GPU delegate cannot run ${name} in this browser (${firstLine(e)}); running on the CPU.`;
  }
  const problems = manifest.outputProblems(Object.fromEntries(Object.entries(outputs).map(([k, v]) => [k, v.length])));
  if (problems.length) {
    runtime.close();
    throw new ModelFileError(`${name} does not match its own manifest: ${problems.join("; ")}. Re-export it.`);
  }
  return { file, manifest, runtime, name, verified, bytes, notice };
}

async function useModel(bytes, name) {
  try {
    await switchModel(bytes, name);
  } finally {
    derm.loads++;
  }
}

async function switchModel(bytes, name) {
  derm.state = "loading";
  $("model-status").textContent = `Loading ${name}…`;
  const delegate = $("use-gpu").checked ? "GPU" : "CPU";
  let next;
  try {
    next = await loadModel(bytes, name, delegate);
  } catch (e) {
    derm.state = current ? "ready" : "error";
    showError(e instanceof ModelFileError ? e.message : `${name} cannot be used: ${e.message ?? e}`);
    $("model-status").textContent = current ? `Still using ${current.name}.` : "No model loaded.";
    return;
  }
  current?.runtime.close();
  current = next;
  showError(next.notice);
  showModel();
  derm.model = { name, inputSize: next.manifest.inputSize, levels: next.manifest.levels, verified: next.verified,
    delegate: next.runtime.delegate, wasm: Runtime.wasmBinary, notice: next.notice };
  derm.state = "ready";
}

function showModel() {
  const m = current.manifest;
  $("disclaimer").textContent = m.disclaimer;
  $("model-status").textContent = `${current.name}: ${m.levels.join(" / ")} levels, ${m.tasks.length} tasks, ` +
    `${current.runtime.delegate}; ${current.verified}.`;
  const facts = [["Trained on", m.trainingSummary ?? "not recorded"], ["Input", `${m.inputSize} px RGB`],
    ["Created", m.json.created ?? "?"], ["derm", m.json.versions?.derm ?? "?"]];
  $("model-facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", k), el("dd", v)]));
  $("model-details").hidden = false;
  const points = [...new Set(m.tasks.flatMap((t) => [...t.operatingPoints.keys()]))].sort();
  const chosen = params.get("op") ?? (points.includes("0.9") ? "0.9" : points[0]);
  $("operating-point").replaceChildren(...points.map((p) => {
    const o = el("option", `${Math.round(Number(p) * 100)}% sensitivity`);
    o.value = p;
    o.selected = p === chosen;
    return o;
  }));
  $("operating-point").disabled = points.length === 0;
  current.predictor = new Predictor(m, chosen ?? "0.9");
}

function firstLine(e) {
  return String(e.message ?? e).split("\n")[0].slice(0, 300);
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

function pct(p) {
  return `${(100 * p).toFixed(p >= 0.995 || p < 0.005 ? 0 : 1)}%`;
}

async function classify(source, name) {
  if (!current) {
    showError(`${name} was not classified: no model is loaded. Choose one with “Other model…”.`);
    return;
  }
  showError("");
  try {
    const t0 = performance.now();
    const rgb = source instanceof Blob ? await decodeToRgb(source) : source;
    const t1 = performance.now();
    const size = current.manifest.inputSize;
    const input = Preprocess.tensor(rgb, 1, size);
    const image = new ImageData(Preprocess.toRGBA({ width: size, height: size, pixels: input }), size, size);
    const t2 = performance.now();
    const outputs = current.runtime.classify(image);
    const t3 = performance.now();
    const prediction = current.predictor.predict(outputs);
    const timings = { decode_ms: t1 - t0, preprocess_ms: t2 - t1, inference_ms: t3 - t2 };
    render(name, image, prediction, timings, rgb);
    derm.results.push({ name, width: rgb.width, height: rgb.height, input, outputs, prediction, timings,
      operatingPoint: current.predictor.operatingPoint });
  } catch (e) {
    showError(`${name} could not be classified: ${e.message ?? e}`);
  }
}

function render(name, image, prediction, timings, rgb) {
  const m = current.manifest;
  $("picture").width = image.width;
  $("picture").height = image.height;
  $("picture").getContext("2d").putImageData(image, 0, 0);
  $("source").textContent = `${name} (${rgb.width}x${rgb.height})`;
  $("levels").replaceChildren(...m.levels.map((level) => {
    const spec = m.output(`probs_${level}`);
    const probs = prediction.levels[level];
    const best = Math.max(...Object.values(probs));
    const box = el("div", undefined, "level");
    box.append(el("h2", `${spec.labels.length} classes`));
    spec.labels.forEach((label, i) => box.append(bar(spec.names[i] ?? label, probs[label], probs[label] === best)));
    return box;
  }));
  const tasks = [el("h2", "Binary tasks")];
  for (const task of m.tasks) {
    const d = prediction.decisions[task.id];
    if (!d) continue;
    const row = el("p", undefined, `task${d.applies ? (d.positive ? " positive" : "") : " na"}`);
    const call = d.positive ? `above` : `below`;
    const point = d.sensitivity == null ? d.operating_point
      : `threshold for ${pct(Number(d.operating_point))} sensitivity (measured: sensitivity ${pct(d.sensitivity)}, ` +
        `specificity ${pct(d.specificity)} on the run's held-out images)`;
    row.append(el("strong", `${task.name}: ${d.probability.toFixed(3)}`),
      ` ${call} ${d.threshold.toFixed(3)}, the ${point}.`);
    if (!d.applies) row.append(` Does not apply: the image is unlikely to be ${task.condition ?? "in this task"}.`);
    tasks.push(row);
  }
  $("tasks").replaceChildren(...tasks);
  const training = m.outputs.find((o) => o.kind === "training");
  const named = (label) => training?.names[training.labels.indexOf(label)] ?? label;
  $("top").replaceChildren(el("h2", "Most likely training classes"),
    ...prediction.top_classes.map(([label, p]) => bar(named(label), p, false)));
  $("latency").textContent = `On this device (${current.runtime.delegate}): inference ` +
    `${timings.inference_ms.toFixed(0)} ms, decode ${timings.decode_ms.toFixed(0)} ms, preprocessing ` +
    `${timings.preprocess_ms.toFixed(0)} ms.`;
  $("result").hidden = false;
}

function bar(label, p, top) {
  const row = el("div", undefined, `row${top ? " top" : ""}`);
  const fill = el("span");
  fill.style.width = `${(100 * p).toFixed(1)}%`;
  const track = el("div", undefined, "bar");
  track.append(fill);
  row.append(el("span", label), track, el("span", pct(p), "p"));
  return row;
}

// ------------------------------------------------------------------------------------------------------ camera
let stream = null;

async function startCamera() {
  showError("");
  try {
    stream = await navigator.mediaDevices.getUserMedia({ video: { facingMode: { ideal: "environment" } }, audio: false });
  } catch (e) {
    showError(`The camera is not available (${e.name}: ${e.message}). Choose an image file instead.`);
    return;
  }
  $("video").srcObject = stream;
  await $("video").play();
  $("camera").hidden = false;
}

function stopCamera() {
  stream?.getTracks().forEach((t) => t.stop());
  stream = null;
  $("camera").hidden = true;
}

function shoot() {
  const video = $("video");
  const canvas = new OffscreenCanvas(video.videoWidth, video.videoHeight);
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(video, 0, 0);
  const { data } = ctx.getImageData(0, 0, canvas.width, canvas.height);
  classify(Preprocess.fromRGBA(canvas.width, canvas.height, data), `camera ${new Date().toLocaleTimeString()}`);
}

/** Times `n` inferences on the last image (after two warm-up runs): the latency benchmark's measurement. */
derm.benchmark = (n) => {
  const last = derm.results.at(-1);
  const size = current.manifest.inputSize;
  const image = new ImageData(Preprocess.toRGBA({ width: size, height: size, pixels: last.input }), size, size);
  for (let i = 0; i < 2; i++) current.runtime.classify(image);
  const ms = [];
  for (let i = 0; i < n; i++) {
    const t = performance.now();
    current.runtime.classify(image);
    ms.push(performance.now() - t);
  }
  ms.sort((a, b) => a - b);
  return { n, ms, median_ms: ms[Math.floor(n / 2)], min_ms: ms[0], delegate: current.runtime.delegate };
};
/** The file's outputs when MediaPipe resizes the whole image itself (its stretch, no antialiasing) instead of the
 *  SDK's preprocessing: what the app would answer without derm-core.js (the benchmark measures the gap). */
derm.classifyWithMediaPipeResize = async (blob) => {
  const bitmap = await decode(blob);
  try {
    return current.runtime.classify(bitmap, { anySize: true });
  } finally {
    bitmap.close();
  }
};
/** Loads the current file again (closing the old runtime, as switching delegates does). */
derm.reload = () => useModel(current.bytes, current.name);

// ------------------------------------------------------------------------------------------------------- start
$("image-input").addEventListener("change", async (e) => {
  for (const f of e.target.files) await classify(f, f.name);
  e.target.value = "";
});
$("model-input").addEventListener("change", async (e) => {
  const f = e.target.files[0];
  e.target.value = "";
  if (f) await useModel(new Uint8Array(await f.arrayBuffer()), f.name);
});
$("operating-point").addEventListener("change", (e) => {
  if (current) current.predictor = new Predictor(current.manifest, e.target.value);
});
$("use-gpu").checked = params.get("delegate") === "GPU";
$("use-gpu").addEventListener("change", () => current && useModel(current.bytes, current.name));
$("camera-start").addEventListener("click", startCamera);
$("camera-stop").addEventListener("click", stopCamera);
$("camera-shoot").addEventListener("click", shoot);

if ("serviceWorker" in navigator) {
  // Keeps the app, MediaPipe's WASM and the model for offline use; failure only costs the offline copy.
  derm.serviceWorker = navigator.serviceWorker.register("./sw.js").then(() => navigator.serviceWorker.ready)
    .catch((e) => console.warn("no offline copy:", e));
}

(async () => {
  let bytes;
  try {
    const res = await fetch("./model.tflite");
    if (!res.ok) throw new Error(`HTTP ${res.status}`);
    bytes = new Uint8Array(await res.arrayBuffer());
  } catch (e) {
    derm.state = "error";
    showError(`The model (model.tflite) could not be loaded: ${e.message}. Serve the app with \`derm web --model ` +
      "FILE\`, or choose a model with “Other model…”.");
    $("model-status").textContent = "No model loaded.";
    return;
  }
  await useModel(bytes, "model.tflite");
})();
