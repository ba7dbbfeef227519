package derm.core

/** 8-bit RGB pixels, row-major, 3 bytes a pixel (what a decoded bitmap gives once its alpha is dropped). */
class RgbImage(val width: Int, val height: Int, val pixels: ByteArray) {
    init {
        require(width > 0 && height > 0) { "An image needs pixels; received ${width}x$height." }
        require(pixels.size == width * height * 3) {
            "RGB pixels of a ${width}x$height image take ${width * height * 3} bytes; received ${pixels.size}."
        }
    }

    fun at(x: Int, y: Int, c: Int): Int = pixels[(y * width + x) * 3 + c].toInt() and 0xff
}

/**
 * The Python SDK's preprocessing, to the byte (its `PreprocessSpec`): the EXIF orientation applied, then a square
 * resize with the aspect ratio not kept. Large photos (over 4x the input side) are first shrunk by an integer box
 * reduction, then resized with a bilinear filter; both are Pillow's integer arithmetic (`Image.reduce`,
 * `Image.resize(BILINEAR)`), so every platform that follows these rules makes the same input tensor.
 */
object Preprocess {
    private const val PRECISION_BITS = 32 - 8 - 2

    /** The uint8 NHWC input tensor (size x size x 3) the SDK makes from these pixels and EXIF orientation. */
    fun tensor(image: RgbImage, orientation: Int, size: Int): ByteArray = resize(orient(image, orientation), size).pixels

    /** The image as shown: EXIF orientation 1..8 applied (1, or an unknown value: unchanged). */
    fun orient(image: RgbImage, orientation: Int): RgbImage {
        val w = image.width
        val h = image.height
        val swap = orientation in 5..8
        val ow = if (swap) h else w
        val oh = if (swap) w else h
        if (orientation !in 2..8) return image
        val out = ByteArray(ow * oh * 3)
        for (y in 0 until oh) {
            for (x in 0 until ow) {
                val (sx, sy) = when (orientation) {
                    2 -> Pair(w - 1 - x, y) // mirror
                    3 -> Pair(w - 1 - x, h - 1 - y) // 180
                    4 -> Pair(x, h - 1 - y) // flip
                    5 -> Pair(y, x) // transpose
                    6 -> Pair(y, h - 1 - x) // 90 clockwise
                    7 -> Pair(w - 1 - y, h - 1 - x) // transverse
                    else -> Pair(w - 1 - y, x) // 8: 90 counter-clockwise
                }
                System.arraycopy(image.pixels, (sy * w + sx) * 3, out, (y * ow + x) * 3, 3)
            }
        }
        return RgbImage(ow, oh, out)
    }

    /** Square `size` x `size` resize, as `derm.preprocess.resize`. */
    fun resize(image: RgbImage, size: Int): RgbImage {
        if (image.width == size && image.height == size) return image
        var im = image
        if (maxOf(im.width, im.height) > 4 * size) {
            val factor = maxOf(1, minOf(im.width, im.height) / (2 * size))
            if (factor > 1) im = reduce(im, factor)
        }
        return bilinear(im, size, size)
    }

    /** Pillow's `Image.reduce(factor)`: each output pixel the rounded mean of a factor x factor block (partial at the
     *  right and bottom edges), in Pillow's fixed-point arithmetic. */
    fun reduce(image: RgbImage, factor: Int): RgbImage {
        val w = image.width
        val h = image.height
        val ow = (w + factor - 1) / factor
        val oh = (h + factor - 1) / factor
        val out = ByteArray(ow * oh * 3)
        for (oy in 0 until oh) {
            val y0 = oy * factor
            val y1 = minOf(h, y0 + factor)
            for (ox in 0 until ow) {
                val x0 = ox * factor
                val x1 = minOf(w, x0 + factor)
                val scale = (x1 - x0) * (y1 - y0)
                val multiplier = division(scale)
                val amend = (scale / 2).toLong()
                for (c in 0 until 3) {
                    var ss = amend
                    for (y in y0 until y1) for (x in x0 until x1) ss += image.at(x, y, c)
                    out[(oy * ow + ox) * 3 + c] = (((ss * multiplier) and 0xffffffffL) ushr 24).toByte()
                }
            }
        }
        return RgbImage(ow, oh, out)
    }

    /** Pillow's `division_UINT32(divider, 8)`: 2^32 / (256 * divider), computed in single precision as Pillow does. */
    private fun division(divider: Int): Long = (4294967296.0f / (256 * divider).toFloat()).toLong()

    /** Pillow's `Image.resize(size, BILINEAR)` for 8-bit RGB: a separable triangle filter (support scaled with the
     *  reduction), coefficients rounded to 22-bit fixed point, one pass per axis. Pillow 13 (the SDK's pin) runs the
     *  vertical pass first when the height loses more than twice as many pixels as the width; the order changes the
     *  rounding, so it is followed here. */
    fun bilinear(image: RgbImage, width: Int, height: Int): RgbImage {
        val dh = image.height - height
        return if (dh > 0 && dh > 2 * (image.width - width)) {
            horizontal(vertical(image, height), width)
        } else {
            vertical(horizontal(image, width), height)
        }
    }

    private fun horizontal(im: RgbImage, width: Int): RgbImage {
        if (im.width == width) return im
        val (bounds, kk, ksize) = coefficients(im.width, width)
        val out = ByteArray(width * im.height * 3)
        for (y in 0 until im.height) {
            for (x in 0 until width) {
                val xmin = bounds[2 * x]
                val xmax = bounds[2 * x + 1]
                for (c in 0 until 3) {
                    var ss = 1 shl (PRECISION_BITS - 1)
                    for (i in 0 until xmax) ss += im.at(xmin + i, y, c) * kk[x * ksize + i]
                    out[(y * width + x) * 3 + c] = clip8(ss).toByte()
                }
            }
        }
        return RgbImage(width, im.height, out)
    }

    private fun vertical(im: RgbImage, height: Int): RgbImage {
        if (im.height == height) return im
        val (bounds, kk, ksize) = coefficients(im.height, height)
        val out = ByteArray(im.width * height * 3)
        for (y in 0 until height) {
            val ymin = bounds[2 * y]
            val ymax = bounds[2 * y + 1]
            for (x in 0 until im.width) {
                for (c in 0 until 3) {
                    var ss = 1 shl (PRECISION_BITS - 1)
                    for (i in 0 until ymax) ss += im.at(x, ymin + i, c) * kk[y * ksize + i]
                    out[(y * im.width + x) * 3 + c] = clip8(ss).toByte()
                }
            }
        }
        return RgbImage(im.width, height, out)
    }

    private fun clip8(v: Int): Int = (v shr PRECISION_BITS).coerceIn(0, 255)

    private data class Coefficients(val bounds: IntArray, val kk: IntArray, val ksize: Int)

    /** Pillow's `precompute_coeffs` with the bilinear filter (support 1), then `normalize_coeffs_8bpc`. */
    private fun coefficients(inSize: Int, outSize: Int): Coefficients {
        val scale = inSize.toFloat().toDouble() / outSize
        val filterScale = maxOf(scale, 1.0)
        val support = 1.0 * filterScale
        val ksize = Math.ceil(support).toInt() * 2 + 1
        val bounds = IntArray(outSize * 2)
        val kk = IntArray(outSize * ksize)
        val k = DoubleArray(ksize)
        for (xx in 0 until outSize) {
            val center = 0.0 + (xx + 0.5) * scale
            var ww = 0.0
            val ss = 1.0 / filterScale
            val xmin = maxOf(0, (center - support + 0.5).toInt())
            val xmax = minOf(inSize, (center + support + 0.5).toInt()) - xmin
            for (x in 0 until xmax) {
                var t = (x + xmin - center + 0.5) * ss
                if (t < 0.0) t = -t
                val w = if (t < 1.0) 1.0 - t else 0.0
                k[x] = w
                ww += w
            }
            for (x in 0 until ksize) {
                val v = if (x < xmax) (if (ww != 0.0) k[x] / ww else k[x]) else 0.0
                kk[xx * ksize + x] = if (v < 0) (-0.5 + v * (1 shl PRECISION_BITS)).toInt() else (0.5 + v * (1 shl PRECISION_BITS)).toInt()
            }
            bounds[2 * xx] = xmin
            bounds[2 * xx + 1] = xmax
        }
        return Coefficients(bounds, kk, ksize)
    }
}
