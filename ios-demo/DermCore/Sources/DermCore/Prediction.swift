import Foundation

/// A dictionary from strings that keeps the order its keys were first set in (as Kotlin's `LinkedHashMap`, a
/// JavaScript object and a Python dict): a prediction's labels, tasks and calls come in the manifest's order.
/// Setting a key again changes its value, not its place; setting nil removes it.
public struct OrderedMap<Value>: Sequence {
    public typealias Element = (key: String, value: Value)

    /// The keys, in order.
    public private(set) var keys: [String] = []
    private var storage: [String: Value] = [:]

    public init() {}

    public init(_ pairs: [(String, Value)]) {
        for (key, value) in pairs {
            self[key] = value
        }
    }

    public subscript(key: String) -> Value? {
        get {
            return storage[key]
        }
        set {
            if let value = newValue {
                if storage.updateValue(value, forKey: key) == nil {
                    keys.append(key)
                }
            } else if storage.removeValue(forKey: key) != nil {
                keys.removeAll { $0 == key }
            }
        }
    }

    public var count: Int { return keys.count }

    public var isEmpty: Bool { return keys.isEmpty }

    /// The values, in the keys' order.
    public var values: [Value] {
        return keys.compactMap { storage[$0] }
    }

    /// The same entries as a Swift dictionary (unordered).
    public var dictionary: [String: Value] { return storage }

    public func contains(key: String) -> Bool {
        return storage[key] != nil
    }

    public func makeIterator() -> IndexingIterator<[Element]> {
        var pairs: [Element] = []
        pairs.reserveCapacity(keys.count)
        for key in keys {
            if let value = storage[key] {
                pairs.append((key: key, value: value))
            }
        }
        return pairs.makeIterator()
    }
}

extension OrderedMap: Equatable where Value: Equatable {}

/// A binary task's call at an operating point (as the SDK's `Decision`).
public struct Decision: Equatable {
    public let task: String
    public let probability: Double
    public let threshold: Double
    public let positive: Bool
    /// The manifest's key (target sensitivity, e.g. "0.9"), or the default rule when the file has none.
    public let operatingPoint: String
    public let sensitivity: Double?
    public let specificity: Double?
    /// False: the task's condition does not hold for this image; disregard `positive`.
    public let applies: Bool

    public init(
        task: String, probability: Double, threshold: Double, positive: Bool, operatingPoint: String,
        sensitivity: Double?, specificity: Double?, applies: Bool
    ) {
        self.task = task
        self.probability = probability
        self.threshold = threshold
        self.positive = positive
        self.operatingPoint = operatingPoint
        self.sensitivity = sensitivity
        self.specificity = specificity
        self.applies = applies
    }

    /// The SDK's `Decision` as a dict (`dataclasses.asdict`): the same keys, null as `NSNull`.
    public func toJSONObject() -> [String: Any] {
        return [
            "task": task,
            "probability": probability,
            "threshold": threshold,
            "positive": positive,
            "operating_point": operatingPoint,
            "sensitivity": jsonValue(sensitivity),
            "specificity": jsonValue(specificity),
            "applies": applies,
        ]
    }
}

/// A Double, or JSON null.
private func jsonValue(_ v: Double?) -> Any {
    if let v = v {
        return v
    }
    return NSNull()
}

/// What the model says about one image (as the SDK's `Prediction`, less its `source`).
public struct Prediction {
    /// level -> inference class -> probability (sums to 1), in the manifest's order.
    public let levels: OrderedMap<OrderedMap<Double>>
    /// task id -> P(positive | positive or negative).
    public let tasks: OrderedMap<Double>
    /// The most likely training classes, most likely first.
    public let topClasses: [(label: String, probability: Double)]
    public let decisions: OrderedMap<Decision>
    /// task id -> P(the task's condition), for tasks whose condition the manifest names.
    public let conditions: OrderedMap<Double>
    public let applies: OrderedMap<Bool>

    public init(
        levels: OrderedMap<OrderedMap<Double>>, tasks: OrderedMap<Double>,
        topClasses: [(label: String, probability: Double)], decisions: OrderedMap<Decision>,
        conditions: OrderedMap<Double>, applies: OrderedMap<Bool>
    ) {
        self.levels = levels
        self.tasks = tasks
        self.topClasses = topClasses
        self.decisions = decisions
        self.conditions = conditions
        self.applies = applies
    }

    /// The SDK's `Prediction.to_dict()` less `source` (the shape of golden.json's `prediction`): `levels`, `tasks`,
    /// `top_classes` (a list of [label, probability] pairs), `decisions`, `conditions`, `applies`. Swift
    /// dictionaries keep no order; the ordered keys are this value's `OrderedMap`s.
    public func toJSONObject() -> [String: Any] {
        var levelsJSON: [String: Any] = [:]
        for (level, probabilities) in levels {
            levelsJSON[level] = probabilities.dictionary
        }
        var decisionsJSON: [String: Any] = [:]
        for (task, decision) in decisions {
            decisionsJSON[task] = decision.toJSONObject()
        }
        let top: [[Any]] = topClasses.map { pair -> [Any] in [pair.label, pair.probability] }
        return [
            "levels": levelsJSON,
            "tasks": tasks.dictionary,
            "top_classes": top,
            "decisions": decisionsJSON,
            "conditions": conditions.dictionary,
            "applies": applies.dictionary,
        ]
    }
}

/// Turns the model's raw outputs (name -> values for one image) into the SDK's prediction: the same levels, tasks,
/// top classes, conditions and calls at the manifest's operating point. The model does the arithmetic (the
/// aggregation is baked into the file); this only names, sums and compares. Values are taken as Float, as the
/// model gives them, then summed in Double, as Kotlin and numpy do.
public struct Predictor {
    /// The manifest's threshold aiming at 90% sensitivity on the run's held-out images.
    public static let defaultOperatingPoint = "0.9"
    public static let noPoint = "default 0.5 (no operating point in file)"

    public let manifest: Manifest
    public let operatingPoint: String
    public let topK: Int

    /// Throws `DermError.invalidArgument` when a task has operating points but not this one.
    public init(manifest: Manifest, operatingPoint: String = Predictor.defaultOperatingPoint, topK: Int = 3) throws {
        self.manifest = manifest
        self.operatingPoint = operatingPoint
        self.topK = topK
        for task in manifest.tasks where !task.operatingPoints.isEmpty && task.operatingPoints[operatingPoint] == nil {
            throw DermError.invalidArgument(
                "Operating point \(operatingPoint) is not in the manifest for \(task.id); it has "
                    + task.operatingPoints.keys.sorted().joined(separator: ", ") + " (target sensitivities)."
            )
        }
    }

    /// The prediction from one image's outputs. Throws `DermError.modelFile` when an output the manifest names is
    /// missing or shorter than its labels (`Manifest.outputProblems` says so before any image).
    public func predict(_ outputs: [String: [Float]]) throws -> Prediction {
        let levels = try levelProbabilities(outputs)
        let tasks = try taskProbabilities(outputs)
        let training = try trainingResults(outputs, tasks: tasks)
        let byId = tasksById()
        let applies = taskApplies(tasks, conditions: training.conditions, byId: byId)
        var decisions = OrderedMap<Decision>()
        for (id, probability) in tasks {
            if let task = byId[id] {
                decisions[id] = decide(task, probability: probability, applies: applies[id] ?? true)
            }
        }
        return Prediction(
            levels: levels, tasks: tasks, topClasses: training.top, decisions: decisions,
            conditions: training.conditions, applies: applies
        )
    }

    /// The values of the output `spec` names, at least `count` of them; `DermError.modelFile` when they are not there.
    private func values(in outputs: [String: [Float]], for spec: OutputSpec, count: Int) throws -> [Float] {
        guard let v = outputs[spec.name] else {
            throw DermError.modelFile("The model gave no output \(spec.name), which its manifest names.")
        }
        guard v.count >= count else {
            throw DermError.modelFile(
                "The model's output \(spec.name) has \(v.count) values, its manifest names \(count)."
            )
        }
        return v
    }

    /// Level -> inference class -> probability, from the level outputs, in the manifest's order.
    private func levelProbabilities(_ outputs: [String: [Float]]) throws -> OrderedMap<OrderedMap<Double>> {
        var levels = OrderedMap<OrderedMap<Double>>()
        for output in manifest.outputs where output.kind == "level" {
            let level = Manifest.levelName(output.name)
            let spec = manifest.output(named: "probs_" + level) ?? output
            let v = try values(in: outputs, for: spec, count: spec.labels.count)
            var probabilities = OrderedMap<Double>()
            for (i, label) in spec.labels.enumerated() {
                probabilities[label] = Double(v[i])
            }
            levels[level] = probabilities
        }
        return levels
    }

    /// Task id -> P(positive | positive or negative), from the task outputs.
    private func taskProbabilities(_ outputs: [String: [Float]]) throws -> OrderedMap<Double> {
        var tasks = OrderedMap<Double>()
        for output in manifest.outputs where output.kind == "task" {
            guard let task = output.task else {
                throw DermError.modelFile("The manifest's output \(output.name) is a task output without a task.")
            }
            let v = try values(in: outputs, for: output, count: 1)
            tasks[task.id] = Double(v[0])
        }
        return tasks
    }

    /// The top classes and the tasks' condition probabilities, from the training output; none without one.
    private func trainingResults(
        _ outputs: [String: [Float]], tasks: OrderedMap<Double>
    ) throws -> (top: [(label: String, probability: Double)], conditions: OrderedMap<Double>) {
        guard let training = manifest.outputs.first(where: { $0.kind == "training" }) else {
            return (top: [], conditions: OrderedMap<Double>())
        }
        let p = try values(in: outputs, for: training, count: training.labels.count)
        return (
            top: topClasses(p, labels: training.labels),
            conditions: conditionProbabilities(p, labels: training.labels, tasks: tasks)
        )
    }

    /// The `topK` most likely training classes, most likely first; equal probabilities in the manifest's order.
    private func topClasses(_ p: [Float], labels: [String]) -> [(label: String, probability: Double)] {
        let order = (0..<labels.count).sorted { a, b in
            if p[b] > p[a] {
                return false
            }
            if p[b] < p[a] {
                return true
            }
            return a < b
        }
        var top: [(label: String, probability: Double)] = []
        for i in order.prefix(max(0, topK)) {
            top.append((label: labels[i], probability: Double(p[i])))
        }
        return top
    }

    /// Task id -> P(the task's condition): the sum of its classes' training probabilities, for the tasks the model
    /// gave a probability for whose condition names both positive and negative classes.
    private func conditionProbabilities(
        _ p: [Float], labels: [String], tasks: OrderedMap<Double>
    ) -> OrderedMap<Double> {
        var conditions = OrderedMap<Double>()
        for task in manifest.tasks {
            if !tasks.contains(key: task.id) || task.positiveClasses.isEmpty || task.negativeClasses.isEmpty {
                continue
            }
            var sum = 0.0
            for c in task.positiveClasses + task.negativeClasses {
                // the manifest checked that every class is a training label
                if let i = labels.firstIndex(of: c) {
                    sum += Double(p[i])
                }
            }
            conditions[task.id] = sum
        }
        return conditions
    }

    /// The manifest's tasks by id.
    private func tasksById() -> [String: TaskSpec] {
        var byId: [String: TaskSpec] = [:]
        for task in manifest.tasks {
            byId[task.id] = task // the last wins, as Kotlin's associateBy
        }
        return byId
    }

    /// Task id -> whether the task's condition holds for this image (true when there is no condition to check).
    private func taskApplies(
        _ tasks: OrderedMap<Double>, conditions: OrderedMap<Double>, byId: [String: TaskSpec]
    ) -> OrderedMap<Bool> {
        var applies = OrderedMap<Bool>()
        for id in tasks.keys {
            if let condition = conditions[id], let task = byId[id] {
                applies[id] = condition >= task.conditionThreshold
            } else {
                applies[id] = true
            }
        }
        return applies
    }

    /// The call for one task's probability at this predictor's operating point.
    public func decide(_ task: TaskSpec, probability: Double, applies: Bool = true) -> Decision {
        guard let point = task.operatingPoints[operatingPoint] else {
            return Decision(
                task: task.id, probability: probability, threshold: 0.5, positive: probability >= 0.5,
                operatingPoint: Predictor.noPoint, sensitivity: nil, specificity: nil, applies: applies
            )
        }
        return Decision(
            task: task.id, probability: probability, threshold: point.threshold,
            positive: probability >= point.threshold, operatingPoint: operatingPoint,
            sensitivity: point.sensitivity, specificity: point.specificity, applies: applies
        )
    }
}
