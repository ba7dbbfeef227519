import DermCore
import Foundation
import XCTest

/// The contract with the Python SDK (a port of android-demo/core's GoldenTest): on the golden vectors `derm golden`
/// wrote beside an exported file, DermCore must make the same input tensors (to the byte) from the decoded pixels and
/// EXIF orientation, and turn the file's raw outputs into the same prediction.
///
/// The folder comes from the environment variable `DERM_GOLDEN`. The manifest is the model's own: an app reads it
/// from the Core ML package's metadata, which a `.tflite` does not have, so here it is the `manifest.json` that
/// `derm golden` writes beside `golden.json`, or the file `DERM_MANIFEST` names. Without them the tests are skipped,
/// with the reason:
///
///     DERM_GOLDEN=/path/to/golden DERM_MANIFEST=/path/to/manifest.json swift test
final class GoldenTests: XCTestCase {
    private struct Golden {
        let dir: URL
        let doc: [String: Any]
        let cases: [[String: Any]]

        func bytes(_ relative: String) throws -> [UInt8] {
            let data = try Data(contentsOf: dir.appendingPathComponent(relative))
            return [UInt8](data)
        }
    }

    private func golden() throws -> Golden {
        let path = ProcessInfo.processInfo.environment["DERM_GOLDEN"] ?? ""
        let shown = path.isEmpty ? "(DERM_GOLDEN unset)" : path
        let dir = URL(fileURLWithPath: path.isEmpty ? "." : path)
        let file = dir.appendingPathComponent("golden.json")
        guard !path.isEmpty, FileManager.default.fileExists(atPath: file.path) else {
            throw XCTSkip("no golden vectors at \(shown): set DERM_GOLDEN to a folder `derm golden` wrote")
        }
        let data = try Data(contentsOf: file)
        let parsed = try JSONSerialization.jsonObject(with: data, options: [])
        let doc = try XCTUnwrap(parsed as? [String: Any], "golden.json is not a JSON object")
        XCTAssertEqual(asString(doc["format"]), "derm-golden/1")
        let cases = try XCTUnwrap(doc["cases"] as? [Any], "golden.json has no cases")
        return Golden(dir: dir, doc: doc, cases: cases.compactMap { asObject($0) })
    }

    /// The model's manifest: `DERM_MANIFEST`, else `manifest.json` beside golden.json.
    private func manifest(_ golden: Golden) throws -> Manifest {
        let path = ProcessInfo.processInfo.environment["DERM_MANIFEST"] ?? ""
        let url = path.isEmpty ? golden.dir.appendingPathComponent("manifest.json") : URL(fileURLWithPath: path)
        guard FileManager.default.fileExists(atPath: url.path) else {
            if !path.isEmpty {
                XCTFail("DERM_MANIFEST names \(path), which does not exist")
            }
            throw XCTSkip(
                "no manifest at \(url.path): run `derm golden IMAGES... --model MODEL` (or `python -m derm.cli "
                    + "golden ...`) again, which writes manifest.json beside golden.json, or set DERM_MANIFEST to the "
                    + "model's manifest as a JSON file"
            )
        }
        let text = try String(contentsOf: url, encoding: .utf8)
        return try Manifest.parse(text, source: url.lastPathComponent)
    }

    func testInputTensorsAreTheSdksToTheByte() throws {
        let vectors = try golden()
        let size = try XCTUnwrap(asInt(vectors.doc["input_size"]), "input_size")
        let tolerance = try XCTUnwrap(asInt(asObject(vectors.doc["tolerance"])?["input_levels"]), "tolerance")
        XCTAssertFalse(vectors.cases.isEmpty)
        for c in vectors.cases {
            let name = asString(c["name"]) ?? "?"
            let d = try XCTUnwrap(asObject(c["decoded"]), name)
            let width = try XCTUnwrap(asInt(d["width"]), name)
            let height = try XCTUnwrap(asInt(d["height"]), name)
            let orientation = try XCTUnwrap(asInt(d["orientation"]), name)
            let decodedFile = try XCTUnwrap(asString(d["file"]), name)
            let inputFile = try XCTUnwrap(asString(c["input"]), name)
            let pixels = try vectors.bytes(decodedFile)
            let image = try RGBImage(width: width, height: height, pixels: pixels)
            let got = Preprocess.tensor(image, orientation: orientation, size: size)
            let want = try vectors.bytes(inputFile)
            XCTAssertEqual(got.count, want.count, name)
            var differ = 0
            var worst = 0
            for i in 0..<min(got.count, want.count) {
                let diff = abs(Int(got[i]) - Int(want[i]))
                if diff > 0 {
                    differ += 1
                }
                worst = max(worst, diff)
            }
            XCTAssertLessThanOrEqual(
                worst, tolerance,
                "\(name) (\(width)x\(height), orientation \(orientation)): \(differ) of \(want.count) values differ, "
                    + "by up to \(worst) levels (allowed: \(tolerance))"
            )
        }
    }

    func testTheManifestMatchesTheOutputs() throws {
        let vectors = try golden()
        let manifest = try self.manifest(vectors)
        XCTAssertEqual(manifest.inputSize, asInt(vectors.doc["input_size"]))
        XCTAssertTrue(manifest.disclaimer.contains("not a diagnostic device"))
        let summary = manifest.trainingSummary ?? "(none)"
        XCTAssertTrue(summary.hasPrefix("Trained on "), summary)
        for c in vectors.cases {
            let name = asString(c["name"]) ?? "?"
            let outputs = try XCTUnwrap(asObject(c["outputs"]), name)
            var sizes: [String: Int] = [:]
            for (key, value) in outputs {
                sizes[key] = (value as? [Any])?.count ?? -1
            }
            XCTAssertEqual(manifest.outputProblems(sizes), [], name)
        }
    }

    func testPredictionsAreTheSdks() throws {
        let vectors = try golden()
        let manifest = try self.manifest(vectors)
        let operatingPoint = try XCTUnwrap(asString(vectors.doc["operating_point"]), "operating_point")
        let topK = try XCTUnwrap(asInt(vectors.doc["top_k"]), "top_k")
        let eps = try XCTUnwrap(asNumber(asObject(vectors.doc["tolerance"])?["outputs"]), "tolerance")
        let predictor = try Predictor(manifest: manifest, operatingPoint: operatingPoint, topK: topK)
        for c in vectors.cases {
            let name = asString(c["name"]) ?? "?"
            let outputs = try XCTUnwrap(asObject(c["outputs"]), name)
            var raw: [String: [Float]] = [:]
            for (key, value) in outputs {
                let values = try XCTUnwrap(value as? [Any], "\(name) \(key)")
                raw[key] = values.map { Float(asNumber($0) ?? Double.nan) }
            }
            let got = try predictor.predict(raw)
            let want = try XCTUnwrap(asObject(c["prediction"]), name)
            // the same shape: the SDK's to_dict() less its source
            XCTAssertEqual(Set(got.toJSONObject().keys), Set(want.keys).subtracting(["source"]), name)

            let levels = try XCTUnwrap(asObject(want["levels"]), name)
            XCTAssertEqual(Set(got.levels.keys), Set(levels.keys), name)
            XCTAssertEqual(got.levels.keys, manifest.levels, name) // the manifest's order, as the SDK's dict
            for (level, value) in levels {
                let probs = try XCTUnwrap(asObject(value), "\(name) \(level)")
                let mine = try XCTUnwrap(got.levels[level], "\(name) \(level)")
                XCTAssertEqual(Set(mine.keys), Set(probs.keys), "\(name) \(level)")
                XCTAssertEqual(mine.keys, manifest.output(named: "probs_" + level)?.labels, "\(name) \(level)")
                for (label, p) in probs {
                    near(p, mine[label], eps, "\(name) \(level) \(label)")
                }
            }

            let tasks = try XCTUnwrap(asObject(want["tasks"]), name)
            XCTAssertEqual(Set(got.tasks.keys), Set(tasks.keys), name)
            for (task, p) in tasks {
                near(p, got.tasks[task], eps, "\(name) task \(task)")
            }

            let top = try XCTUnwrap(want["top_classes"] as? [Any], name)
            XCTAssertEqual(got.topClasses.count, top.count, name)
            for (i, entry) in top.enumerated() where i < got.topClasses.count {
                let pair = try XCTUnwrap(entry as? [Any], "\(name) top \(i)")
                XCTAssertEqual(pair.count, 2, "\(name) top \(i)")
                XCTAssertEqual(got.topClasses[i].label, asString(pair.first), "\(name) top \(i)")
                near(pair.last, got.topClasses[i].probability, eps, "\(name) top \(i)")
            }

            let conditions = try XCTUnwrap(asObject(want["conditions"]), name)
            XCTAssertEqual(Set(got.conditions.keys), Set(conditions.keys), name)
            for (task, p) in conditions {
                near(p, got.conditions[task], eps, "\(name) condition \(task)")
            }

            let applies = try XCTUnwrap(asObject(want["applies"]), name)
            XCTAssertEqual(Set(got.applies.keys), Set(applies.keys), name)
            for (task, value) in applies {
                XCTAssertEqual(got.applies[task], asBool(value), "\(name) applies \(task)")
            }

            let decisions = try XCTUnwrap(asObject(want["decisions"]), name)
            XCTAssertEqual(Set(got.decisions.keys), Set(decisions.keys), name)
            for (task, value) in decisions {
                let what = "\(name) decision \(task)"
                let d = try XCTUnwrap(asObject(value), what)
                let mine = try XCTUnwrap(got.decisions[task], what)
                XCTAssertEqual(Set(mine.toJSONObject().keys), Set(d.keys), what)
                XCTAssertEqual(mine.task, asString(d["task"]), what)
                near(d["probability"], mine.probability, eps, what)
                // exact: strings, booleans, the manifest's numbers
                XCTAssertEqual(mine.threshold, asNumber(d["threshold"]), what)
                XCTAssertEqual(mine.positive, asBool(d["positive"]), what)
                XCTAssertEqual(mine.operatingPoint, asString(d["operating_point"]), what)
                XCTAssertEqual(mine.sensitivity, asNumber(d["sensitivity"]), what)
                XCTAssertEqual(mine.specificity, asNumber(d["specificity"]), what)
                XCTAssertEqual(mine.applies, asBool(d["applies"]), what)
            }
        }
        XCTAssertThrowsError(try Predictor(manifest: manifest, operatingPoint: "0.42")) { error in
            let message = (error as? DermError)?.message ?? "\(error)"
            XCTAssertTrue(message.contains("Operating point 0.42 is not in the manifest"), message)
        }
    }

    /// `got` within `eps` of the golden number `want`.
    private func near(
        _ want: Any?, _ got: Double?, _ eps: Double, _ what: String, file: StaticString = #filePath, line: UInt = #line
    ) {
        guard let w = asNumber(want), let g = got else {
            XCTFail("\(what): got \(String(describing: got)), want \(String(describing: want))", file: file, line: line)
            return
        }
        XCTAssertEqual(g, w, accuracy: eps, "\(what): got \(g), want \(w) (within \(eps))", file: file, line: line)
    }
}

// JSONSerialization's values on Darwin and Linux alike: numbers and booleans are NSNumber (an NSDecimalNumber for
// numbers with many digits, read through their digits), never cast from Any to Double or Int directly.

private func asObject(_ v: Any?) -> [String: Any]? {
    guard let v = v else { return nil }
    return v as? [String: Any]
}

private func asString(_ v: Any?) -> String? {
    guard let v = v else { return nil }
    return v as? String
}

private func asNumber(_ v: Any?) -> Double? {
    guard let v = v, let n = v as? NSNumber else { return nil }
    if let d = n as? NSDecimalNumber {
        return Double(d.stringValue) ?? d.doubleValue
    }
    return n.doubleValue
}

private func asInt(_ v: Any?) -> Int? {
    guard let d = asNumber(v), d.isFinite, abs(d) < 9.0e18 else { return nil }
    return Int(d)
}

private func asBool(_ v: Any?) -> Bool? {
    guard let v = v, let n = v as? NSNumber else { return nil }
    return n.boolValue
}
