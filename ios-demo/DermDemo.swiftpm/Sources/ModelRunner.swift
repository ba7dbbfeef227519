import CoreML
import CoreVideo
import CryptoKit
import DermCore
import Foundation

/// The key under which `derm-export --target coreml` stores the manifest in the model's creator-defined metadata
/// (the Python SDK's `derm.manifest.MANIFEST_KEY`; tests/test_ios.py checks the two agree).
let manifestKey = "derm_manifest"

/// What one image gave: the SDK's prediction from the model's outputs, and how long the model took.
struct Classified {
    let prediction: Prediction
    let millis: Double
}

/// The exported Core ML model, compiled on the phone, with the manifest it carries. Everything model-specific
/// (input size, labels, levels, tasks, operating points, disclaimer) comes from the manifest: no second list here.
final class ModelRunner {
    let name: String
    let model: MLModel
    let manifest: Manifest
    let inputName: String
    private(set) var predictor: Predictor

    /// Loads a compiled model (`.mlmodelc`, as Xcode builds it into the app) or compiles an `.mlpackage` (once per
    /// model version, cached: one opened from Files); `computeUnits = .all` lets Core ML use
    /// the Neural Engine where it can. Throws a `DermError` with a message for the screen when the file is not a
    /// derm export, or its manifest format is newer than this app reads.
    init(package url: URL, operatingPoint: String = Predictor.defaultOperatingPoint) async throws {
        name = url.lastPathComponent
        let compiled = try await ModelRunner.compiled(url)
        let config = MLModelConfiguration()
        config.computeUnits = .all
        model = try MLModel(contentsOf: compiled, configuration: config)
        let metadata = model.modelDescription.metadata[MLModelMetadataKey.creatorDefinedKey] as? [String: String]
        guard let text = metadata?[manifestKey] else {
            throw DermError.modelFile(
                "\(name) carries no derm manifest (no '\(manifestKey)' in its metadata): it was not written by "
                    + "derm-export --target coreml, so its labels are unknown. Export the model with derm-export."
            )
        }
        manifest = try Manifest.parse(text, source: name)
        let images = model.modelDescription.inputDescriptionsByName.filter { $0.value.type == .image }
        guard let input = images.first, images.count == 1,
              let constraint = input.value.imageConstraint,
              constraint.pixelsWide == manifest.inputSize, constraint.pixelsHigh == manifest.inputSize
        else {
            throw DermError.modelFile(
                "\(name): its input is not one \(manifest.inputSize)x\(manifest.inputSize) image, as its manifest "
                    + "says. Re-export it with derm-export --target coreml."
            )
        }
        inputName = input.key
        let sizes = model.modelDescription.outputDescriptionsByName.mapValues { d -> Int in
            (d.multiArrayConstraint?.shape.map(\.intValue).reduce(1, *)) ?? 0
        }
        let problems = manifest.outputProblems(sizes)
        guard problems.isEmpty else {
            throw DermError.modelFile("\(name) does not match its own manifest: " + problems.joined(separator: "; "))
        }
        predictor = try Predictor(manifest: manifest, operatingPoint: operatingPoint)
    }

    /// Operating points the manifest offers (target sensitivities, e.g. "0.9"), sorted.
    var operatingPoints: [String] {
        Array(Set(manifest.tasks.flatMap { $0.operatingPoints.keys })).sorted()
    }

    func use(operatingPoint: String) throws {
        predictor = try Predictor(manifest: manifest, operatingPoint: operatingPoint)
    }

    /// The SDK's preprocessing (DermCore, bit-exact with Pillow) to the model's input size, then the model on that
    /// exact image: Core ML's own scaling is never asked to resize.
    func classify(_ image: RGBImage, orientation: Int) throws -> Classified {
        let size = manifest.inputSize
        let tensor = Preprocess.tensor(image, orientation: orientation, size: size)
        let buffer = try ModelRunner.pixelBuffer(rgb: tensor, size: size)
        let input = try MLDictionaryFeatureProvider(dictionary: [inputName: MLFeatureValue(pixelBuffer: buffer)])
        let start = DispatchTime.now()
        let out = try model.prediction(from: input)
        let millis = Double(DispatchTime.now().uptimeNanoseconds - start.uptimeNanoseconds) / 1e6
        var outputs: [String: [Float]] = [:]
        for name in out.featureNames {
            guard let array = out.featureValue(for: name)?.multiArrayValue else { continue }
            outputs[name] = (0..<array.count).map { array[$0].floatValue }
        }
        return Classified(prediction: try predictor.predict(outputs), millis: millis)
    }

    /// A 32BGRA pixel buffer holding the RGB tensor (Core ML turns it into the model's RGB planes).
    static func pixelBuffer(rgb: [UInt8], size: Int) throws -> CVPixelBuffer {
        var made: CVPixelBuffer?
        let attrs = [kCVPixelBufferCGImageCompatibilityKey: true, kCVPixelBufferCGBitmapContextCompatibilityKey: true]
        let status = CVPixelBufferCreate(
            kCFAllocatorDefault, size, size, kCVPixelFormatType_32BGRA, attrs as CFDictionary, &made
        )
        guard status == kCVReturnSuccess, let buffer = made else {
            throw DermError.modelFile("Could not make a \(size)x\(size) pixel buffer (CoreVideo status \(status)).")
        }
        CVPixelBufferLockBaseAddress(buffer, [])
        defer { CVPixelBufferUnlockBaseAddress(buffer, []) }
        let base = CVPixelBufferGetBaseAddress(buffer)!.assumingMemoryBound(to: UInt8.self)
        let stride = CVPixelBufferGetBytesPerRow(buffer)
        for y in 0..<size {
            for x in 0..<size {
                let s = (y * size + x) * 3
                let d = y * stride + x * 4
                base[d] = rgb[s + 2]
                base[d + 1] = rgb[s + 1]
                base[d + 2] = rgb[s]
                base[d + 3] = 255
            }
        }
        return buffer
    }

    /// The compiled model (`.mlmodelc`) for this package, compiled once and kept in Caches, keyed by the package's
    /// own Manifest.json (which names its items by identifiers made anew at each export).
    private static func compiled(_ url: URL) async throws -> URL {
        if url.pathExtension == "mlmodelc" { return url }
        let manifestFile = url.appendingPathComponent("Manifest.json")
        guard let stamp = try? Data(contentsOf: manifestFile) else {
            throw DermError.modelFile(
                "\(url.lastPathComponent) is not a Core ML package (no Manifest.json inside). Use the .mlpackage "
                    + "derm-export --target coreml wrote."
            )
        }
        let key = SHA256.hash(data: stamp).prefix(8).map { String(format: "%02x", $0) }.joined()
        let caches = try FileManager.default.url(
            for: .cachesDirectory, in: .userDomainMask, appropriateFor: nil, create: true
        )
        let target = caches.appendingPathComponent("derm-\(key).mlmodelc")
        if FileManager.default.fileExists(atPath: target.path) { return target }
        let fresh = try await MLModel.compileModel(at: url)
        try? FileManager.default.removeItem(at: target)
        try FileManager.default.moveItem(at: fresh, to: target)
        return target
    }
}
