package derm.app

import android.content.Context
import android.graphics.Bitmap
import derm.core.ModelFile
import derm.core.ModelFileException
import derm.core.Prediction
import derm.core.Predictor
import derm.core.Preprocess
import derm.core.RgbImage
import org.tensorflow.lite.Interpreter
import org.tensorflow.lite.gpu.CompatibilityList
import org.tensorflow.lite.gpu.GpuDelegate
import java.io.Closeable
import java.nio.ByteBuffer
import java.nio.ByteOrder

/** One classification: the prediction and how long the model took. */
data class Classified(val prediction: Prediction, val millis: Double)

/**
 * The exported file running in LiteRT: the CPU path (XNNPACK, LiteRT's default) or the GPU delegate where the phone
 * supports it, falling back to the CPU with a note the screen shows. Everything model-specific (input size, labels,
 * levels, tasks, operating points) comes from the file's manifest through :core.
 */
class DermClassifier(bytes: ByteArray, name: String, useGpu: Boolean, threads: Int = 4) : Closeable {
    val file = ModelFile(bytes, name)
    val manifest = file.manifest // throws ModelFileException: no manifest, unknown format, inconsistent
    val predictor = Predictor(manifest)
    /** How the file was verified; throws ModelFileException when its weights changed since export. */
    val verified: String = file.verify()
    /** What the user must know about how it runs (e.g. "GPU not supported here: running on the CPU"). */
    var note: String? = if (verified.startsWith("weights not verified")) verified else null
        private set
    private val gpu: GpuDelegate?
    private val interpreter: Interpreter
    private val signature: String

    init {
        val options = Interpreter.Options().setNumThreads(threads)
        var delegate: GpuDelegate? = null
        if (useGpu) {
            val compat = CompatibilityList()
            if (compat.isDelegateSupportedOnThisDevice) {
                try {
                    delegate = GpuDelegate(compat.bestOptionsForThisDevice)
                    options.addDelegate(delegate)
                } catch (t: Throwable) {
                    delegate = null
                    note = listOfNotNull(note, "GPU delegate failed (${t.message}); running on the CPU (XNNPACK)").joinToString(". ")
                }
            } else {
                note = listOfNotNull(note, "This phone's GPU is not supported by LiteRT; running on the CPU (XNNPACK)").joinToString(". ")
            }
        }
        val model = ByteBuffer.allocateDirect(bytes.size).order(ByteOrder.nativeOrder()).put(bytes)
        model.rewind()
        interpreter = try {
            Interpreter(model, options)
        } catch (e: Exception) {
            delegate?.close()
            throw ModelFileException("$name cannot be loaded by LiteRT: ${e.message}")
        }
        gpu = delegate
        signature = interpreter.signatureKeys.firstOrNull()
            ?: throw ModelFileException("$name has no signature; export it again with derm-export.")
        val sizes = interpreter.getSignatureOutputs(signature).associateWith { out ->
            interpreter.getOutputTensorFromSignature(out, signature).numElements()
        }
        val problems = manifest.outputProblems(sizes)
        if (problems.isNotEmpty()) {
            close()
            throw ModelFileException("$name: its outputs do not match its manifest: ${problems.joinToString("; ")}.")
        }
        val input = interpreter.getInputTensorFromSignature(manifest.inputName, signature)
        val s = manifest.inputSize
        if (!input.shape().contentEquals(intArrayOf(1, s, s, 3))) {
            close()
            throw ModelFileException("$name: its input is ${input.shape().contentToString()}, the manifest says [1, $s, $s, 3].")
        }
    }

    /** Raw outputs for one uint8 input tensor (size x size x 3). */
    fun run(tensor: ByteArray): Map<String, FloatArray> {
        val input = ByteBuffer.allocateDirect(tensor.size).order(ByteOrder.nativeOrder()).put(tensor)
        input.rewind()
        val outputs = manifest.outputs.associate { it.name to FloatArray(it.labels.size) }
        val buffers = outputs.mapValues { (_, v) -> ByteBuffer.allocateDirect(v.size * 4).order(ByteOrder.nativeOrder()) }
        interpreter.runSignature(mapOf(manifest.inputName to input), buffers, signature)
        for ((k, b) in buffers) {
            b.rewind()
            b.asFloatBuffer().get(outputs.getValue(k))
        }
        return outputs
    }

    /** The SDK's preprocessing then the model: pixels as decoded, with their EXIF orientation (1..8). */
    fun classify(image: RgbImage, orientation: Int): Classified {
        val tensor = Preprocess.tensor(image, orientation, manifest.inputSize)
        val t0 = System.nanoTime()
        val raw = run(tensor)
        val millis = (System.nanoTime() - t0) / 1e6
        return Classified(predictor.predict(raw), millis)
    }

    override fun close() {
        interpreter.close()
        gpu?.close()
    }

    companion object {
        fun fromAssets(context: Context, asset: String = "model.tflite", useGpu: Boolean = true): DermClassifier {
            val bytes = try {
                context.assets.open(asset).use { it.readBytes() }
            } catch (e: java.io.IOException) {
                throw ModelFileException("No $asset in the app's assets: build with ./gradlew :app:copyModel first.")
            }
            return DermClassifier(bytes, asset, useGpu)
        }
    }
}

/** A decoded bitmap's pixels as :core's RGB image. Transparent pixels are laid on white, as the SDK does (a
 *  semi-transparent one may differ by a level: Pillow's alpha_composite rounds its own way); photos have none. */
fun Bitmap.toRgbImage(): RgbImage {
    val argb = IntArray(width * height)
    val bmp = if (config == Bitmap.Config.ARGB_8888) this else copy(Bitmap.Config.ARGB_8888, false)
    bmp.getPixels(argb, 0, width, 0, 0, width, height)
    val rgb = ByteArray(argb.size * 3)
    for (i in argb.indices) {
        val p = argb[i]
        val a = p ushr 24
        for (c in 0 until 3) {
            val v = (p shr (16 - 8 * c)) and 0xff
            rgb[3 * i + c] = (if (a == 255) v else (v * a + 255 * (255 - a) + 127) / 255).toByte()
        }
    }
    return RgbImage(width, height, rgb)
}

/** A camera frame's rotation (degrees clockwise to show it upright) as the EXIF orientation :core applies. */
fun orientationOf(rotationDegrees: Int): Int = when (((rotationDegrees % 360) + 360) % 360) {
    90 -> 6
    180 -> 3
    270 -> 8
    else -> 1
}
