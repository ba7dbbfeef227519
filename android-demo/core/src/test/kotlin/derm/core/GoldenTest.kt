package derm.core

import org.json.JSONArray
import org.json.JSONObject
import org.junit.Assert.assertEquals
import org.junit.Assert.assertTrue
import org.junit.Assume.assumeTrue
import org.junit.Test
import java.io.File
import java.security.MessageDigest

/**
 * The contract with the Python SDK: on the golden vectors `derm golden` wrote beside an exported file, this module
 * must make the same input tensors (to the byte) from the decoded pixels and EXIF orientation, read the same
 * manifest from the file's bytes, and turn the file's raw outputs into the same prediction.
 *
 * The folder comes from the system property `derm.golden` or the environment variable `DERM_GOLDEN`.
 */
class GoldenTest {
    private val dir: File? = (System.getProperty("derm.golden") ?: System.getenv("DERM_GOLDEN"))?.let(::File)

    private fun golden(): Pair<File, JSONObject> {
        assumeTrue(
            "no golden vectors at $dir: set DERM_GOLDEN to a folder `derm golden` wrote",
            dir != null && File(dir, "golden.json").isFile,
        )
        val doc = JSONObject(File(dir, "golden.json").readText())
        assertEquals("derm-golden/1", doc.getString("format"))
        return dir!! to doc
    }

    private fun cases(doc: JSONObject): List<JSONObject> {
        val a = doc.getJSONArray("cases")
        return (0 until a.length()).map { a.getJSONObject(it) }
    }

    private fun modelFile(dir: File, doc: JSONObject): ModelFile {
        val name = doc.getJSONObject("model").getString("file") // relative to the golden folder
        val bytes = File(dir, name).readBytes()
        val sha = MessageDigest.getInstance("SHA-256").digest(bytes).joinToString("") { "%02x".format(it) }
        assertEquals("the golden vectors were made from another file", doc.getJSONObject("model").getString("sha256"), sha)
        return ModelFile(bytes, name)
    }

    @Test
    fun inputTensorsAreTheSdksToTheByte() {
        val (dir, doc) = golden()
        val size = doc.getInt("input_size")
        val tolerance = doc.getJSONObject("tolerance").getInt("input_levels")
        for (case in cases(doc)) {
            val d = case.getJSONObject("decoded")
            val image = RgbImage(d.getInt("width"), d.getInt("height"), File(dir, d.getString("file")).readBytes())
            val got = Preprocess.tensor(image, d.getInt("orientation"), size)
            val want = File(dir, case.getString("input")).readBytes()
            assertEquals(case.getString("name"), want.size, got.size)
            var differ = 0
            var worst = 0
            for (i in want.indices) {
                val diff = Math.abs((got[i].toInt() and 0xff) - (want[i].toInt() and 0xff))
                if (diff > 0) differ++
                worst = maxOf(worst, diff)
            }
            assertTrue(
                "${case.getString("name")} (${image.width}x${image.height}, orientation ${d.getInt("orientation")}): " +
                    "$differ of ${want.size} values differ, by up to $worst levels (allowed: $tolerance)",
                worst <= tolerance,
            )
        }
    }

    @Test
    fun theManifestIsReadFromTheFileAndMatchesItsOutputs() {
        val (dir, doc) = golden()
        val manifest = modelFile(dir, doc).manifest
        assertEquals(doc.getInt("input_size"), manifest.inputSize)
        assertTrue(manifest.disclaimer.contains("not a diagnostic device"))
        assertTrue("${manifest.trainingSummary}", manifest.trainingSummary!!.startsWith("Trained on "))
        for (case in cases(doc)) {
            val outputs = case.getJSONObject("outputs")
            val sizes = outputs.keys().asSequence().associateWith { outputs.getJSONArray(it).length() }
            assertEquals(emptyList<String>(), manifest.outputProblems(sizes))
        }
    }

    @Test
    fun predictionsAreTheSdks() {
        val (dir, doc) = golden()
        val manifest = modelFile(dir, doc).manifest
        val predictor = Predictor(manifest, doc.getString("operating_point"), doc.getInt("top_k"))
        val eps = doc.getJSONObject("tolerance").getDouble("outputs")
        for (case in cases(doc)) {
            val name = case.getString("name")
            val outputs = case.getJSONObject("outputs")
            val raw = outputs.keys().asSequence().associateWith { k -> floats(outputs.getJSONArray(k)) }
            val got = predictor.predict(raw)
            val want = case.getJSONObject("prediction")
            val levels = want.getJSONObject("levels")
            assertEquals(name, names(levels), got.levels.keys)
            for (level in names(levels)) {
                val probs = levels.getJSONObject(level)
                assertEquals(name, probs.keys().asSequence().toList(), got.levels[level]!!.keys.toList())
                for (label in names(probs)) assertEquals("$name $level $label", probs.getDouble(label), got.levels[level]!![label]!!, eps)
            }
            val tasks = want.getJSONObject("tasks")
            assertEquals(name, names(tasks), got.tasks.keys)
            for (t in names(tasks)) assertEquals("$name $t", tasks.getDouble(t), got.tasks[t]!!, eps)
            val top = want.getJSONArray("top_classes")
            assertEquals(name, top.length(), got.topClasses.size)
            for (i in 0 until top.length()) {
                assertEquals(name, top.getJSONArray(i).getString(0), got.topClasses[i].first)
                assertEquals(name, top.getJSONArray(i).getDouble(1), got.topClasses[i].second, eps)
            }
            val conditions = want.getJSONObject("conditions")
            assertEquals(name, names(conditions), got.conditions.keys)
            for (t in names(conditions)) assertEquals("$name $t", conditions.getDouble(t), got.conditions[t]!!, eps)
            val applies = want.getJSONObject("applies")
            for (t in names(applies)) assertEquals("$name $t", applies.getBoolean(t), got.applies[t])
            val decisions = want.getJSONObject("decisions")
            assertEquals(name, names(decisions), got.decisions.keys)
            for (t in names(decisions)) {
                val d = decisions.getJSONObject(t)
                val g = got.decisions[t]!!
                assertEquals("$name $t", d.getDouble("threshold"), g.threshold, 0.0)
                assertEquals("$name $t", d.getBoolean("positive"), g.positive)
                assertEquals("$name $t", d.getString("operating_point"), g.operatingPoint)
                assertEquals("$name $t", d.optDouble("sensitivity").takeUnless { d.isNull("sensitivity") }, g.sensitivity)
                assertEquals("$name $t", d.optDouble("specificity").takeUnless { d.isNull("specificity") }, g.specificity)
                assertEquals("$name $t", d.getBoolean("applies"), g.applies)
            }
        }
    }

    @Test
    fun damagedFilesAreNamedNeverRead() {
        val (dir, doc) = golden()
        modelFile(dir, doc) // the right file
        val bytes = File(dir, doc.getJSONObject("model").getString("file")).readBytes()
        val truncated = bytes.copyOf(bytes.size - 5000)
        val e = runCatching { ModelFile(truncated, "cut.tflite").manifest }.exceptionOrNull()
        assertTrue("$e", e is ModelFileException && e.message!!.contains("cut.tflite"))
        val onnx = byteArrayOf(0x08, 0x07, 0x12, 0x04) + ByteArray(64)
        val e2 = runCatching { ModelFile(onnx, "renamed.tflite") }.exceptionOrNull()
        assertTrue("$e2", e2 is ModelFileException && e2.message!!.contains("ONNX"))
    }

    @Test
    fun theWeightsAreVerifiedAndAFlippedBitIsRefused() {
        val (dir, doc) = golden()
        val bytes = File(dir, doc.getJSONObject("model").getString("file")).readBytes()
        val file = ModelFile(bytes, "model.tflite")
        assumeTrue("this file was exported before derm recorded a weights digest", file.manifest.weightsSha256 != null)
        assertTrue(file.verify().startsWith("weights verified"))
        val flipped = bytes.copyOf()
        flipped[flipped.size / 2] = (flipped[flipped.size / 2].toInt() xor 1).toByte() // inside the weights
        val e = runCatching { ModelFile(flipped, "flipped.tflite").verify() }.exceptionOrNull()
        assertTrue("$e", e is ModelFileException && e.message!!.contains("damaged or was altered"))
    }

    /** The keys of a JSON object (Android's org.json has keys(), not keySet(), on older API levels). */
    private fun names(o: JSONObject): Set<String> = o.keys().asSequence().toSet()

    private fun floats(a: JSONArray): FloatArray = FloatArray(a.length()) { a.getDouble(it).toFloat() }
}
