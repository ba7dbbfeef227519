package derm.app

import android.graphics.BitmapFactory
import android.util.Log
import androidx.test.ext.junit.runners.AndroidJUnit4
import androidx.test.platform.app.InstrumentationRegistry
import derm.core.Preprocess
import derm.core.Predictor
import derm.core.RgbImage
import org.json.JSONObject
import org.junit.Assert.assertEquals
import org.junit.Assert.assertTrue
import org.junit.Test
import org.junit.runner.RunWith

/**
 * The on-device parity check (`./gradlew :app:connectedAndroidTest`): the golden vectors `derm golden` wrote beside
 * the model run through the real LiteRT interpreter on the phone, CPU and GPU, and must give the desktop's outputs
 * and calls. The phone's JPEG decoder is measured against the desktop's decoded pixels and reported (decoders may
 * differ by a level or two; the contract is checked from the decoded pixels).
 */
@RunWith(AndroidJUnit4::class)
class GoldenOnDeviceTest {
    private val context = InstrumentationRegistry.getInstrumentation().context
    private val target = InstrumentationRegistry.getInstrumentation().targetContext

    private fun read(name: String): ByteArray = context.assets.open("golden/$name").use { it.readBytes() }

    private fun check(useGpu: Boolean) {
        val doc = JSONObject(String(read("golden.json")))
        val clf = DermClassifier.fromAssets(target, useGpu = useGpu)
        val predictor = Predictor(clf.manifest, doc.getString("operating_point"), doc.getInt("top_k"))
        val cases = doc.getJSONArray("cases")
        val tolerance = if (useGpu && clf.note == null) 2e-2 else 2e-3 // GPU runs float16 arithmetic
        for (i in 0 until cases.length()) {
            val case = cases.getJSONObject(i)
            val name = case.getString("name")
            val d = case.getJSONObject("decoded")
            val image = RgbImage(d.getInt("width"), d.getInt("height"), read(d.getString("file")))
            val tensor = Preprocess.tensor(image, d.getInt("orientation"), clf.manifest.inputSize)
            assertTrue(name, tensor.contentEquals(read(case.getString("input"))))
            val raw = clf.run(tensor)
            val want = case.getJSONObject("outputs")
            var worst = 0.0
            for (k in want.keys()) {
                val w = want.getJSONArray(k)
                for (j in 0 until w.length()) worst = maxOf(worst, Math.abs(w.getDouble(j) - raw.getValue(k)[j]))
            }
            assertTrue("$name: outputs differ from the desktop's by up to $worst (allowed $tolerance)", worst <= tolerance)
            val calls = case.getJSONObject("prediction").getJSONObject("decisions")
            val got = predictor.predict(raw).decisions
            for (t in calls.keys()) {
                val c = calls.getJSONObject(t)
                if (Math.abs(c.getDouble("probability") - c.getDouble("threshold")) > tolerance) {
                    assertEquals("$name $t", c.getBoolean("positive"), got.getValue(t).positive)
                }
            }
            val decoded = BitmapFactory.decodeByteArray(read(case.getString("image")), 0, read(case.getString("image")).size)
            if (decoded != null && decoded.width == image.width && decoded.height == image.height) {
                val mine = decoded.toRgbImage()
                val diff = mine.pixels.indices.maxOfOrNull { j ->
                    Math.abs((mine.pixels[j].toInt() and 0xff) - (image.pixels[j].toInt() and 0xff))
                } ?: 0
                Log.i("derm-golden", "$name: this phone's JPEG decoder differs from the desktop's by up to $diff levels")
            }
        }
        clf.close()
    }

    @Test
    fun cpuGivesTheDesktopsResults() = check(useGpu = false)

    @Test
    fun gpuOrItsFallbackGivesTheDesktopsResults() = check(useGpu = true)
}
