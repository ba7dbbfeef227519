import Foundation

/// A binary task's operating point, measured on the training run's held-out images.
public struct OperatingPoint: Equatable {
    public let threshold: Double
    /// Nil: not measured.
    public let sensitivity: Double?
    public let specificity: Double?

    public init(threshold: Double, sensitivity: Double?, specificity: Double?) {
        self.threshold = threshold
        self.sensitivity = sensitivity
        self.specificity = specificity
    }
}

/// A conditional binary task (e.g. P(melanoma | melanoma or nevus)) as the manifest describes it. (Kotlin's and
/// JavaScript's `Task`; named `TaskSpec` here so that it never shadows Swift concurrency's `Task` in an app.)
public struct TaskSpec: Equatable {
    public let id: String
    public let name: String
    /// The task's condition in words; nil in files exported before the manifest said it.
    public let condition: String?
    public let positiveName: String?
    /// Training classes whose probabilities form the condition (positive + negative); empty: always applies.
    public let positiveClasses: [String]
    public let negativeClasses: [String]
    public let conditionThreshold: Double
    /// Target sensitivity ("0.9") -> operating point.
    public let operatingPoints: [String: OperatingPoint]

    public init(
        id: String, name: String, condition: String?, positiveName: String?, positiveClasses: [String],
        negativeClasses: [String], conditionThreshold: Double, operatingPoints: [String: OperatingPoint]
    ) {
        self.id = id
        self.name = name
        self.condition = condition
        self.positiveName = positiveName
        self.positiveClasses = positiveClasses
        self.negativeClasses = negativeClasses
        self.conditionThreshold = conditionThreshold
        self.operatingPoints = operatingPoints
    }
}

/// One output tensor of the model.
public struct OutputSpec: Equatable {
    public let name: String
    /// "level", "training" or "task".
    public let kind: String
    public let labels: [String]
    public let names: [String]
    public let task: TaskSpec?

    public init(name: String, kind: String, labels: [String], names: [String], task: TaskSpec?) {
        self.name = name
        self.kind = kind
        self.labels = labels
        self.names = names
        self.task = task
    }
}

/// The manifest `derm-export` embeds in every file (in a Core ML package: its creator-defined metadata): what the
/// app must do before the model, what each output means, the tasks and their operating points, and the disclaimer.
/// Read with `JSONSerialization` and org.json's rules (as the Kotlin and JavaScript ports): extra fields are
/// ignored, and a field of the wrong kind gives the same message as on Android and the web.
public struct Manifest {
    /// The manifest format this version reads.
    public static let supportedFormat = "derm-manifest/1"
    public static let defaultConditionThreshold = 0.5
    public static let defaultDisclaimer =
        "A research and triage aid, not a diagnostic device: it does not replace examination by a clinician."

    /// The whole manifest, as `JSONSerialization` read it (for fields this type does not name).
    public let json: [String: Any]
    public let format: String
    public let inputSize: Int
    public let inputName: String
    public let outputs: [OutputSpec]
    public let disclaimer: String
    /// Inference levels baked into the file, e.g. ["three", "nine"].
    public let levels: [String]
    public let tasks: [TaskSpec]
    /// What the model was trained on, in one line for the screen (from the manifest's `training.data`).
    public let trainingSummary: String?
    /// The sha256 of the file's tensor buffers recorded at export (nil in files exported before it was).
    public let weightsSha256: String?

    /// Reads a manifest's text, refusing other formats before anything else is trusted. `source` names the file in
    /// messages.
    public static func parse(_ text: String, source: String = "the manifest") throws -> Manifest {
        return try parse(data: Data(text.utf8), source: source)
    }

    /// Reads a manifest's UTF-8 bytes (see `parse(_:source:)`).
    public static func parse(data: Data, source: String = "the manifest") throws -> Manifest {
        let parsed: Any
        do {
            parsed = try JSONSerialization.jsonObject(with: data, options: [])
        } catch {
            throw DermError.modelFile("\(source): its manifest is not valid JSON (\(error.localizedDescription)).")
        }
        guard let json = parsed as? [String: Any] else {
            throw DermError.modelFile(
                "\(source): its manifest is not valid JSON (A JSONObject text must begin with '{')."
            )
        }
        let format = JSONRead.optString(json["format"], "")
        if format.isEmpty {
            throw DermError.modelFile("\(source): the manifest has no 'format'; not a derm manifest.")
        }
        if format != supportedFormat {
            throw DermError.unsupportedManifest(
                "\(source): manifest format '\(format)' is newer or other than this app reads (\(supportedFormat)). "
                    + "Update the app, or export the model with the derm version this app was built for."
            )
        }
        return try Manifest(json: json, source: source)
    }

    /// What `read` takes from the JSON; a failure there is one message about the whole manifest.
    private struct Parsed {
        let trainingSummary: String?
        let inputSize: Int
        let inputName: String
        let outputs: [OutputSpec]
        let disclaimer: String
    }

    private init(json: [String: Any], source: String) throws {
        self.json = json
        format = JSONRead.optString(json["format"], "")
        let sha = JSONRead.optString(JSONRead.object(json["integrity"])?["weights_sha256"], "")
        weightsSha256 = sha.isEmpty ? nil : sha
        let parsed: Parsed
        do {
            parsed = try Manifest.read(json, source: source)
        } catch let failure as JSONFailure {
            throw DermError.modelFile("\(source): the manifest is not what derm-export writes (\(failure.message)).")
        }
        trainingSummary = parsed.trainingSummary
        inputSize = parsed.inputSize
        inputName = parsed.inputName
        outputs = parsed.outputs
        disclaimer = parsed.disclaimer
        levels = parsed.outputs.filter { $0.kind == "level" }.map { Manifest.levelName($0.name) }
        tasks = parsed.outputs.compactMap { $0.task }
        let training = parsed.outputs.first { $0.kind == "training" }
        for task in tasks {
            let missing = (task.positiveClasses + task.negativeClasses).filter { c in
                !(training?.labels.contains(c) ?? false)
            }
            if !missing.isEmpty {
                let classes = missing.joined(separator: ", ")
                throw DermError.modelFile(
                    "\(source): the manifest's task \(task.id) names training classes [\(classes)] that its "
                        + "training_probs output lacks; the file is inconsistent. Re-export it with derm-export."
                )
            }
        }
    }

    private static func read(_ json: [String: Any], source: String) throws -> Parsed {
        let summary = try Manifest.summary(JSONRead.object(JSONRead.object(json["training"])?["data"]))
        let input = try JSONRead.getObject(json, "input")
        let shape = try JSONRead.getArray(input, "shape")
        let size = try JSONRead.getInt(shape, 1)
        let name = JSONRead.optString(input["name"], "image")
        var square = shape.count == 4
        if square {
            square = try JSONRead.getInt(shape, 2) == size
        }
        if square {
            square = try JSONRead.getInt(shape, 3) == 3
        }
        if !square {
            throw DermError.modelFile(
                "\(source): the manifest's input shape \(JSONRead.text(shape)) is not [1, S, S, 3]."
            )
        }
        let points = JSONRead.object(json["operating_points"]) ?? [:]
        let outs = try JSONRead.getArray(json, "outputs")
        var outputs: [OutputSpec] = []
        outputs.reserveCapacity(outs.count)
        for i in 0..<outs.count {
            let o = try JSONRead.getObject(outs, i)
            var task: TaskSpec? = nil
            if let t = JSONRead.object(o["task"]) {
                task = try Manifest.parseTask(t, points)
            }
            let outputName = try JSONRead.getString(o, "name")
            let kind = try JSONRead.getString(o, "kind")
            let labels = try JSONRead.strings(o, "labels")
            let names = try JSONRead.strings(o, "names")
            outputs.append(OutputSpec(name: outputName, kind: kind, labels: labels, names: names, task: task))
        }
        let disclaimer = JSONRead.optString(json["disclaimer"], Manifest.defaultDisclaimer)
        return Parsed(
            trainingSummary: summary,
            inputSize: size,
            inputName: name,
            outputs: outputs,
            disclaimer: disclaimer.isEmpty ? Manifest.defaultDisclaimer : disclaimer
        )
    }

    /// "Trained on N labelled images, K diagnoses (a 12, b 9, ...)": the five largest classes. Classes with equal
    /// counts keep the manifest's order, which derm writes sorted by name (JSONSerialization keeps no key order, so
    /// the name is the tie-break here).
    private static func summary(_ d: [String: Any]?) throws -> String? {
        guard let d = d else { return nil }
        let labels = JSONRead.object(d["labels"]) ?? [:]
        var counts: [(label: String, count: Int)] = []
        for key in labels.keys.sorted() {
            let count = try JSONRead.getInt(labels, key)
            counts.append((label: key, count: count))
        }
        counts.sort { a, b in a.count != b.count ? a.count > b.count : a.label < b.label }
        let shown = counts.prefix(5).map { "\($0.label) \($0.count)" }.joined(separator: ", ")
            + (counts.count > 5 ? ", ..." : "")
        let images = JSONRead.truncated(JSONRead.number(d["images"]) ?? 0) ?? 0
        return "Trained on \(images) labelled images, \(counts.count) diagnoses (\(shown))"
    }

    private static func parseTask(_ t: [String: Any], _ points: [String: Any]) throws -> TaskSpec {
        let id = try JSONRead.getString(t, "id")
        let by = JSONRead.object(JSONRead.object(points[id])?["by_sensitivity"]) ?? [:]
        var operatingPoints: [String: OperatingPoint] = [:]
        for key in by.keys.sorted() {
            let p = try JSONRead.getObject(by, key)
            let threshold = try JSONRead.getNumber(p, "threshold")
            operatingPoints[key] = OperatingPoint(
                threshold: threshold,
                sensitivity: JSONRead.measured(p["sensitivity"]),
                specificity: JSONRead.measured(p["specificity"])
            )
        }
        var condition: String? = nil
        if !JSONRead.isNull(t["condition"]) {
            condition = try JSONRead.getString(t, "condition")
        }
        var positiveName: String? = nil
        if !JSONRead.isNull(t["positive_name"]) {
            positiveName = try JSONRead.getString(t, "positive_name")
        }
        let positiveClasses = try JSONRead.strings(t, "positive_classes")
        let negativeClasses = try JSONRead.strings(t, "negative_classes")
        return TaskSpec(
            id: id,
            name: JSONRead.optString(t["name"], id),
            condition: condition,
            positiveName: positiveName,
            positiveClasses: positiveClasses,
            negativeClasses: negativeClasses,
            conditionThreshold: JSONRead.number(t["condition_threshold"]) ?? Manifest.defaultConditionThreshold,
            operatingPoints: operatingPoints
        )
    }

    /// A level output's level: its name without the "probs_" prefix.
    static func levelName(_ outputName: String) -> String {
        let prefix = "probs_"
        return outputName.hasPrefix(prefix) ? String(outputName.dropFirst(prefix.count)) : outputName
    }

    /// The output with this name, if the manifest has one.
    public func output(named name: String) -> OutputSpec? {
        return outputs.first { $0.name == name }
    }

    /// What is wrong between the manifest and the tensors the model reports (name -> number of values per image);
    /// empty when they match. An app refuses a file with problems instead of showing mislabelled numbers. Outputs
    /// the manifest does not name are listed last, sorted by name.
    public func outputProblems(_ actual: [String: Int]) -> [String] {
        var problems: [String] = []
        for o in outputs {
            if let n = actual[o.name] {
                if n != o.labels.count {
                    problems.append("output \(o.name) has \(n) values, the manifest names \(o.labels.count)")
                }
            } else {
                problems.append("output \(o.name) is missing from the model")
            }
        }
        let named = Set(outputs.map { $0.name })
        for name in actual.keys.sorted() where !named.contains(name) {
            problems.append("output \(name) is not in the manifest")
        }
        return problems
    }
}
