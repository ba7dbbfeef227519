// The derm core for the browser: a port of android-demo/core (derm.core) to one dependency-free ES module that runs
// unchanged in a browser and in Node 20. The Python SDK stays the reference; the golden vectors `derm golden` writes
// are the contract (web/test/core.test.mjs).
// One import for the app; the parts live in core/.
export { ModelFileError, UnsupportedManifestError } from "./core/errors.js";
export { Manifest, Predictor } from "./core/manifest.js";
export { readModelFile, weightsSha256 } from "./core/model-file.js";
export { Preprocess } from "./core/preprocess.js";
