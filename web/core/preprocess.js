// The Python SDK's preprocessing to the byte. A port of android-demo/core's Preprocess.

const PRECISION_BITS = 32 - 8 - 2;

function rgb(width, height, pixels) {
  if (!(width > 0 && height > 0)) throw new Error(`An image needs pixels; received ${width}x${height}.`);
  if (pixels.length !== width * height * 3) {
    throw new Error(
      `RGB pixels of a ${width}x${height} image take ${width * height * 3} bytes; received ${pixels.length}.`);
  }
  return { width, height, pixels };
}

/** Pillow's `precompute_coeffs` with the bilinear filter (support 1), then `normalize_coeffs_8bpc`. */
function coefficients(inSize, outSize) {
  const scale = Math.fround(inSize) / outSize, filterScale = Math.max(scale, 1), support = filterScale;
  const ksize = Math.ceil(support) * 2 + 1;
  const bounds = new Int32Array(outSize * 2), kk = new Int32Array(outSize * ksize), k = new Float64Array(ksize);
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale, ss = 1 / filterScale;
    const xmin = Math.max(0, Math.trunc(center - support + 0.5));
    const xmax = Math.min(inSize, Math.trunc(center + support + 0.5)) - xmin;
    let ww = 0;
    for (let x = 0; x < xmax; x++) {
      const t = Math.abs((x + xmin - center + 0.5) * ss);
      ww += k[x] = t < 1 ? 1 - t : 0;
    }
    for (let x = 0; x < xmax; x++) { // the C int cast truncates toward zero; bilinear weights are never negative
      const v = ww !== 0 ? k[x] / ww : k[x];
      kk[xx * ksize + x] = Math.trunc(v < 0 ? -0.5 + v * (1 << PRECISION_BITS) : 0.5 + v * (1 << PRECISION_BITS));
    }
    bounds[2 * xx] = xmin;
    bounds[2 * xx + 1] = xmax;
  }
  return { bounds, kk, ksize };
}

/**
 * The Python SDK's preprocessing, to the byte (its `PreprocessSpec`): the EXIF orientation applied, then a square
 * resize with the aspect ratio not kept. Large photos (over 4x the input side) are first shrunk by an integer box
 * reduction, then resized with a bilinear filter; both are Pillow's integer arithmetic (`Image.reduce`,
 * `Image.resize(BILINEAR)`), so every platform that follows these rules makes the same input tensor. Images are
 * `{width, height, pixels}`: 8-bit RGB, row-major, 3 bytes a pixel.
 */
export const Preprocess = {
  /** The uint8 NHWC input tensor (size x size x 3) the SDK makes from these pixels and EXIF orientation. */
  tensor(image, orientation, size) {
    return Preprocess.resize(Preprocess.orient(rgb(image.width, image.height, image.pixels), orientation), size).pixels;
  },

  /** A canvas's RGBA pixels (ImageData.data) as RGB; alpha is dropped, as the SDK does for opaque photos. */
  fromRGBA(width, height, rgba) {
    const out = new Uint8Array(width * height * 3);
    for (let i = 0, j = 0; j < out.length; i += 4, j += 3) {
      out[j] = rgba[i]; out[j + 1] = rgba[i + 1]; out[j + 2] = rgba[i + 2];
    }
    return rgb(width, height, out);
  },

  /** RGB as opaque RGBA, for `new ImageData(Preprocess.toRGBA(im), im.width)`. */
  toRGBA(image) {
    const px = image.pixels, out = new Uint8ClampedArray(image.width * image.height * 4);
    for (let i = 0, j = 0; i < out.length; i += 4, j += 3) {
      out[i] = px[j]; out[i + 1] = px[j + 1]; out[i + 2] = px[j + 2]; out[i + 3] = 255;
    }
    return out;
  },

  /** The image as shown: EXIF orientation 1..8 applied (1, or an unknown value: unchanged). */
  orient(image, orientation) {
    if (!(orientation >= 2 && orientation <= 8)) return image;
    const { width: w, height: h, pixels: src } = image;
    const swap = orientation >= 5, ow = swap ? h : w, oh = swap ? w : h;
    // The source pixel of output (0, 0), and the source steps for x + 1 and for y + 1, in pixels: 2 mirror, 3 180,
    // 4 flip, 5 transpose, 6 90 clockwise, 7 transverse, 8 90 counter-clockwise.
    const [x0, y0, dx, dy] = {
      2: [w - 1, 0, -1, w], 3: [w - 1, h - 1, -1, -w], 4: [0, h - 1, 1, -w], 5: [0, 0, w, 1],
      6: [0, h - 1, -w, 1], 7: [w - 1, h - 1, -w, -1], 8: [w - 1, 0, w, -1],
    }[orientation];
    const out = new Uint8Array(ow * oh * 3);
    for (let y = 0, o = 0; y < oh; y++) {
      for (let x = 0, s = (y0 * w + x0 + y * dy) * 3; x < ow; x++, s += dx * 3, o += 3) {
        out[o] = src[s]; out[o + 1] = src[s + 1]; out[o + 2] = src[s + 2];
      }
    }
    return { width: ow, height: oh, pixels: out };
  },

  /** Square `size` x `size` resize, as `derm.preprocess.resize`. */
  resize(image, size) {
    if (image.width === size && image.height === size) return image;
    let im = image;
    if (Math.max(im.width, im.height) > 4 * size) {
      const factor = Math.max(1, Math.trunc(Math.min(im.width, im.height) / (2 * size)));
      if (factor > 1) im = Preprocess.reduce(im, factor);
    }
    return Preprocess.bilinear(im, size, size);
  },

  /**
   * Pillow's `Image.reduce(factor)`: each output pixel the rounded mean of a factor x factor block (partial at the
   * right and bottom edges), in Pillow's fixed-point arithmetic: a uint32 sum times a single-precision reciprocal,
   * kept mod 2^32 (Math.imul), then >>> 24.
   */
  reduce(image, factor) {
    const { width: w, height: h, pixels: src } = image;
    const ow = Math.ceil(w / factor), oh = Math.ceil(h / factor);
    const out = new Uint8Array(ow * oh * 3), sums = new Int32Array(ow * 3);
    for (let oy = 0; oy < oh; oy++) {
      const y0 = oy * factor, y1 = Math.min(h, y0 + factor);
      sums.fill(0);
      for (let y = y0; y < y1; y++) { // rows in order: the sums gather a whole row of blocks at once
        for (let ox = 0, s = y * w * 3; ox < ow; ox++) {
          let r = 0, g = 0, b = 0;
          for (let n = Math.min(factor, w - ox * factor); n > 0; n--, s += 3) {
            r += src[s]; g += src[s + 1]; b += src[s + 2];
          }
          sums[ox * 3] += r; sums[ox * 3 + 1] += g; sums[ox * 3 + 2] += b;
        }
      }
      for (let ox = 0, o = oy * ow * 3; ox < ow; ox++) {
        const scale = (Math.min(w, ox * factor + factor) - ox * factor) * (y1 - y0);
        // Pillow's division_UINT32(scale, 8): 2^32 / (256 * scale) in single precision, truncated.
        const multiplier = Math.trunc(Math.fround(4294967296 / Math.fround(256 * scale)));
        const amend = scale >> 1;
        for (let c = 0; c < 3; c++) out[o++] = Math.imul(sums[ox * 3 + c] + amend, multiplier) >>> 24;
      }
    }
    return { width: ow, height: oh, pixels: out };
  },

  /**
   * Pillow's `Image.resize(size, BILINEAR)` for 8-bit RGB: a separable triangle filter (support scaled with the
   * reduction), coefficients rounded to 22-bit fixed point, one pass per axis. Pillow 13 (the SDK's pin) runs the
   * vertical pass first when the height loses more than twice as many pixels as the width (earlier Pillows, and the
   * Kotlin port, always start horizontally); the order changes rounding, so it is followed here.
   */
  bilinear(image, width, height) {
    const { width: iw, height: ih } = image;
    const across = (im) => (im.width === width ? im : pass(im, width, im.height, coefficients(im.width, width), true));
    const down = (im) =>
      (im.height === height ? im : pass(im, im.width, height, coefficients(im.height, height), false));
    return ih - height > 0 && ih - height > (iw - width) * 2 ? across(down(image)) : down(across(image));
  },
};

/**
 * One resampling pass, along rows (`alongX`) or down columns. The int32 sums stay below 2^31, so JS doubles hold
 * them exactly and `>> 22` is Pillow's shift.
 */
function pass(im, width, height, { bounds, kk, ksize }, alongX) {
  const src = im.pixels, out = new Uint8Array(width * height * 3), tap = alongX ? 3 : im.width * 3;
  const clip8 = (v) => { const x = v >> PRECISION_BITS; return x < 0 ? 0 : x > 255 ? 255 : x; };
  for (let y = 0, o = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const j = alongX ? x : y, k0 = j * ksize, n = bounds[2 * j + 1];
      const s0 = alongX ? (y * im.width + bounds[2 * j]) * 3 : bounds[2 * j] * tap + x * 3;
      let r = 1 << (PRECISION_BITS - 1), g = r, b = r;
      for (let i = 0, s = s0; i < n; i++, s += tap) {
        const k = kk[k0 + i];
        r += src[s] * k; g += src[s + 1] * k; b += src[s + 2] * k;
      }
      out[o++] = clip8(r); out[o++] = clip8(g); out[o++] = clip8(b);
    }
  }
  return { width, height, pixels: out };
}
