package derm.core

/** A binary task's call at an operating point (as the SDK's `Decision`). */
data class Decision(
    val task: String,
    val probability: Double,
    val threshold: Double,
    val positive: Boolean,
    /** The manifest's key (target sensitivity, e.g. "0.9"), or the default rule when the file has none. */
    val operatingPoint: String,
    val sensitivity: Double?,
    val specificity: Double?,
    /** False: the task's condition does not hold for this image; disregard [positive]. */
    val applies: Boolean,
)

/** What the model says about one image (as the SDK's `Prediction`). */
data class Prediction(
    /** level -> inference class -> probability (sums to 1). */
    val levels: Map<String, Map<String, Double>>,
    /** task id -> P(positive | positive or negative). */
    val tasks: Map<String, Double>,
    /** The most likely training classes. */
    val topClasses: List<Pair<String, Double>>,
    val decisions: Map<String, Decision>,
    /** task id -> P(the task's condition), for tasks whose condition the manifest names. */
    val conditions: Map<String, Double>,
    val applies: Map<String, Boolean>,
)

/**
 * Turns the file's raw outputs (name -> values for one image) into the SDK's prediction: the same levels, tasks,
 * top classes, conditions and calls at the manifest's operating point. The model does the arithmetic (the
 * aggregation is baked into the file); this only names, sums and compares.
 */
class Predictor(val manifest: Manifest, val operatingPoint: String = DEFAULT_OPERATING_POINT, val topK: Int = 3) {
    init {
        for (task in manifest.tasks) {
            if (task.operatingPoints.isNotEmpty() && operatingPoint !in task.operatingPoints) {
                throw IllegalArgumentException(
                    "Operating point $operatingPoint is not in the manifest for ${task.id}; it has " +
                        task.operatingPoints.keys.sorted().joinToString(", ") + " (target sensitivities)."
                )
            }
        }
    }

    fun predict(outputs: Map<String, FloatArray>): Prediction {
        fun values(name: String): FloatArray =
            outputs[name] ?: throw ModelFileException("The model gave no output $name, which its manifest names.")

        val levels = LinkedHashMap<String, Map<String, Double>>()
        for (level in manifest.levels) {
            val spec = manifest.output("probs_$level")!!
            val v = values(spec.name)
            levels[level] = spec.labels.indices.associate { spec.labels[it] to v[it].toDouble() }
        }
        val tasks = LinkedHashMap<String, Double>()
        for (o in manifest.outputs) if (o.kind == "task") tasks[o.task!!.id] = values(o.name)[0].toDouble()
        val training = manifest.outputs.firstOrNull { it.kind == "training" }
        var top = emptyList<Pair<String, Double>>()
        val conditions = LinkedHashMap<String, Double>()
        if (training != null) {
            val p = values(training.name)
            top = p.indices.sortedWith(compareByDescending<Int> { p[it] }.thenBy { it }).take(maxOf(0, topK))
                .map { training.labels[it] to p[it].toDouble() }
            for (task in manifest.tasks) {
                if (task.id !in tasks || task.positiveClasses.isEmpty() || task.negativeClasses.isEmpty()) continue
                var sum = 0.0
                for (c in task.positiveClasses + task.negativeClasses) sum += p[training.labels.indexOf(c)].toDouble()
                conditions[task.id] = sum
            }
        }
        val byId = manifest.tasks.associateBy { it.id }
        val applies = tasks.keys.associateWith { t -> t !in conditions || conditions[t]!! >= byId[t]!!.conditionThreshold }
        val decisions = tasks.entries.associate { (t, q) -> t to decide(byId[t]!!, q, applies[t]!!) }
        return Prediction(levels, tasks, top, decisions, conditions, applies)
    }

    /** The call for one task's probability at this predictor's operating point. */
    fun decide(task: Task, probability: Double, applies: Boolean = true): Decision {
        val point = task.operatingPoints[operatingPoint]
            ?: return Decision(task.id, probability, 0.5, probability >= 0.5, NO_POINT, null, null, applies)
        return Decision(
            task.id, probability, point.threshold, probability >= point.threshold, operatingPoint,
            point.sensitivity, point.specificity, applies,
        )
    }

    companion object {
        /** The manifest's threshold aiming at 90% sensitivity on the run's held-out images. */
        const val DEFAULT_OPERATING_POINT = "0.9"
        const val NO_POINT = "default 0.5 (no operating point in file)"
    }
}
