import Foundation

/// 8-bit RGB pixels, row-major, 3 bytes a pixel (what a decoded bitmap gives once its alpha is dropped).
public struct RGBImage: Equatable {
    public let width: Int
    public let height: Int
    public let pixels: [UInt8]

    /// Throws `DermError.invalidImage` unless the pixels are exactly width x height x 3 bytes.
    public init(width: Int, height: Int, pixels: [UInt8]) throws {
        guard width > 0 && height > 0 else {
            throw DermError.invalidImage("An image needs pixels; received \(width)x\(height).")
        }
        let (area, overflow) = width.multipliedReportingOverflow(by: height)
        let (bytes, overflow3) = area.multipliedReportingOverflow(by: 3)
        guard !overflow && !overflow3 && pixels.count == bytes else {
            throw DermError.invalidImage(
                "RGB pixels of a \(width)x\(height) image take \(overflow || overflow3 ? "more" : String(bytes)) "
                    + "bytes; received \(pixels.count)."
            )
        }
        self.init(checked: width, height, pixels)
    }

    /// For pixels this module made itself, whose size is right by construction.
    init(checked width: Int, _ height: Int, _ pixels: [UInt8]) {
        self.width = width
        self.height = height
        self.pixels = pixels
    }

    /// Channel `c` (0 red, 1 green, 2 blue) of the pixel at column `x`, row `y`.
    public func at(_ x: Int, _ y: Int, _ c: Int) -> Int {
        return Int(pixels[(y * width + x) * 3 + c])
    }
}

/// The Python SDK's preprocessing, to the byte (its `PreprocessSpec`): the EXIF orientation applied, then a square
/// resize with the aspect ratio not kept. Large photos (over 4x the input side) are first shrunk by an integer box
/// reduction, then resized with a bilinear filter; both are Pillow's integer arithmetic (`Image.reduce`,
/// `Image.resize(BILINEAR)`), so every platform that follows these rules makes the same input tensor.
public enum Preprocess {
    private static let precisionBits: Int32 = 32 - 8 - 2

    /// The uint8 NHWC input tensor (size x size x 3) the SDK makes from these pixels and EXIF orientation.
    public static func tensor(_ image: RGBImage, orientation: Int, size: Int) -> [UInt8] {
        return resize(orient(image, orientation: orientation), size: size).pixels
    }

    /// A bitmap's RGBA (or RGBX) pixels as RGB; alpha is dropped, as the SDK does for opaque photos. `bytesPerRow`
    /// defaults to width x 4 (rows without padding). The bytes must hold the whole image.
    public static func fromRGBA(width: Int, height: Int, bytes: [UInt8], bytesPerRow: Int? = nil) -> RGBImage {
        let rowBytes = bytesPerRow ?? width * 4
        precondition(width > 0 && height > 0, "An image needs pixels; received \(width)x\(height).")
        precondition(
            rowBytes >= width * 4 && bytes.count >= rowBytes * (height - 1) + width * 4,
            "RGBA pixels of a \(width)x\(height) image take \(rowBytes * (height - 1) + width * 4) bytes; "
                + "received \(bytes.count)."
        )
        var out = [UInt8](repeating: 0, count: width * height * 3)
        bytes.withUnsafeBufferPointer { src in
            out.withUnsafeMutableBufferPointer { dst in
                var o = 0
                for y in 0..<height {
                    var i = y * rowBytes
                    for _ in 0..<width {
                        dst[o] = src[i]
                        dst[o + 1] = src[i + 1]
                        dst[o + 2] = src[i + 2]
                        i += 4
                        o += 3
                    }
                }
            }
        }
        return RGBImage(checked: width, height, out)
    }

    /// RGB as opaque RGBA (alpha 255), rows without padding: for drawing the image the model sees.
    public static func toRGBA(_ image: RGBImage) -> [UInt8] {
        var out = [UInt8](repeating: 255, count: image.width * image.height * 4)
        image.pixels.withUnsafeBufferPointer { src in
            out.withUnsafeMutableBufferPointer { dst in
                var j = 0
                var i = 0
                while j < src.count {
                    dst[i] = src[j]
                    dst[i + 1] = src[j + 1]
                    dst[i + 2] = src[j + 2]
                    i += 4
                    j += 3
                }
            }
        }
        return out
    }

    /// The image as shown: EXIF orientation 1...8 applied (1, or an unknown value: unchanged).
    public static func orient(_ image: RGBImage, orientation: Int) -> RGBImage {
        guard orientation >= 2 && orientation <= 8 else {
            return image
        }
        let w = image.width
        let h = image.height
        let swap = orientation >= 5
        let ow = swap ? h : w
        let oh = swap ? w : h
        // The source pixel of output (0, 0), and the source steps for x + 1 and for y + 1, in pixels: 2 mirror,
        // 3 180, 4 flip, 5 transpose, 6 90 clockwise, 7 transverse, 8 90 counter-clockwise.
        let step: (x0: Int, y0: Int, dx: Int, dy: Int)
        switch orientation {
        case 2: step = (x0: w - 1, y0: 0, dx: -1, dy: w)
        case 3: step = (x0: w - 1, y0: h - 1, dx: -1, dy: -w)
        case 4: step = (x0: 0, y0: h - 1, dx: 1, dy: -w)
        case 5: step = (x0: 0, y0: 0, dx: w, dy: 1)
        case 6: step = (x0: 0, y0: h - 1, dx: -w, dy: 1)
        case 7: step = (x0: w - 1, y0: h - 1, dx: -w, dy: -1)
        default: step = (x0: w - 1, y0: 0, dx: w, dy: -1)
        }
        var out = [UInt8](repeating: 0, count: ow * oh * 3)
        image.pixels.withUnsafeBufferPointer { src in
            out.withUnsafeMutableBufferPointer { dst in
                var o = 0
                for y in 0..<oh {
                    var s = (step.y0 * w + step.x0 + y * step.dy) * 3
                    for _ in 0..<ow {
                        dst[o] = src[s]
                        dst[o + 1] = src[s + 1]
                        dst[o + 2] = src[s + 2]
                        s += step.dx * 3
                        o += 3
                    }
                }
            }
        }
        return RGBImage(checked: ow, oh, out)
    }

    /// Square `size` x `size` resize, as `derm.preprocess.resize`.
    public static func resize(_ image: RGBImage, size: Int) -> RGBImage {
        precondition(size > 0, "The input size must be positive; received \(size).")
        if image.width == size && image.height == size {
            return image
        }
        var im = image
        if max(im.width, im.height) > 4 * size {
            let factor = max(1, min(im.width, im.height) / (2 * size))
            if factor > 1 {
                im = reduce(im, factor: factor)
            }
        }
        return bilinear(im, width: size, height: size)
    }

    /// Pillow's `Image.reduce(factor)`: each output pixel the rounded mean of a factor x factor block (partial at the
    /// right and bottom edges), in Pillow's fixed-point arithmetic: a UInt32 sum times a single-precision
    /// reciprocal, kept mod 2^32, then >> 24.
    public static func reduce(_ image: RGBImage, factor: Int) -> RGBImage {
        precondition(factor > 0, "The reduction factor must be positive; received \(factor).")
        let w = image.width
        let h = image.height
        let ow = (w + factor - 1) / factor
        let oh = (h + factor - 1) / factor
        var out = [UInt8](repeating: 0, count: ow * oh * 3)
        var sums = [Int](repeating: 0, count: ow * 3)
        image.pixels.withUnsafeBufferPointer { src in
            out.withUnsafeMutableBufferPointer { dst in
                sums.withUnsafeMutableBufferPointer { acc in
                    var o = 0
                    for oy in 0..<oh {
                        let y0 = oy * factor
                        let y1 = min(h, y0 + factor)
                        for i in 0..<acc.count {
                            acc[i] = 0
                        }
                        // rows in order: the sums gather a whole row of blocks at once
                        for y in y0..<y1 {
                            var s = y * w * 3
                            for ox in 0..<ow {
                                var r = 0
                                var g = 0
                                var b = 0
                                var n = min(factor, w - ox * factor)
                                while n > 0 {
                                    r += Int(src[s])
                                    g += Int(src[s + 1])
                                    b += Int(src[s + 2])
                                    s += 3
                                    n -= 1
                                }
                                acc[ox * 3] += r
                                acc[ox * 3 + 1] += g
                                acc[ox * 3 + 2] += b
                            }
                        }
                        for ox in 0..<ow {
                            let scale = (min(w, ox * factor + factor) - ox * factor) * (y1 - y0)
                            let multiplier = division(scale)
                            let amend = UInt32(truncatingIfNeeded: scale >> 1)
                            for c in 0..<3 {
                                let ss = UInt32(truncatingIfNeeded: acc[ox * 3 + c]) &+ amend
                                dst[o] = UInt8(truncatingIfNeeded: (ss &* multiplier) >> 24)
                                o += 1
                            }
                        }
                    }
                }
            }
        }
        return RGBImage(checked: ow, oh, out)
    }

    /// Pillow's `division_UINT32(divider, 8)`: 2^32 / (256 x divider), computed in single precision as Pillow does,
    /// truncated.
    private static func division(_ divider: Int) -> UInt32 {
        let maxDividend = Float(UInt32(truncatingIfNeeded: 256 * divider))
        return UInt32(Float(4294967296.0) / maxDividend)
    }

    /// Pillow's `Image.resize(size, BILINEAR)` for 8-bit RGB: a separable triangle filter (support scaled with the
    /// reduction), coefficients rounded to 22-bit fixed point, one pass per axis. Pillow 13 (the SDK's pin) runs the
    /// vertical pass first when the height loses more than twice as many pixels as the width; the order changes the
    /// rounding, so it is followed here.
    public static func bilinear(_ image: RGBImage, width: Int, height: Int) -> RGBImage {
        precondition(width > 0 && height > 0, "A resize needs a size; received \(width)x\(height).")
        let dh = image.height - height
        if dh > 0 && dh > 2 * (image.width - width) {
            return horizontal(vertical(image, height), width)
        }
        return vertical(horizontal(image, width), height)
    }

    private static func horizontal(_ im: RGBImage, _ width: Int) -> RGBImage {
        if im.width == width {
            return im
        }
        return pass(im, width, im.height, coefficients(im.width, width), alongX: true)
    }

    private static func vertical(_ im: RGBImage, _ height: Int) -> RGBImage {
        if im.height == height {
            return im
        }
        return pass(im, im.width, height, coefficients(im.height, height), alongX: false)
    }

    /// One resampling pass, along rows (`alongX`) or down columns, in Pillow's Int32 arithmetic.
    private static func pass(
        _ im: RGBImage, _ width: Int, _ height: Int, _ co: Coefficients, alongX: Bool
    ) -> RGBImage {
        var out = [UInt8](repeating: 0, count: width * height * 3)
        let tap = alongX ? 3 : im.width * 3
        let ksize = co.ksize
        let inWidth = im.width
        let half: Int32 = 1 << (precisionBits - 1)
        im.pixels.withUnsafeBufferPointer { src in
            co.kk.withUnsafeBufferPointer { kk in
                co.bounds.withUnsafeBufferPointer { bounds in
                    out.withUnsafeMutableBufferPointer { dst in
                        var o = 0
                        for y in 0..<height {
                            for x in 0..<width {
                                let j = alongX ? x : y
                                let k0 = j * ksize
                                let first = bounds[2 * j]
                                let n = bounds[2 * j + 1]
                                var s = alongX ? (y * inWidth + first) * 3 : first * tap + x * 3
                                var r: Int32 = half
                                var g: Int32 = half
                                var b: Int32 = half
                                var i = 0
                                while i < n {
                                    let k = kk[k0 + i]
                                    r = r &+ Int32(src[s]) &* k
                                    g = g &+ Int32(src[s + 1]) &* k
                                    b = b &+ Int32(src[s + 2]) &* k
                                    s += tap
                                    i += 1
                                }
                                dst[o] = clip8(r)
                                dst[o + 1] = clip8(g)
                                dst[o + 2] = clip8(b)
                                o += 3
                            }
                        }
                    }
                }
            }
        }
        return RGBImage(checked: width, height, out)
    }

    private static func clip8(_ v: Int32) -> UInt8 {
        let x = v >> precisionBits
        if x < 0 {
            return 0
        }
        if x > 255 {
            return 255
        }
        return UInt8(x)
    }

    /// For each output pixel `i` of a pass: the first input pixel `bounds[2i]`, the number of input pixels
    /// `bounds[2i + 1]`, and their weights `kk[i * ksize ..< i * ksize + bounds[2i + 1]]` in 22-bit fixed point.
    private struct Coefficients {
        let bounds: [Int]
        let kk: [Int32]
        let ksize: Int
    }

    /// Pillow's `precompute_coeffs` with the bilinear filter (support 1), then `normalize_coeffs_8bpc`.
    private static func coefficients(_ inSize: Int, _ outSize: Int) -> Coefficients {
        let scale = Double(Float(inSize)) / Double(outSize)
        let filterScale = max(scale, 1.0)
        let support = 1.0 * filterScale
        let ksize = Int(support.rounded(.up)) * 2 + 1
        let fixed = Double(Int32(1) << precisionBits)
        var bounds = [Int](repeating: 0, count: outSize * 2)
        var kk = [Int32](repeating: 0, count: outSize * ksize)
        var k = [Double](repeating: 0, count: ksize)
        let ss = 1.0 / filterScale
        for xx in 0..<outSize {
            let center = (Double(xx) + 0.5) * scale
            var ww = 0.0
            let xmin = max(0, Int(center - support + 0.5))
            let xmax = min(inSize, Int(center + support + 0.5)) - xmin
            var i = 0
            while i < xmax {
                var t = (Double(i + xmin) - center + 0.5) * ss
                if t < 0.0 {
                    t = -t
                }
                let weight = t < 1.0 ? 1.0 - t : 0.0
                k[i] = weight
                ww += weight
                i += 1
            }
            for x in 0..<ksize {
                var v = 0.0
                if x < xmax {
                    v = ww != 0.0 ? k[x] / ww : k[x]
                }
                // C's int cast truncates toward zero, as Int32(_:) does
                kk[xx * ksize + x] = v < 0 ? Int32(-0.5 + v * fixed) : Int32(0.5 + v * fixed)
            }
            bounds[2 * xx] = xmin
            bounds[2 * xx + 1] = xmax
        }
        return Coefficients(bounds: bounds, kk: kk, ksize: ksize)
    }
}
