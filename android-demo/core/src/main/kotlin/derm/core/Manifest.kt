package derm.core

import org.json.JSONException
import org.json.JSONObject

/** A binary task's operating point, measured on the training run's held-out images. */
data class OperatingPoint(val threshold: Double, val sensitivity: Double?, val specificity: Double?)

/** A conditional binary task (e.g. P(melanoma | melanoma or nevus)) as the manifest describes it. */
data class Task(
    val id: String,
    val name: String,
    /** The task's condition in words; null in files exported before the manifest said it. */
    val condition: String?,
    val positiveName: String?,
    /** Training classes whose probabilities form the condition (positive + negative); empty: always applies. */
    val positiveClasses: List<String>,
    val negativeClasses: List<String>,
    val conditionThreshold: Double,
    /** Target sensitivity ("0.9") -> operating point. */
    val operatingPoints: Map<String, OperatingPoint>,
)

/** One output tensor of the file. */
data class OutputSpec(val name: String, val kind: String, val labels: List<String>, val names: List<String>, val task: Task?)

/**
 * The manifest `derm-export` embeds in every file: what the app must do before the model, what each output means,
 * the tasks and their operating points, and the disclaimer. Read with Android's own `org.json`.
 */
class Manifest private constructor(val json: JSONObject, source: String) {
    val format: String = json.optString("format")
    val inputSize: Int
    val inputName: String
    val outputs: List<OutputSpec>
    val disclaimer: String
    /** Inference levels baked into the file, e.g. ["three", "nine"]. */
    val levels: List<String>
    val tasks: List<Task>
    /** What the model was trained on, in one line for the screen (from the manifest's `training.data`). */
    val trainingSummary: String? = json.optJSONObject("training")?.optJSONObject("data")?.let { d ->
        val labels = d.optJSONObject("labels") ?: JSONObject()
        val counts = labels.keys().asSequence().map { it to labels.getInt(it) }.sortedByDescending { it.second }.toList()
        val shown = counts.take(5).joinToString { "${it.first} ${it.second}" } + if (counts.size > 5) ", ..." else ""
        "Trained on ${d.optInt("images")} labelled images, ${counts.size} diagnoses ($shown)"
    }
    /** The sha256 of the file's tensor buffers recorded at export (null in files exported before it was). */
    val weightsSha256: String? = json.optJSONObject("integrity")?.optString("weights_sha256")?.ifEmpty { null }

    init {
        try {
            val input = json.getJSONObject("input")
            val shape = input.getJSONArray("shape")
            inputSize = shape.getInt(1)
            inputName = input.optString("name", "image")
            if (shape.length() != 4 || shape.getInt(2) != inputSize || shape.getInt(3) != 3) {
                throw ModelFileException("$source: the manifest's input shape $shape is not [1, S, S, 3].")
            }
            val points = json.optJSONObject("operating_points") ?: JSONObject()
            val outs = json.getJSONArray("outputs")
            outputs = (0 until outs.length()).map { i ->
                val o = outs.getJSONObject(i)
                val task = o.optJSONObject("task")?.let { t -> parseTask(t, points) }
                OutputSpec(o.getString("name"), o.getString("kind"), strings(o, "labels"), strings(o, "names"), task)
            }
            disclaimer = json.optString("disclaimer", DEFAULT_DISCLAIMER).ifEmpty { DEFAULT_DISCLAIMER }
        } catch (e: JSONException) {
            throw ModelFileException("$source: the manifest is not what derm-export writes (${e.message}).")
        }
        levels = outputs.filter { it.kind == "level" }.map { it.name.removePrefix("probs_") }
        tasks = outputs.mapNotNull { it.task }
        val training = outputs.firstOrNull { it.kind == "training" }
        for (task in tasks) {
            val missing = (task.positiveClasses + task.negativeClasses).filter { training == null || it !in training.labels }
            if (missing.isNotEmpty()) {
                throw ModelFileException(
                    "$source: the manifest's task ${task.id} names training classes $missing that its training_probs " +
                        "output lacks; the file is inconsistent. Re-export it with derm-export."
                )
            }
        }
    }

    fun output(name: String): OutputSpec? = outputs.firstOrNull { it.name == name }

    /**
     * What is wrong between the manifest and the tensors the interpreter reports (name -> number of values per
     * image); empty when they match. An app refuses a file with problems instead of showing mislabelled numbers.
     */
    fun outputProblems(actual: Map<String, Int>): List<String> {
        val problems = mutableListOf<String>()
        for (o in outputs) {
            val n = actual[o.name]
            when {
                n == null -> problems += "output ${o.name} is missing from the model"
                n != o.labels.size -> problems += "output ${o.name} has $n values, the manifest names ${o.labels.size}"
            }
        }
        for (name in actual.keys - outputs.map { it.name }.toSet()) problems += "output $name is not in the manifest"
        return problems
    }

    companion object {
        const val FORMAT = "derm-manifest/1"
        const val DEFAULT_CONDITION_THRESHOLD = 0.5
        const val DEFAULT_DISCLAIMER =
            "A research and triage aid, not a diagnostic device: it does not replace examination by a clinician."

        fun parse(text: String, source: String = "the manifest"): Manifest {
            val json = try {
                JSONObject(text)
            } catch (e: JSONException) {
                throw ModelFileException("$source: its manifest is not valid JSON (${e.message}).")
            }
            val format = json.optString("format", "")
            if (format.isEmpty()) throw ModelFileException("$source: the manifest has no 'format'; not a derm manifest.")
            if (format != FORMAT) {
                throw UnsupportedManifestException(
                    "$source: manifest format '$format' is newer or other than this app reads ($FORMAT). Update the " +
                        "app, or export the model with the derm version this app was built for."
                )
            }
            return Manifest(json, source)
        }

        private fun strings(o: JSONObject, key: String): List<String> {
            val a = o.optJSONArray(key) ?: return emptyList()
            return (0 until a.length()).map { a.getString(it) }
        }

        private fun parseTask(t: JSONObject, points: JSONObject): Task {
            val id = t.getString("id")
            val by = points.optJSONObject(id)?.optJSONObject("by_sensitivity") ?: JSONObject()
            val ops = by.keys().asSequence().associateWith { k ->
                val p = by.getJSONObject(k)
                OperatingPoint(
                    p.getDouble("threshold"),
                    if (p.isNull("sensitivity")) null else p.optDouble("sensitivity"),
                    if (p.isNull("specificity")) null else p.optDouble("specificity"),
                )
            }
            return Task(
                id = id,
                name = t.optString("name", id),
                condition = if (t.has("condition")) t.getString("condition") else null,
                positiveName = if (t.has("positive_name")) t.getString("positive_name") else null,
                positiveClasses = strings(t, "positive_classes"),
                negativeClasses = strings(t, "negative_classes"),
                conditionThreshold = t.optDouble("condition_threshold", DEFAULT_CONDITION_THRESHOLD),
                operatingPoints = ops,
            )
        }
    }
}
