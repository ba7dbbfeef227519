// The file's raw outputs from MediaPipe Tasks' ImageClassifier: the .tflite runs in MediaPipe's WASM (XNNPACK, SIMD
// where the browser has it) or on its GPU delegate. Everything is loaded from this page's origin.
import { FilesetResolver, ImageClassifier } from "./vendor/tasks-vision/vision_bundle.mjs";

const WASM = new URL("./vendor/tasks-vision/wasm", import.meta.url).href;
let fileset = null;

/**
 * One loaded model. `classify` takes an ImageData already made to the model's input size by the SDK's preprocessing
 * (derm-core.js), so MediaPipe's own resize is the identity and the file sees the SDK's input tensor; it returns the
 * values of every output head by tensor name, the way the Python SDK reads them from the interpreter.
 */
export class Runtime {
  constructor(classifier, manifest, delegate) {
    this.classifier = classifier;
    this.manifest = manifest;
    this.delegate = delegate;
  }

  /** Loads `bytes` (a derm .tflite) on `delegate` ("CPU" or "GPU"); throws when MediaPipe cannot run it. */
  static async load(bytes, manifest, delegate = "CPU") {
    fileset ??= await FilesetResolver.forVisionTasks(WASM);
    const classifier = await ImageClassifier.createFromOptions(fileset, {
      baseOptions: { modelAssetBuffer: bytes, delegate },
      runningMode: "IMAGE",
      maxResults: -1, // every class of every head, not a top-k
    });
    return new Runtime(classifier, manifest, delegate);
  }

  /** Where the SIMD variant of MediaPipe's WASM is in use (it is picked from what the browser validates). */
  static get wasmBinary() {
    return fileset?.wasmBinaryPath ?? null;
  }

  /** output name -> Float32Array, one value per label, in the file's label order. */
  classify(imageData, { anySize = false } = {}) {
    const size = this.manifest.inputSize;
    if (!anySize && (imageData.width !== size || imageData.height !== size)) {
      throw new Error(`The model takes ${size}x${size} images; got ${imageData.width}x${imageData.height}.`);
    }
    const result = this.classifier.classify(imageData);
    const outputs = {};
    for (const head of result.classifications) {
      const values = new Float32Array(head.categories.length);
      for (const c of head.categories) values[c.index] = c.score;
      outputs[head.headName] = values;
    }
    return outputs;
  }

  close() {
    this.classifier.close();
  }
}
