// The manifest derm-export embeds, and the prediction the SDK makes from the file's raw outputs. A port of
// android-demo/core's Manifest and Prediction.
import { ModelFileError, UnsupportedManifestError } from "./errors.js";

// ---- org.json's accessors, as far as the manifest needs them: the same leniency and the same failures.
class JsonError extends Error {}
const isObj = (v) => v !== null && typeof v === "object" && !Array.isArray(v);
const optObj = (o, k) => (isObj(o?.[k]) ? o[k] : null);
const optString = (o, k, fallback = "") =>
  (o[k] == null ? fallback : typeof o[k] === "string" ? o[k] : JSON.stringify(o[k]));
const optNumber = (o, k, fallback) => {
  const v = o[k];
  const n = typeof v === "number" ? v : typeof v === "string" && v.trim() !== "" ? Number(v) : NaN;
  return Number.isNaN(n) ? fallback : n;
};
function get(o, k, what, ok) {
  const where = Array.isArray(o) ? `JSONArray[${k}]` : `JSONObject[${JSON.stringify(k)}]`;
  if (o[k] == null) throw new JsonError(`${where} not found.`);
  if (!ok(o[k])) throw new JsonError(`${where} is not a ${what}.`);
  return o[k];
}
const getObj = (o, k) => get(o, k, "JSONObject", isObj);
const getArray = (o, k) => get(o, k, "JSONArray", Array.isArray);
const getString = (o, k) => String(get(o, k, "string", (v) => ["string", "number", "boolean"].includes(typeof v)));
const getNumber = (o, k) => Number(get(o, k, "number", (v) => !Number.isNaN(optNumber({ v }, "v", NaN))));
const getInt = (o, k) => Math.trunc(getNumber(o, k));
const strings = (o, k) => (Array.isArray(o[k]) ? o[k].map((_, i) => getString(o[k], i)) : []);

/**
 * The manifest `derm-export` embeds in every file: what the app must do before the model, what each output means,
 * the tasks and their operating points, and the disclaimer. Outputs are `{name, kind, labels, names, task}`; a task is
 * `{id, name, condition, positiveName, positiveClasses, negativeClasses, conditionThreshold, operatingPoints}` with
 * operatingPoints a Map from target sensitivity ("0.9") to `{threshold, sensitivity, specificity}`.
 */
export class Manifest {
  static FORMAT = "derm-manifest/1";
  static DEFAULT_CONDITION_THRESHOLD = 0.5;
  static DEFAULT_DISCLAIMER =
    "A research and triage aid, not a diagnostic device: it does not replace examination by a clinician.";

  /** Reads a manifest's text, refusing other formats before anything else is trusted. */
  static parse(text, source = "the manifest") {
    let json;
    try {
      json = JSON.parse(text);
      if (!isObj(json)) throw new SyntaxError("A JSONObject text must begin with '{'");
    } catch (e) {
      throw new ModelFileError(`${source}: its manifest is not valid JSON (${e.message}).`);
    }
    const format = optString(json, "format", "");
    if (format === "") throw new ModelFileError(`${source}: the manifest has no 'format'; not a derm manifest.`);
    if (format !== Manifest.FORMAT) {
      throw new UnsupportedManifestError(
        `${source}: manifest format '${format}' is newer or other than this app reads (${Manifest.FORMAT}). Update ` +
        "the app, or export the model with the derm version this app was built for.");
    }
    return new Manifest(json, source);
  }

  /** Use Manifest.parse: the constructor trusts that the format was checked. */
  constructor(json, source) {
    this.json = json;
    this.format = optString(json, "format");
    /** The sha256 of the file's tensor buffers recorded at export (null in files exported before it was). */
    this.weightsSha256 = optString(optObj(json, "integrity") ?? {}, "weights_sha256", "") || null;
    try {
      /** What the model was trained on, in one line for the screen (from the manifest's `training.data`). */
      this.trainingSummary = summary(optObj(optObj(json, "training"), "data"));
      const input = getObj(json, "input");
      const shape = getArray(input, "shape");
      this.inputSize = getInt(shape, 1);
      this.inputName = optString(input, "name", "image");
      if (shape.length !== 4 || getInt(shape, 2) !== this.inputSize || getInt(shape, 3) !== 3) {
        throw new ModelFileError(`${source}: the manifest's input shape ${JSON.stringify(shape)} is not [1, S, S, 3].`);
      }
      const points = optObj(json, "operating_points") ?? {};
      const outs = getArray(json, "outputs");
      this.outputs = outs.map((_, i) => {
        const o = getObj(outs, i);
        const t = optObj(o, "task");
        return { name: getString(o, "name"), kind: getString(o, "kind"), labels: strings(o, "labels"),
          names: strings(o, "names"), task: t ? parseTask(t, points) : null };
      });
      this.disclaimer = optString(json, "disclaimer", Manifest.DEFAULT_DISCLAIMER) || Manifest.DEFAULT_DISCLAIMER;
    } catch (e) {
      if (!(e instanceof JsonError)) throw e;
      throw new ModelFileError(`${source}: the manifest is not what derm-export writes (${e.message}).`);
    }
    /** Inference levels baked into the file, e.g. ["three", "nine"]. */
    this.levels = this.outputs.filter((o) => o.kind === "level").map((o) => o.name.replace(/^probs_/, ""));
    this.tasks = this.outputs.filter((o) => o.task).map((o) => o.task);
    const training = this.outputs.find((o) => o.kind === "training");
    for (const task of this.tasks) {
      const missing = [...task.positiveClasses, ...task.negativeClasses].filter((c) => !training?.labels.includes(c));
      if (missing.length) {
        throw new ModelFileError(
          `${source}: the manifest's task ${task.id} names training classes [${missing.join(", ")}] that its ` +
          "training_probs output lacks; the file is inconsistent. Re-export it with derm-export.");
      }
    }
  }

  output(name) { return this.outputs.find((o) => o.name === name) ?? null; }

  /**
   * What is wrong between the manifest and the tensors the interpreter reports (name -> number of values per
   * image); empty when they match. An app refuses a file with problems instead of showing mislabelled numbers.
   */
  outputProblems(actual) {
    const sizes = actual instanceof Map ? actual : new Map(Object.entries(actual));
    const problems = [];
    for (const o of this.outputs) {
      const n = sizes.get(o.name);
      if (n == null) problems.push(`output ${o.name} is missing from the model`);
      else if (n !== o.labels.length) {
        problems.push(`output ${o.name} has ${n} values, the manifest names ${o.labels.length}`);
      }
    }
    const named = new Set(this.outputs.map((o) => o.name));
    for (const name of sizes.keys()) if (!named.has(name)) problems.push(`output ${name} is not in the manifest`);
    return problems;
  }
}

function summary(d) {
  if (!d) return null;
  const labels = optObj(d, "labels") ?? {};
  const counts = Object.keys(labels).map((k) => [k, getInt(labels, k)]).sort((a, b) => b[1] - a[1]); // stable
  const shown = counts.slice(0, 5).map(([k, n]) => `${k} ${n}`).join(", ") + (counts.length > 5 ? ", ..." : "");
  return `Trained on ${Math.trunc(optNumber(d, "images", 0))} labelled images, ${counts.length} diagnoses (${shown})`;
}

function parseTask(t, points) {
  const id = getString(t, "id");
  const by = optObj(optObj(points, id), "by_sensitivity") ?? {};
  const operatingPoints = new Map(Object.keys(by).map((k) => {
    const p = getObj(by, k);
    const opt = (key) => (p[key] == null ? null : optNumber(p, key, NaN)); // null: not measured
    return [k, { threshold: getNumber(p, "threshold"), sensitivity: opt("sensitivity"),
      specificity: opt("specificity") }];
  }));
  return {
    id, name: optString(t, "name", id),
    /** The task's condition in words; null in files exported before the manifest said it. */
    condition: t.condition == null ? null : getString(t, "condition"),
    positiveName: t.positive_name == null ? null : getString(t, "positive_name"),
    /** Training classes whose probabilities form the condition (positive + negative); empty: always applies. */
    positiveClasses: strings(t, "positive_classes"), negativeClasses: strings(t, "negative_classes"),
    conditionThreshold: optNumber(t, "condition_threshold", Manifest.DEFAULT_CONDITION_THRESHOLD), operatingPoints,
  };
}

/**
 * Turns the file's raw outputs (name -> values for one image) into the SDK's prediction, shaped as its
 * `Prediction.to_dict()` (less `source`): the same levels, tasks, top classes, conditions and calls at the manifest's
 * operating point. The model does the arithmetic (the aggregation is baked into the file); this only names, sums and
 * compares. Values are taken as float32, as the interpreter gives them, then summed in double as Kotlin and numpy do.
 */
export class Predictor {
  /** The manifest's threshold aiming at 90% sensitivity on the run's held-out images. */
  static DEFAULT_OPERATING_POINT = "0.9";
  static NO_POINT = "default 0.5 (no operating point in file)";

  constructor(manifest, operatingPoint = Predictor.DEFAULT_OPERATING_POINT, topK = 3) {
    for (const task of manifest.tasks) {
      if (task.operatingPoints.size && !task.operatingPoints.has(operatingPoint)) {
        throw new Error(`Operating point ${operatingPoint} is not in the manifest for ${task.id}; it has ` +
          [...task.operatingPoints.keys()].sort().join(", ") + " (target sensitivities).");
      }
    }
    Object.assign(this, { manifest, operatingPoint, topK });
  }

  predict(outputs) {
    const m = this.manifest;
    const values = (name) => {
      const v = outputs instanceof Map ? outputs.get(name) : outputs[name];
      if (v == null) throw new ModelFileError(`The model gave no output ${name}, which its manifest names.`);
      return v instanceof Float32Array ? v : Float32Array.from(v);
    };
    const levels = {};
    for (const level of m.levels) {
      const spec = m.output(`probs_${level}`), v = values(spec.name);
      levels[level] = Object.fromEntries(spec.labels.map((label, i) => [label, v[i]]));
    }
    const tasks = {};
    for (const o of m.outputs) {
      if (o.kind !== "task") continue;
      if (!o.task) throw new ModelFileError(`The manifest's output ${o.name} is a task output without a task.`);
      tasks[o.task.id] = values(o.name)[0];
    }
    const training = m.outputs.find((o) => o.kind === "training");
    let topClasses = [];
    const conditions = {};
    if (training) {
      const p = values(training.name);
      topClasses = [...p.keys()].sort((a, b) => (p[b] > p[a] ? 1 : p[b] < p[a] ? -1 : a - b))
        .slice(0, Math.max(0, this.topK)).map((i) => [training.labels[i], p[i]]);
      for (const task of m.tasks) {
        if (!Object.hasOwn(tasks, task.id) || !task.positiveClasses.length || !task.negativeClasses.length) continue;
        let sum = 0;
        for (const c of [...task.positiveClasses, ...task.negativeClasses]) sum += p[training.labels.indexOf(c)];
        conditions[task.id] = sum;
      }
    }
    const byId = new Map(m.tasks.map((t) => [t.id, t]));
    const applies = {}, decisions = {};
    for (const t of Object.keys(tasks)) {
      applies[t] = !Object.hasOwn(conditions, t) || conditions[t] >= byId.get(t).conditionThreshold;
    }
    for (const [t, q] of Object.entries(tasks)) decisions[t] = this.decide(byId.get(t), q, applies[t]);
    return { levels, tasks, top_classes: topClasses, decisions, conditions, applies };
  }

  /** The call for one task's probability at this predictor's operating point (the SDK's `Decision`, as a dict). */
  decide(task, probability, applies = true) {
    const point = task.operatingPoints.get(this.operatingPoint);
    const [threshold, op, sensitivity, specificity] = point
      ? [point.threshold, this.operatingPoint, point.sensitivity, point.specificity]
      : [0.5, Predictor.NO_POINT, null, null];
    return { task: task.id, probability, threshold, positive: probability >= threshold, operating_point: op,
      sensitivity, specificity, applies };
  }
}
