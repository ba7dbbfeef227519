// A derm-export .tflite read from its bytes: the appended zip of associated files (labels, manifest) and the
// weights digest the manifest recorded. A port of android-demo/core's ModelFile and WeightsDigest.
import { ModelFileError } from "./errors.js";
import { Manifest } from "./manifest.js";

const MANIFEST_FILE = "manifest.json";
const utf8 = new TextDecoder("utf-8");
const view = (b) => new DataView(b.buffer, b.byteOffset, b.byteLength);
const hex = (buf) => Array.from(new Uint8Array(buf), (x) => x.toString(16).padStart(2, "0")).join("");

/**
 * The bytes of a `.tflite` file written by `derm-export`: a TFLite flatbuffer with the standard metadata, whose
 * associated files (the labels and `manifest.json`) form a zip archive appended to the flatbuffer. Everything an app
 * needs to know about the model is read from here: no app keeps a second list. Async only because inflating a
 * deflated entry is (DecompressionStream); the manifest itself is read on first use of `.manifest`, as in Kotlin.
 */
export async function readModelFile(bytes, name = "model") {
  if (bytes.length < 8 || String.fromCharCode(...bytes.subarray(4, 8)) !== "TFL3") {
    const hint = bytes.length >= 2 && bytes[0] === 0x50 && bytes[1] === 0x4b ? "; it looks like a zip archive"
      : bytes.length > 0 && bytes[0] === 0x08 ? "; it looks like an ONNX file" : "";
    throw new ModelFileError(
      `${name} is not a TFLite model (bytes 4-8 are not 'TFL3')${hint}. Use the .tflite file derm-export wrote.`);
  }
  return new ModelFile(bytes, name, await readAppendedZip(bytes, name));
}

class ModelFile {
  #bytes; #name; #manifest = null;
  constructor(bytes, name, entries) {
    this.#bytes = bytes;
    this.#name = name;
    /** The associated files packed in the model's metadata: name -> bytes. */
    this.associatedFiles = entries;
  }

  /** One associated file, or null. */
  associatedFile(fileName) { return this.associatedFiles.get(fileName) ?? null; }

  /** The embedded manifest, checked for a format this version reads. */
  get manifest() {
    if (this.#manifest) return this.#manifest;
    const data = this.associatedFile(MANIFEST_FILE);
    if (!data) {
      throw new ModelFileError(
        `${this.#name} carries no derm manifest (no ${MANIFEST_FILE} in its metadata): it was not written by ` +
        `derm-export, or it is truncated or damaged (${this.#bytes.length} bytes). Export the model with derm-export.`);
    }
    return (this.#manifest = Manifest.parse(utf8.decode(data), this.#name));
  }

  /**
   * Checks the weights against the digest the manifest recorded at export. Returns how the file was verified (a
   * sentence for the screen); throws when the weights changed, so a damaged file never gives an answer.
   */
  async verify() {
    const want = this.manifest.weightsSha256;
    if (want == null) return "weights not verified: the file was exported before derm recorded a weights digest";
    let got;
    try {
      got = await weightsSha256(this.#bytes);
    } catch (e) { // a flatbuffer that points outside the file: damaged, never a crash
      if (!(e instanceof RangeError)) throw e;
      got = "(unreadable)";
    }
    if (got !== want) {
      throw new ModelFileError(
        `${this.#name} is damaged or was altered after export: its weights' sha256 is ${got.slice(0, 16)}..., its ` +
        `manifest recorded ${want.slice(0, 16)}... No result is given from it; copy the original file again.`);
    }
    return `weights verified (sha256 ${want.slice(0, 16)}...)`;
  }
}

async function readAppendedZip(bytes, name) {
  const d = view(bytes);
  const u16 = (p) => d.getUint16(p, true);
  const u32 = (p) => d.getUint32(p, true);
  const damaged = (what) =>
    new ModelFileError(`${name}: its metadata (${what}) cannot be read: the file is truncated or damaged.`);
  let eocd = -1;
  for (let p = bytes.length - 22, first = Math.max(0, p - 65535); p >= first; p--) {
    if (u32(p) === 0x06054b50) { eocd = p; break; }
  }
  const out = new Map();
  if (eocd < 0) return out;
  const count = u16(eocd + 10);
  const cdStart = eocd - u32(eocd + 12);
  // The archive's offsets are relative to where it starts (after the flatbuffer).
  const shift = cdStart - u32(eocd + 16);
  if (cdStart < 0 || shift < 0) return out;
  for (let i = 0, p = cdStart; i < count; i++) {
    if (p + 46 > bytes.length || u32(p) !== 0x02014b50) throw damaged("central directory");
    const method = u16(p + 10), compressed = u32(p + 20), size = u32(p + 24);
    const nameLen = u16(p + 28), extraLen = u16(p + 30), commentLen = u16(p + 32);
    const local = u32(p + 42) + shift;
    if (p + 46 + nameLen > bytes.length) throw damaged("central directory");
    const entryName = utf8.decode(bytes.subarray(p + 46, p + 46 + nameLen));
    if (local + 30 > bytes.length || u32(local) !== 0x04034b50) throw damaged(`entry ${entryName}`);
    const start = local + 30 + u16(local + 26) + u16(local + 28);
    if (start + compressed > bytes.length) throw damaged(`entry ${entryName}`);
    const raw = bytes.subarray(start, start + compressed);
    if (method === 0) out.set(entryName, raw.slice());
    else if (method === 8) out.set(entryName, await inflate(raw, size, () => damaged(`entry ${entryName}`)));
    else throw new ModelFileError(`${name}: metadata entry ${entryName} uses zip method ${method}.`);
    p += 46 + nameLen + extraLen + commentLen;
  }
  return out;
}

/** Raw deflate with the platform's own inflater; a short or corrupt stream is a damaged entry. */
async function inflate(raw, size, damaged) {
  let got;
  try {
    const stream = new Blob([raw]).stream().pipeThrough(new DecompressionStream("deflate-raw"));
    got = new Uint8Array(await new Response(stream).arrayBuffer());
  } catch {
    throw damaged();
  }
  if (got.length < size) throw damaged();
  return got.length === size ? got : got.slice(0, size); // Kotlin's Inflater stops at the declared size
}


/**
 * The digest `derm-export` records in a `.tflite` manifest (`integrity.weights_sha256`), as the SDK computes it
 * (`derm.manifest.tflite_weights_digest`): sha256 over every buffer a tensor reads, in buffer order, each preceded by
 * its index and length (two little-endian uint64). A flipped bit in any weight changes it; the metadata (which holds
 * the digest) lies outside it. Reads the flatbuffer directly (TFLite schema: Model.subgraphs / buffers,
 * SubGraph.tensors, Tensor.buffer, Buffer.data / offset / size). WebCrypto has no incremental sha256, so the blocks
 * are gathered into one array first.
 */
export async function weightsSha256(bytes) {
  const d = view(bytes);
  /** The absolute position of a table's field, or null when absent. */
  const field = (table, index) => {
    const vtable = table - d.getInt32(table, true);
    const at = 4 + 2 * index;
    if (at >= d.getUint16(vtable, true)) return null;
    const off = d.getUint16(vtable + at, true);
    return off === 0 ? null : table + off;
  };
  /** The tables of a vector-of-tables field. */
  const tables = (table, index) => {
    const f = field(table, index);
    if (f == null) return [];
    const vec = f + d.getUint32(f, true);
    return Array.from({ length: d.getUint32(vec, true) }, (_, k) => {
      const p = vec + 4 + 4 * k;
      return p + d.getUint32(p, true);
    });
  };
  const root = d.getUint32(0, true);
  const used = new Set();
  for (const sub of tables(root, 2)) for (const tensor of tables(sub, 0)) {
    const f = field(tensor, 2);
    used.add(f == null ? 0 : d.getUint32(f, true));
  }
  const buffers = tables(root, 4), blocks = [];
  for (const i of [...used].sort((a, b) => a - b)) {
    if (i >= buffers.length) continue;
    const buf = buffers[i], f = field(buf, 0), data = f == null ? null : f + d.getUint32(f, true);
    const dataLength = data == null ? 0 : d.getInt32(data, true);
    let block;
    if (dataLength > 0) {
      block = bytes.subarray(data + 4, data + 4 + dataLength);
    } else { // buffers stored after the flatbuffer (models over 2 GB)
      const fo = field(buf, 1), fs = field(buf, 2);
      const offset = fo == null ? 0n : d.getBigInt64(fo, true), size = fs == null ? 0n : d.getBigInt64(fs, true);
      if (offset <= 1n) continue;
      block = bytes.subarray(Number(offset), Number(offset + size)); // as the SDK's slice: clipped at the end
    }
    const head = new DataView(new ArrayBuffer(16));
    head.setBigUint64(0, BigInt(i), true);
    head.setBigUint64(8, BigInt(block.length), true);
    blocks.push(new Uint8Array(head.buffer), block);
  }
  const all = new Uint8Array(blocks.reduce((n, b) => n + b.length, 0));
  blocks.reduce((at, b) => (all.set(b, at), at + b.length), 0);
  return hex(await globalThis.crypto.subtle.digest("SHA-256", all));
}
