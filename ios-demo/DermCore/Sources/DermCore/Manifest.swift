import Foundation

/// What goes wrong in the derm core. Every message is for the user and names the file; an app shows it on a screen.
public enum DermError: Error, LocalizedError, Equatable {
    /// A model file (or its manifest, or its outputs) that cannot be used.
    case modelFile(String)
    /// The file may be fine, but this version of the app does not read its manifest format.
    case unsupportedManifest(String)
    /// A caller's argument that does not fit the model, e.g. an operating point the manifest does not have.
    case invalidArgument(String)
    /// Pixels that do not make the image they claim to be.
    case invalidImage(String)

    /// The message for the user.
    public var message: String {
        switch self {
        case .modelFile(let m), .unsupportedManifest(let m), .invalidArgument(let m), .invalidImage(let m):
            return m
        }
    }

    public var errorDescription: String? { message }

    /// True for the errors that mean "this file cannot be used here" (Kotlin's `ModelFileException` and its
    /// subclass `UnsupportedManifestException`).
    public var isModelFileError: Bool {
        switch self {
        case .modelFile, .unsupportedManifest:
            return true
        case .invalidArgument, .invalidImage:
            return false
        }
    }
}

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

// MARK: - org.json's accessors, as far as the manifest needs them: the same leniency and the same failures.

/// A field of the wrong kind, with org.json's message (e.g. `JSONObject["input"] not found.`).
struct JSONFailure: Error {
    let message: String
    init(_ message: String) { self.message = message }
}

/// Values as `JSONSerialization` gives them on Darwin and on Linux (swift-corelibs-foundation): `[String: Any]`,
/// `[Any]`, `String`, `NSNull`, and `NSNumber` for numbers and booleans alike (an `NSDecimalNumber` for numbers with
/// many digits). Numbers are read through `NSNumber`, never by casting `Any` to `Double` or `Int`, which does not
/// bridge the same way on both platforms.
enum JSONRead {
    static func isNull(_ v: Any?) -> Bool {
        guard let v = v else { return true }
        return v is NSNull
    }

    static func object(_ v: Any?) -> [String: Any]? {
        guard let v = v else { return nil }
        return v as? [String: Any]
    }

    static func array(_ v: Any?) -> [Any]? {
        guard let v = v else { return nil }
        return v as? [Any]
    }

    /// JSON `true` and `false` (a CFBoolean on both platforms), as opposed to the numbers 1 and 0.
    static func isBoolean(_ n: NSNumber) -> Bool {
        #if canImport(Darwin)
        return CFGetTypeID(n) == CFBooleanGetTypeID()
        #else
        return String(cString: n.objCType) == "c"
        #endif
    }

    /// A JSON number (never a boolean) as a Double. Decimal numbers go through their digits, so that a number with
    /// 17 significant digits is the Double Python wrote.
    static func numeric(_ v: Any?) -> Double? {
        guard let v = v, let n = v as? NSNumber, !isBoolean(n) else { return nil }
        if let d = n as? NSDecimalNumber {
            return Double(d.stringValue) ?? d.doubleValue
        }
        return n.doubleValue
    }

    /// org.json's `optDouble`: a number, or a string that reads as one; nil otherwise (or NaN).
    static func number(_ v: Any?) -> Double? {
        var value: Double? = nil
        if let s = v as? String {
            let trimmed = s.trimmingCharacters(in: .whitespacesAndNewlines)
            value = trimmed.isEmpty ? nil : Double(trimmed)
        } else {
            value = numeric(v)
        }
        guard let d = value, !d.isNaN else { return nil }
        return d
    }

    /// A sensitivity or specificity: nil when null or absent (not measured), NaN when not a number.
    static func measured(_ v: Any?) -> Double? {
        return isNull(v) ? nil : (number(v) ?? Double.nan)
    }

    /// A Double truncated toward zero, as org.json's `getInt`; nil when no Int holds it.
    static func truncated(_ d: Double) -> Int? {
        guard d.isFinite, abs(d) < 9.0e18 else { return nil }
        return Int(d)
    }

    /// A value as text: a string as it is, anything else as JSON (org.json's `optString`).
    static func text(_ v: Any) -> String {
        if let s = v as? String { return s }
        if let n = v as? NSNumber {
            if isBoolean(n) { return n.boolValue ? "true" : "false" }
            let d = numeric(n) ?? n.doubleValue
            if d == d.rounded(), let i = truncated(d) { return String(i) }
            return String(d)
        }
        if v is NSNull { return "null" }
        if JSONSerialization.isValidJSONObject(v),
           let data = try? JSONSerialization.data(withJSONObject: v, options: []),
           let s = String(data: data, encoding: .utf8) {
            return s
        }
        return String(describing: v)
    }

    /// org.json's `optString(key, fallback)`: the fallback for null or absent.
    static func optString(_ v: Any?, _ fallback: String) -> String {
        guard let v = v, !(v is NSNull) else { return fallback }
        return text(v)
    }

    // The getters: a value that must be there, of one kind.

    private static func key(_ k: String) -> String { return "JSONObject[\"\(k)\"]" }

    private static func index(_ i: Int) -> String { return "JSONArray[\(i)]" }

    private static func element(_ a: [Any], _ i: Int) -> Any? {
        return i >= 0 && i < a.count ? a[i] : nil
    }

    private static func present(_ v: Any?, _ at: String) throws -> Any {
        guard let v = v, !(v is NSNull) else { throw JSONFailure("\(at) not found.") }
        return v
    }

    private static func objectValue(_ v: Any?, _ at: String) throws -> [String: Any] {
        let value = try present(v, at)
        guard let o = object(value) else { throw JSONFailure("\(at) is not a JSONObject.") }
        return o
    }

    private static func arrayValue(_ v: Any?, _ at: String) throws -> [Any] {
        let value = try present(v, at)
        guard let a = array(value) else { throw JSONFailure("\(at) is not a JSONArray.") }
        return a
    }

    private static func stringValue(_ v: Any?, _ at: String) throws -> String {
        let value = try present(v, at)
        if value is String || value is NSNumber { return text(value) }
        throw JSONFailure("\(at) is not a string.")
    }

    private static func numberValue(_ v: Any?, _ at: String) throws -> Double {
        let value = try present(v, at)
        guard let d = number(value) else { throw JSONFailure("\(at) is not a number.") }
        return d
    }

    private static func intValue(_ v: Any?, _ at: String) throws -> Int {
        let d = try numberValue(v, at)
        guard let i = truncated(d) else { throw JSONFailure("\(at) is not a number.") }
        return i
    }

    static func getObject(_ o: [String: Any], _ k: String) throws -> [String: Any] {
        return try objectValue(o[k], key(k))
    }

    static func getObject(_ a: [Any], _ i: Int) throws -> [String: Any] {
        return try objectValue(element(a, i), index(i))
    }

    static func getArray(_ o: [String: Any], _ k: String) throws -> [Any] {
        return try arrayValue(o[k], key(k))
    }

    static func getString(_ o: [String: Any], _ k: String) throws -> String {
        return try stringValue(o[k], key(k))
    }

    static func getNumber(_ o: [String: Any], _ k: String) throws -> Double {
        return try numberValue(o[k], key(k))
    }

    static func getInt(_ o: [String: Any], _ k: String) throws -> Int {
        return try intValue(o[k], key(k))
    }

    static func getInt(_ a: [Any], _ i: Int) throws -> Int {
        return try intValue(element(a, i), index(i))
    }

    /// A list of strings; empty when the field is absent or not a list.
    static func strings(_ o: [String: Any], _ k: String) throws -> [String] {
        guard let a = array(o[k]) else { return [] }
        var out: [String] = []
        out.reserveCapacity(a.count)
        for i in 0..<a.count {
            let s = try stringValue(a[i], index(i))
            out.append(s)
        }
        return out
    }
}
