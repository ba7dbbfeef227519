// The contract with the Python SDK (a port of android-demo/core's GoldenTest and CoreTest): on the golden vectors
// `derm golden` wrote beside an exported file, derm-core.js must make the same input tensors (to the byte) from the
// decoded pixels and EXIF orientation, read the same manifest from the file's bytes, and turn the file's raw outputs
// into the same prediction. The folder comes from the environment variable DERM_GOLDEN; without it the golden tests
// are skipped (with the reason) and the rules that hold without vectors still run.
//
//   DERM_GOLDEN=/path/to/golden node --test web/test/core.test.mjs

import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { deflateRawSync } from "node:zlib";
import {
  Manifest, ModelFileError, Predictor, Preprocess, UnsupportedManifestError, readModelFile, weightsSha256,
} from "../derm-core.js";

const dir = process.env.DERM_GOLDEN;
const skip = dir && existsSync(join(dir, "golden.json")) ? false
  : `no golden vectors at ${dir}: set DERM_GOLDEN to a folder \`derm golden\` wrote`;
const doc = skip ? null : JSON.parse(readFileSync(join(dir, "golden.json"), "utf8"));
const read = (name) => new Uint8Array(readFileSync(join(dir, name)));
const modelPath = () => doc.model.file; // relative to the golden folder
const sha256 = async (b) => Buffer.from(await crypto.subtle.digest("SHA-256", b)).toString("hex");

async function modelFile() {
  assert.equal(doc.format, "derm-golden/1");
  const bytes = read(modelPath());
  assert.equal(await sha256(bytes), doc.model.sha256, "the golden vectors were made from another file");
  return readModelFile(bytes, modelPath());
}

test("input tensors are the SDK's to the byte", { skip }, () => {
  const size = doc.input_size, tolerance = doc.tolerance.input_levels;
  for (const c of doc.cases) {
    const d = c.decoded;
    const image = { width: d.width, height: d.height, pixels: read(d.file) };
    const got = Preprocess.tensor(image, d.orientation, size);
    const want = read(c.input);
    assert.equal(got.length, want.length, c.name);
    let differ = 0, worst = 0;
    for (let i = 0; i < want.length; i++) {
      const diff = Math.abs(got[i] - want[i]);
      if (diff > 0) differ++;
      worst = Math.max(worst, diff);
    }
    assert.ok(worst <= tolerance, `${c.name} (${d.width}x${d.height}, orientation ${d.orientation}): ` +
      `${differ} of ${want.length} values differ, by up to ${worst} levels (allowed: ${tolerance})`);
  }
});

test("the manifest is read from the file and matches its outputs", { skip }, async () => {
  const { manifest } = await modelFile();
  assert.equal(manifest.inputSize, doc.input_size);
  assert.ok(manifest.disclaimer.includes("not a diagnostic device"));
  assert.ok(manifest.trainingSummary?.startsWith("Trained on "), `${manifest.trainingSummary}`);
  for (const c of doc.cases) {
    const sizes = Object.fromEntries(Object.entries(c.outputs).map(([k, v]) => [k, v.length]));
    assert.deepEqual(manifest.outputProblems(sizes), [], c.name);
  }
});

test("predictions are the SDK's", { skip }, async () => {
  const { manifest } = await modelFile();
  const predictor = new Predictor(manifest, doc.operating_point, doc.top_k);
  const eps = doc.tolerance.outputs;
  const near = (want, got, what) =>
    assert.ok(Math.abs(want - got) <= eps, `${what}: ${got}, want ${want} (within ${eps})`);
  for (const c of doc.cases) {
    const name = c.name, got = predictor.predict(c.outputs);
    const { source, ...want } = c.prediction;
    assert.deepEqual(Object.keys(got), Object.keys(want), name); // the same shape, in the same order
    assert.deepEqual(Object.keys(got.levels), Object.keys(want.levels), name);
    for (const [level, probs] of Object.entries(want.levels)) {
      assert.deepEqual(Object.keys(got.levels[level]), Object.keys(probs), `${name} ${level}`);
      for (const [label, p] of Object.entries(probs)) near(p, got.levels[level][label], `${name} ${level} ${label}`);
    }
    for (const key of ["tasks", "conditions"]) {
      assert.deepEqual(Object.keys(got[key]), Object.keys(want[key]), `${name} ${key}`);
      for (const [t, p] of Object.entries(want[key])) near(p, got[key][t], `${name} ${key} ${t}`);
    }
    assert.equal(got.top_classes.length, want.top_classes.length, name);
    want.top_classes.forEach(([label, p], i) => {
      assert.equal(got.top_classes[i][0], label, `${name} top ${i}`);
      near(p, got.top_classes[i][1], `${name} top ${i}`);
    });
    assert.deepEqual(got.applies, want.applies, name);
    assert.deepEqual(Object.keys(got.decisions), Object.keys(want.decisions), name);
    for (const [t, d] of Object.entries(want.decisions)) {
      const g = got.decisions[t];
      assert.deepEqual(Object.keys(g), Object.keys(d), `${name} ${t}`);
      near(d.probability, g.probability, `${name} ${t}`);
      for (const k of ["task", "threshold", "positive", "operating_point", "sensitivity", "specificity", "applies"]) {
        assert.equal(g[k], d[k], `${name} ${t} ${k}`); // exact: strings, booleans, the manifest's numbers
      }
    }
  }
  assert.throws(() => new Predictor(manifest, "0.42"), /Operating point 0.42 is not in the manifest/);
});

test("damaged files are named, never read", { skip }, async () => {
  await modelFile(); // the right file
  const bytes = read(modelPath());
  const cut = await readModelFile(bytes.slice(0, bytes.length - 5000), "cut.tflite")
    .then((f) => f.manifest).catch((e) => e);
  assert.ok(cut instanceof ModelFileError && cut.message.includes("cut.tflite"), `${cut}`);
  const onnx = new Uint8Array(68);
  onnx.set([0x08, 0x07, 0x12, 0x04]);
  await assert.rejects(readModelFile(onnx, "renamed.tflite"),
    (e) => e instanceof ModelFileError && /renamed.tflite .*ONNX/.test(e.message));
  const zip = new Uint8Array([0x50, 0x4b, 3, 4, 0, 0, 0, 0]);
  await assert.rejects(readModelFile(zip, "m.zip"), /looks like a zip archive/);
});

test("the weights are verified and a flipped bit is refused", { skip }, async (t) => {
  const bytes = read(modelPath());
  const file = await readModelFile(bytes, "model.tflite");
  if (file.manifest.weightsSha256 == null) {
    return t.skip("this file was exported before derm recorded a weights digest");
  }
  assert.equal(await weightsSha256(bytes), file.manifest.weightsSha256);
  assert.ok((await file.verify()).startsWith("weights verified"));
  const flipped = bytes.slice();
  flipped[flipped.length >> 1] ^= 1; // inside the weights
  await assert.rejects((await readModelFile(flipped, "flipped.tflite")).verify(),
    (e) => e instanceof ModelFileError && e.message.includes("damaged or was altered"));
});

// ---- rules that hold without golden vectors: orientation, the box reduction, manifests of other versions, zip.

const image = (w, h) => ({
  width: w, height: h, pixels: Uint8Array.from({ length: w * h * 3 }, (_, i) => i * 7 % 251),
});
const at = (im, x, y, c) => im.pixels[(y * im.width + x) * 3 + c];

test("orientations compose like rotations", () => {
  const im = image(5, 3), o = Preprocess.orient;
  const cw = o(im, 6);
  assert.equal(cw.width, 3);
  assert.equal(cw.height, 5);
  assert.deepEqual(o(cw, 8).pixels, im.pixels); // 90 clockwise then 90 counter-clockwise
  assert.deepEqual(o(o(im, 3), 3).pixels, im.pixels);
  assert.deepEqual(o(o(im, 2), 2).pixels, im.pixels);
  assert.deepEqual(o(o(im, 4), 4).pixels, im.pixels);
  assert.deepEqual(o(o(im, 5), 5).pixels, im.pixels);
  assert.deepEqual(o(o(im, 7), 7).pixels, im.pixels);
  assert.deepEqual(o(o(im, 6), 6).pixels, o(im, 3).pixels);
  assert.deepEqual(o(o(im, 2), 6).pixels, o(im, 7).pixels);
  assert.equal(at(cw, 0, 0, 0), at(im, 0, 2, 0)); // the top-left pixel of a photo taken rotated is its bottom-left one
});

test("reduction is the rounded mean of each block", () => {
  const px = new Uint8Array(3 * 3 * 3);
  for (let i = 0; i < 9; i++) px[i * 3] = i * 10; // red: 0, 10, ..., 80
  const r = Preprocess.reduce({ width: 3, height: 3, pixels: px }, 2);
  assert.equal(r.width, 2);
  assert.equal(r.height, 2);
  assert.equal(at(r, 0, 0, 0), Math.trunc((0 + 10 + 30 + 40 + 2) / 4)); // full block
  assert.equal(at(r, 1, 0, 0), Math.trunc((20 + 50 + 1) / 2)); // the right edge's partial block
  assert.equal(at(r, 1, 1, 0), 80); // the corner
});

test("a resize to the same size changes nothing; RGBA round-trips", () => {
  const im = image(4, 4);
  assert.deepEqual(Preprocess.resize(im, 4).pixels, im.pixels);
  const rgba = Preprocess.toRGBA(im);
  assert.equal(rgba[3], 255);
  assert.deepEqual(Preprocess.fromRGBA(4, 4, rgba).pixels, im.pixels);
  assert.throws(() => Preprocess.tensor({ width: 4, height: 4, pixels: new Uint8Array(5) }, 1, 2), /take 48 bytes/);
});

test("a tall image is resized vertically first, as Pillow 13 does", () => {
  // The height loses more than twice the pixels the width does: Pillow 13 (the SDK's pin) starts with the vertical
  // pass. Horizontal first would give 118, 126, 144 at bytes 4-6 and 119 at byte 23. Expected bytes from Pillow 13.
  const im = { width: 7, height: 23, pixels: Uint8Array.from({ length: 7 * 23 * 3 }, (_, i) => i * 37 % 256) };
  assert.deepEqual([...Preprocess.bilinear(im, 3, 3).pixels], [
    101, 113, 138, 134, 117, 125, 143, 147, 119, 135, 129, 120, 124, 137, 130, 126, 117, 131, 124, 130, 149, 135, 111,
    120, 129, 132, 115,
  ]);
});

test("manifests of another format or shape are refused", () => {
  assert.throws(() => Manifest.parse('{"format": "derm-manifest/9"}', "m.tflite"),
    (e) => e instanceof UnsupportedManifestError && e.message.includes("derm-manifest/9"));
  const refused = (pattern) => (e) => e instanceof ModelFileError && pattern.test(e.message);
  assert.throws(() => Manifest.parse('{"labels": []}', "m.tflite"), refused(/no 'format'/));
  assert.throws(() => Manifest.parse("not json", "m.tflite"), refused(/not valid JSON/));
  assert.throws(() => Manifest.parse('{"format": "derm-manifest/1", "input": {"shape": [1, 8, 9, 3]}}', "m.tflite"),
    /input shape \[1,8,9,3\] is not \[1, S, S, 3\]/);
  assert.throws(() => Manifest.parse('{"format": "derm-manifest/1"}', "m.tflite"), /not what derm-export writes/);
  const m = Manifest.parse(`{"format": "derm-manifest/1", "input": {"shape": [1, 8, 8, 3]},
    "outputs": [{"name": "probs_three", "kind": "level", "labels": ["benign", "malignant", "non_neoplastic"]}]}`,
  "m.tflite");
  assert.deepEqual(m.levels, ["three"]);
  assert.deepEqual(m.outputProblems({ probs_three: 2 }), ["output probs_three has 2 values, the manifest names 3"]);
  assert.deepEqual(m.outputProblems({ probs_three: 3, extra: 1 }), ["output extra is not in the manifest"]);
  assert.ok(m.disclaimer.includes("not a diagnostic device"));
  assert.equal(m.weightsSha256, null);
});

/** A fake model: 'TFL3' at bytes 4-8, then a zip whose one entry is a deflated manifest (zip method 8). */
function deflatedModel(manifestText) {
  const name = Buffer.from("manifest.json"), data = Buffer.from(manifestText), packed = deflateRawSync(data);
  const head = Buffer.from([0x1c, 0, 0, 0, 0x54, 0x46, 0x4c, 0x33, 0, 0, 0, 0]); // a flatbuffer's first bytes
  const local = Buffer.alloc(30);
  local.writeUInt32LE(0x04034b50, 0); local.writeUInt16LE(8, 8);
  local.writeUInt32LE(packed.length, 18); local.writeUInt32LE(data.length, 22); local.writeUInt16LE(name.length, 26);
  const central = Buffer.alloc(46);
  central.writeUInt32LE(0x02014b50, 0); central.writeUInt16LE(8, 10);
  central.writeUInt32LE(packed.length, 20); central.writeUInt32LE(data.length, 24);
  central.writeUInt16LE(name.length, 28);
  const cdOffset = 30 + name.length + packed.length; // relative to the archive, which starts after the flatbuffer
  const end = Buffer.alloc(22);
  end.writeUInt32LE(0x06054b50, 0); end.writeUInt16LE(1, 8); end.writeUInt16LE(1, 10);
  end.writeUInt32LE(46 + name.length, 12); end.writeUInt32LE(cdOffset, 16);
  return new Uint8Array(Buffer.concat([head, local, name, packed, central, name, end]));
}

test("deflated metadata entries are inflated; a damaged one is named", async () => {
  const text = JSON.stringify({ format: "derm-manifest/1", input: { shape: [1, 8, 8, 3] }, outputs: [] });
  const bytes = deflatedModel(text);
  const file = await readModelFile(bytes, "small.tflite");
  assert.deepEqual([...file.associatedFiles.keys()], ["manifest.json"]);
  assert.equal(file.manifest.inputSize, 8);
  assert.equal(await file.verify(),
    "weights not verified: the file was exported before derm recorded a weights digest");
  const broken = bytes.slice();
  broken.fill(0xff, 12 + 30 + 13, 12 + 30 + 13 + 4); // the deflate stream's first bytes
  await assert.rejects(readModelFile(broken, "broken.tflite"),
    /broken.tflite: its metadata \(entry manifest.json\) cannot be read/);
});
