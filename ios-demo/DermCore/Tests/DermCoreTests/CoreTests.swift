import DermCore
import Foundation
import XCTest

/// Rules that hold without golden vectors (ports of android-demo/core's CoreTest and web/test/core.test.mjs):
/// orientation, the box reduction, the resize's pass order, manifests of other versions, operating points.
final class CoreTests: XCTestCase {
    private func image(_ w: Int, _ h: Int) throws -> RGBImage {
        return try RGBImage(width: w, height: h, pixels: (0..<(w * h * 3)).map { UInt8($0 * 7 % 251) })
    }

    /// The DermError `body` throws, or nil (a failure is recorded when it throws something else or nothing).
    private func refusal<T>(_ body: () throws -> T, file: StaticString = #filePath, line: UInt = #line) -> DermError? {
        do {
            _ = try body()
            XCTFail("nothing was thrown", file: file, line: line)
        } catch let error as DermError {
            return error
        } catch {
            XCTFail("not a DermError: \(error)", file: file, line: line)
        }
        return nil
    }

    func testOrientationsComposeLikeRotations() throws {
        let im = try image(5, 3)
        func o(_ image: RGBImage, _ orientation: Int) -> RGBImage {
            return Preprocess.orient(image, orientation: orientation)
        }
        let cw = o(im, 6)
        XCTAssertEqual(cw.width, 3)
        XCTAssertEqual(cw.height, 5)
        XCTAssertEqual(o(cw, 8).pixels, im.pixels) // 90 clockwise then 90 counter-clockwise
        XCTAssertEqual(o(o(im, 3), 3).pixels, im.pixels)
        XCTAssertEqual(o(o(im, 2), 2).pixels, im.pixels)
        XCTAssertEqual(o(o(im, 4), 4).pixels, im.pixels)
        XCTAssertEqual(o(o(im, 5), 5).pixels, im.pixels)
        XCTAssertEqual(o(o(im, 7), 7).pixels, im.pixels)
        XCTAssertEqual(o(o(im, 6), 6).pixels, o(im, 3).pixels)
        XCTAssertEqual(o(o(im, 2), 6).pixels, o(im, 7).pixels)
        XCTAssertEqual(o(im, 1), im)
        XCTAssertEqual(o(im, 0), im) // an unknown orientation: unchanged
        // the top-left pixel of a photo taken rotated (orientation 6) is its stored bottom-left one
        XCTAssertEqual(cw.at(0, 0, 0), im.at(0, 2, 0))
    }

    func testReductionIsTheRoundedMeanOfEachBlock() throws {
        var px = [UInt8](repeating: 0, count: 3 * 3 * 3)
        for i in 0..<9 {
            px[i * 3] = UInt8(i * 10) // red: 0, 10, ..., 80
        }
        let block = try RGBImage(width: 3, height: 3, pixels: px)
        let r = Preprocess.reduce(block, factor: 2)
        XCTAssertEqual(r.width, 2)
        XCTAssertEqual(r.height, 2)
        XCTAssertEqual(r.at(0, 0, 0), (0 + 10 + 30 + 40 + 2) / 4) // full block
        XCTAssertEqual(r.at(1, 0, 0), (20 + 50 + 1) / 2) // the right edge's partial block
        XCTAssertEqual(r.at(1, 1, 0), 80) // the corner
    }

    func testAResizeToTheSameSizeChangesNothingAndRGBARoundTrips() throws {
        let im = try image(4, 4)
        XCTAssertEqual(Preprocess.resize(im, size: 4).pixels, im.pixels)
        XCTAssertEqual(Preprocess.tensor(im, orientation: 1, size: 4), im.pixels)
        let rgba = Preprocess.toRGBA(im)
        XCTAssertEqual(rgba.count, 4 * 4 * 4)
        XCTAssertEqual(rgba[3], 255)
        XCTAssertEqual(Preprocess.fromRGBA(width: 4, height: 4, bytes: rgba).pixels, im.pixels)
        // rows padded to 20 bytes, as a bitmap context may lay them out
        var padded = [UInt8](repeating: 7, count: 20 * 4)
        for y in 0..<4 {
            for i in 0..<16 {
                padded[y * 20 + i] = rgba[y * 16 + i]
            }
        }
        XCTAssertEqual(Preprocess.fromRGBA(width: 4, height: 4, bytes: padded, bytesPerRow: 20), im)
        let wrong = refusal { try RGBImage(width: 4, height: 4, pixels: [UInt8](repeating: 0, count: 5)) }
        XCTAssertTrue(wrong?.message.contains("take 48 bytes") ?? false, "\(String(describing: wrong))")
        let empty = refusal { try RGBImage(width: 0, height: 4, pixels: []) }
        XCTAssertTrue(empty?.message.contains("needs pixels") ?? false, "\(String(describing: empty))")
    }

    func testATallImageIsResizedVerticallyFirstAsPillow13Does() throws {
        // The height loses more than twice the pixels the width does: Pillow 13 (the SDK's pin) starts with the
        // vertical pass. Horizontal first would give 118, 126, 144 at bytes 4-6 and 119 at byte 23. Expected bytes
        // from Pillow 13.
        let im = try RGBImage(width: 7, height: 23, pixels: (0..<(7 * 23 * 3)).map { UInt8($0 * 37 % 256) })
        let want: [UInt8] = [
            101, 113, 138, 134, 117, 125, 143, 147, 119, 135, 129, 120, 124, 137, 130, 126, 117, 131, 124, 130, 149,
            135, 111, 120, 129, 132, 115,
        ]
        XCTAssertEqual(Preprocess.bilinear(im, width: 3, height: 3).pixels, want)
    }

    func testALargePhotoIsReducedThenResized() throws {
        // over 4x the input side: a box reduction by min(w, h) / (2 x size) first, then the bilinear filter
        let im = try image(40, 36)
        let direct = Preprocess.bilinear(Preprocess.reduce(im, factor: 4), width: 4, height: 4)
        XCTAssertEqual(Preprocess.resize(im, size: 4), direct)
        XCTAssertEqual(direct.width, 4)
        XCTAssertEqual(direct.pixels.count, 4 * 4 * 3)
    }

    func testManifestsOfAnotherFormatOrShapeAreRefused() throws {
        let other = refusal { try Manifest.parse(#"{"format": "derm-manifest/9"}"#, source: "m.tflite") }
        guard case .unsupportedManifest(let message)? = other else {
            return XCTFail("\(String(describing: other))")
        }
        XCTAssertTrue(message.contains("derm-manifest/9"), message)
        XCTAssertTrue(message.hasPrefix("m.tflite: "), message)
        XCTAssertTrue(other?.isModelFileError ?? false)

        let cases: [(text: String, expected: String)] = [
            (#"{"labels": []}"#, "no 'format'"),
            ("not json", "not valid JSON"),
            ("[1, 2]", "not valid JSON"),
            (#"{"format": "derm-manifest/1", "input": {"shape": [1, 8, 9, 3]}}"#,
             "input shape [1,8,9,3] is not [1, S, S, 3]"),
            (#"{"format": "derm-manifest/1"}"#, "not what derm-export writes (JSONObject[\"input\"] not found.)"),
            (#"{"format": "derm-manifest/1", "input": {"shape": [1, 8, 8, 3]}, "outputs": [{"name": "x"}]}"#,
             "not what derm-export writes (JSONObject[\"kind\"] not found.)"),
        ]
        for (text, expected) in cases {
            let error = refusal { try Manifest.parse(text, source: "m.tflite") }
            guard case .modelFile(let message)? = error else {
                XCTFail("\(text): \(String(describing: error))")
                continue
            }
            XCTAssertTrue(message.contains(expected), "\(text): \(message)")
        }

        let m = try Manifest.parse(
            """
            {"format": "derm-manifest/1", "input": {"shape": [1, 8, 8, 3]},
             "outputs": [{"name": "probs_three", "kind": "level", "labels": ["benign", "malignant", "non_neoplastic"]}]}
            """,
            source: "m.tflite"
        )
        XCTAssertEqual(m.inputSize, 8)
        XCTAssertEqual(m.inputName, "image")
        XCTAssertEqual(m.levels, ["three"])
        XCTAssertEqual(m.outputProblems(["probs_three": 2]), ["output probs_three has 2 values, the manifest names 3"])
        XCTAssertEqual(m.outputProblems(["probs_three": 3, "extra": 1]), ["output extra is not in the manifest"])
        XCTAssertEqual(m.outputProblems([:]), ["output probs_three is missing from the model"])
        XCTAssertEqual(m.outputProblems(["probs_three": 3]), [])
        XCTAssertTrue(m.disclaimer.contains("not a diagnostic device"))
        XCTAssertEqual(m.disclaimer, Manifest.defaultDisclaimer)
        XCTAssertNil(m.weightsSha256)
        XCTAssertNil(m.trainingSummary)
        XCTAssertEqual(m.output(named: "probs_three")?.labels.count, 3)
        XCTAssertNil(m.output(named: "probs_nine"))
    }

    /// A small manifest with a conditional task (with operating points) and a task without any.
    private let taskManifest = """
        {"format": "derm-manifest/1", "input": {"shape": [1, 96, 96, 3], "name": "image"},
         "disclaimer": "Not a diagnostic device.",
         "integrity": {"weights_sha256": "abc123"},
         "training": {"data": {"images": 48, "labels": {"nv": 10, "mel": 12, "bcc": 12, "bkl": 9, "a": 1, "b": 2}}},
         "operating_points": {"mel_vs_nv": {"by_sensitivity": {
             "0.9": {"threshold": 0.7, "sensitivity": 1.0, "specificity": null},
             "0.8": {"threshold": 0.8, "sensitivity": 0.75, "specificity": 0.5}}}},
         "outputs": [
          {"name": "training_probs", "kind": "training", "labels": ["bkl", "nv", "bcc", "mel"]},
          {"name": "probs_three", "kind": "level", "labels": ["benign", "malignant", "non_neoplastic"]},
          {"name": "task_mel_vs_nv", "kind": "task", "labels": ["mel_vs_nv"],
           "task": {"id": "mel_vs_nv", "name": "Melanoma vs nevus", "positive_name": "melanoma",
                    "positive_classes": ["mel"], "negative_classes": ["nv"], "condition_threshold": 0.5}},
          {"name": "task_bcc_vs_bkl", "kind": "task", "labels": ["bcc_vs_bkl"],
           "task": {"id": "bcc_vs_bkl", "positive_classes": ["bcc"], "negative_classes": ["bkl"]}}
         ]}
        """

    /// The summary lists the largest classes first; equal counts by name (the order derm writes them in: a Swift
    /// dictionary keeps no order, so DermCore sorts them by name where Kotlin and JavaScript keep the file's order).
    func testManifestTasksAndSummary() throws {
        let m = try Manifest.parse(taskManifest, source: "small.mlpackage")
        XCTAssertEqual(m.weightsSha256, "abc123")
        XCTAssertEqual(m.disclaimer, "Not a diagnostic device.")
        XCTAssertEqual(
            m.trainingSummary, "Trained on 48 labelled images, 6 diagnoses (bcc 12, mel 12, nv 10, bkl 9, b 2, ...)"
        )
        XCTAssertEqual(m.tasks.map { $0.id }, ["mel_vs_nv", "bcc_vs_bkl"])
        let mel = m.tasks[0]
        XCTAssertEqual(mel.name, "Melanoma vs nevus")
        XCTAssertEqual(mel.positiveName, "melanoma")
        XCTAssertNil(mel.condition)
        XCTAssertEqual(mel.operatingPoints["0.9"], OperatingPoint(threshold: 0.7, sensitivity: 1.0, specificity: nil))
        XCTAssertEqual(mel.operatingPoints["0.8"]?.specificity, 0.5)
        XCTAssertEqual(m.tasks[1].name, "bcc_vs_bkl") // the id when the manifest gives no name
        XCTAssertEqual(m.tasks[1].conditionThreshold, Manifest.defaultConditionThreshold)
        XCTAssertTrue(m.tasks[1].operatingPoints.isEmpty)

        let inconsistent = taskManifest.replacingOccurrences(of: #"["mel"]"#, with: #"["mel", "scc"]"#)
        let error = refusal { try Manifest.parse(inconsistent, source: "bad.mlpackage") }
        XCTAssertEqual(
            error,
            DermError.modelFile(
                "bad.mlpackage: the manifest's task mel_vs_nv names training classes [scc] that its training_probs "
                    + "output lacks; the file is inconsistent. Re-export it with derm-export."
            )
        )
    }

    func testPredictionsNameSumAndCompare() throws {
        let m = try Manifest.parse(taskManifest, source: "small.mlpackage")
        let predictor = try Predictor(manifest: m, operatingPoint: "0.9", topK: 2)
        let outputs: [String: [Float]] = [
            "training_probs": [0.1, 0.2, 0.3, 0.4],
            "probs_three": [0.3, 0.7, 0.0],
            "task_mel_vs_nv": [0.75],
            "task_bcc_vs_bkl": [0.25],
        ]
        let p = try predictor.predict(outputs)
        XCTAssertEqual(p.levels.keys, ["three"])
        XCTAssertEqual(p.levels["three"]?.keys, ["benign", "malignant", "non_neoplastic"])
        XCTAssertEqual(p.levels["three"]?["malignant"], Double(Float(0.7)))
        XCTAssertEqual(p.tasks.keys, ["mel_vs_nv", "bcc_vs_bkl"])
        XCTAssertEqual(p.topClasses.map { $0.label }, ["mel", "bcc"])
        XCTAssertEqual(p.topClasses[0].probability, Double(Float(0.4)))
        XCTAssertEqual(p.conditions["mel_vs_nv"], Double(Float(0.4)) + Double(Float(0.2)))
        XCTAssertEqual(p.conditions["bcc_vs_bkl"], Double(Float(0.3)) + Double(Float(0.1)))
        XCTAssertEqual(p.applies["mel_vs_nv"], true) // 0.6 >= 0.5
        XCTAssertEqual(p.applies["bcc_vs_bkl"], false) // 0.4 < 0.5
        let mel = try XCTUnwrap(p.decisions["mel_vs_nv"])
        XCTAssertEqual(mel.threshold, 0.7)
        XCTAssertTrue(mel.positive)
        XCTAssertEqual(mel.operatingPoint, "0.9")
        XCTAssertEqual(mel.sensitivity, 1.0)
        XCTAssertNil(mel.specificity)
        let bcc = try XCTUnwrap(p.decisions["bcc_vs_bkl"])
        XCTAssertEqual(bcc.operatingPoint, Predictor.noPoint)
        XCTAssertEqual(bcc.threshold, 0.5)
        XCTAssertFalse(bcc.positive)
        XCTAssertFalse(bcc.applies)

        let json = p.toJSONObject()
        XCTAssertEqual(Set(json.keys), ["levels", "tasks", "top_classes", "decisions", "conditions", "applies"])
        let decisions = try XCTUnwrap(json["decisions"] as? [String: Any])
        let melJSON = try XCTUnwrap(decisions["mel_vs_nv"] as? [String: Any])
        XCTAssertEqual(
            Set(melJSON.keys),
            ["task", "probability", "threshold", "positive", "operating_point", "sensitivity", "specificity", "applies"]
        )
        XCTAssertTrue(melJSON["specificity"] is NSNull)
        XCTAssertTrue(JSONSerialization.isValidJSONObject(json))

        let missing = refusal { try predictor.predict(["probs_three": [0.3, 0.7, 0.0]]) }
        XCTAssertTrue(missing?.message.contains("gave no output") ?? false, "\(String(describing: missing))")
        var short = outputs
        short["probs_three"] = [0.3]
        let shortError = refusal { try predictor.predict(short) }
        XCTAssertTrue(shortError?.isModelFileError ?? false, "\(String(describing: shortError))")
    }

    func testAnUnknownOperatingPointIsRefused() throws {
        let m = try Manifest.parse(taskManifest, source: "small.mlpackage")
        let error = refusal { try Predictor(manifest: m, operatingPoint: "0.42") }
        XCTAssertEqual(
            error,
            DermError.invalidArgument(
                "Operating point 0.42 is not in the manifest for mel_vs_nv; it has 0.8, 0.9 (target sensitivities)."
            )
        )
        XCTAssertEqual(try Predictor(manifest: m).operatingPoint, Predictor.defaultOperatingPoint)
    }
}
