import CoreGraphics
import DermCore
import Foundation
import ImageIO

/// An image file's pixels as stored (before EXIF orientation) and its EXIF orientation, as the Python SDK reads them:
/// DermCore then orients and resizes them exactly as the SDK does. The JPEG decoder is Apple's, not libjpeg-turbo,
/// so a pixel can differ by a level or two from the SDK's; from the decoded pixels on, every value is the SDK's.
enum ImageInput {
    static func decode(_ data: Data, name: String) throws -> (image: RGBImage, orientation: Int) {
        guard let source = CGImageSourceCreateWithData(data as CFData, nil),
              let cg = CGImageSourceCreateImageAtIndex(source, 0, [kCGImageSourceShouldCache: false] as CFDictionary)
        else {
            throw DermError.modelFile("Cannot read image \(name): not an image file this iPhone can decode.")
        }
        let props = CGImageSourceCopyPropertiesAtIndex(source, 0, nil) as? [CFString: Any]
        let raw = (props?[kCGImagePropertyOrientation] as? NSNumber)?.intValue ?? 1
        return (try pixels(cg, name: name), (1...8).contains(raw) ? raw : 1)
    }

    /// RGB bytes of a CGImage, unrotated, in its own colour space when that is RGB (no colour management, as the
    /// SDK does none); greyscale and other spaces are drawn into sRGB.
    static func pixels(_ cg: CGImage, name: String) throws -> RGBImage {
        let width = cg.width
        let height = cg.height
        let space = cg.colorSpace.flatMap { $0.model == .rgb ? $0 : nil }
            ?? CGColorSpace(name: CGColorSpace.sRGB)!
        var rgba = [UInt8](repeating: 0, count: width * height * 4)
        let drawn = rgba.withUnsafeMutableBytes { buf -> Bool in
            guard let ctx = CGContext(
                data: buf.baseAddress, width: width, height: height, bitsPerComponent: 8, bytesPerRow: width * 4,
                space: space, bitmapInfo: CGImageAlphaInfo.noneSkipLast.rawValue
            ) else { return false }
            ctx.interpolationQuality = .none
            ctx.setFillColor(CGColor(red: 1, green: 1, blue: 1, alpha: 1)) // transparency on white, as the SDK
            ctx.fill(CGRect(x: 0, y: 0, width: width, height: height))
            ctx.draw(cg, in: CGRect(x: 0, y: 0, width: width, height: height))
            return true
        }
        guard drawn else { throw DermError.modelFile("Cannot read image \(name): its pixels cannot be drawn.") }
        return Preprocess.fromRGBA(width: width, height: height, bytes: rgba)
    }
}
