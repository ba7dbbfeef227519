package derm.app

import android.Manifest
import android.content.pm.PackageManager
import android.graphics.BitmapFactory
import android.net.Uri
import android.os.Bundle
import androidx.activity.ComponentActivity
import androidx.activity.compose.rememberLauncherForActivityResult
import androidx.activity.compose.setContent
import androidx.activity.result.PickVisualMediaRequest
import androidx.activity.result.contract.ActivityResultContracts
import androidx.camera.core.CameraSelector
import androidx.camera.core.ImageAnalysis
import androidx.camera.core.Preview
import androidx.camera.lifecycle.ProcessCameraProvider
import androidx.camera.view.PreviewView
import androidx.compose.foundation.layout.Arrangement
import androidx.compose.foundation.layout.Column
import androidx.compose.foundation.layout.Row
import androidx.compose.foundation.layout.fillMaxWidth
import androidx.compose.foundation.layout.height
import androidx.compose.foundation.layout.padding
import androidx.compose.foundation.rememberScrollState
import androidx.compose.foundation.verticalScroll
import androidx.compose.material3.Button
import androidx.compose.material3.MaterialTheme
import androidx.compose.material3.Surface
import androidx.compose.material3.Text
import androidx.compose.runtime.Composable
import androidx.compose.runtime.getValue
import androidx.compose.runtime.mutableStateOf
import androidx.compose.runtime.remember
import androidx.compose.runtime.setValue
import androidx.compose.ui.Modifier
import androidx.compose.ui.platform.LocalContext
import androidx.compose.ui.platform.LocalLifecycleOwner
import androidx.compose.ui.text.font.FontWeight
import androidx.compose.ui.unit.dp
import androidx.compose.ui.viewinterop.AndroidView
import androidx.core.content.ContextCompat
import androidx.exifinterface.media.ExifInterface
import derm.core.Manifest as DermManifest
import derm.core.ModelFileException
import derm.core.Prediction
import derm.core.UnsupportedManifestException
import java.util.concurrent.Executors
import java.util.concurrent.atomic.AtomicBoolean

/** What the screen shows. */
sealed interface Screen {
    data object Loading : Screen
    data class ModelProblem(val title: String, val detail: String) : Screen
    data class Ready(val result: Classified? = null, val source: String = "", val problem: String? = null) : Screen
}

class MainActivity : ComponentActivity() {
    private var classifier: DermClassifier? = null
    private val analysis = Executors.newSingleThreadExecutor()

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        val initial: Screen = try {
            classifier = DermClassifier.fromAssets(this)
            Screen.Ready()
        } catch (e: UnsupportedManifestException) {
            Screen.ModelProblem("This model is newer than the app", e.message ?: "")
        } catch (e: ModelFileException) {
            Screen.ModelProblem("This model cannot be used", e.message ?: "")
        }
        setContent { MaterialTheme { Surface { App(initial) } } }
    }

    override fun onDestroy() {
        analysis.shutdown()
        classifier?.close()
        super.onDestroy()
    }

    @Composable
    private fun App(initial: Screen) {
        var screen by remember { mutableStateOf(initial) }
        var camera by remember { mutableStateOf(false) }
        val context = LocalContext.current
        val clf = classifier
        val pick = rememberLauncherForActivityResult(ActivityResultContracts.PickVisualMedia()) { uri: Uri? ->
            if (uri != null && clf != null) screen = classifyPicked(clf, uri)
        }
        val permission = rememberLauncherForActivityResult(ActivityResultContracts.RequestPermission()) { granted ->
            camera = granted
            if (!granted) screen = Screen.Ready(problem = "Camera permission denied: pick a photo instead, or allow the camera in the system settings.")
        }
        Column(Modifier.padding(16.dp).verticalScroll(rememberScrollState()), verticalArrangement = Arrangement.spacedBy(8.dp)) {
            val disclaimer = clf?.manifest?.disclaimer ?: DermManifest.DEFAULT_DISCLAIMER
            Text(disclaimer, fontWeight = FontWeight.Bold, color = MaterialTheme.colorScheme.error)
            when (val s = screen) {
                Screen.Loading -> Text("Loading the model...")
                is Screen.ModelProblem -> {
                    Text(s.title, style = MaterialTheme.typography.titleMedium)
                    Text(s.detail)
                }
                is Screen.Ready -> {
                    clf!!.manifest.trainingSummary?.let { Text(it, style = MaterialTheme.typography.bodySmall) }
                    clf.note?.let { Text(it, color = MaterialTheme.colorScheme.tertiary) }
                    Row(horizontalArrangement = Arrangement.spacedBy(8.dp)) {
                        Button(onClick = {
                            val granted = ContextCompat.checkSelfPermission(context, Manifest.permission.CAMERA) ==
                                PackageManager.PERMISSION_GRANTED
                            if (granted) camera = !camera else permission.launch(Manifest.permission.CAMERA)
                        }) { Text(if (camera) "Stop camera" else "Camera") }
                        Button(onClick = {
                            pick.launch(PickVisualMediaRequest(ActivityResultContracts.PickVisualMedia.ImageOnly))
                        }) { Text("Pick a photo") }
                    }
                    if (camera) CameraPreview(clf) { result -> screen = Screen.Ready(result, "camera") }
                    s.problem?.let { Text(it, color = MaterialTheme.colorScheme.error) }
                    s.result?.let { Result(clf, it, s.source) }
                }
            }
        }
    }

    private fun classifyPicked(clf: DermClassifier, uri: Uri): Screen = try {
        // decoded as stored; the EXIF orientation is applied by :core, as the SDK does
        val bitmap = contentResolver.openInputStream(uri).use { BitmapFactory.decodeStream(it) }
            ?: throw java.io.IOException("not an image this phone can decode")
        val orientation = contentResolver.openInputStream(uri).use { stream ->
            stream?.let { ExifInterface(it).getAttributeInt(ExifInterface.TAG_ORIENTATION, 1) } ?: 1
        }
        Screen.Ready(clf.classify(bitmap.toRgbImage(), orientation), "photo")
    } catch (e: Exception) {
        Screen.Ready(problem = "That image cannot be read (${e.message}). Pick another photo.")
    }

    @Composable
    private fun CameraPreview(clf: DermClassifier, onResult: (Classified) -> Unit) {
        val owner = LocalLifecycleOwner.current
        val busy = remember { AtomicBoolean(false) }
        AndroidView(modifier = Modifier.fillMaxWidth().height(320.dp), factory = { ctx ->
            val view = PreviewView(ctx)
            val future = ProcessCameraProvider.getInstance(ctx)
            future.addListener({
                val provider = future.get()
                val preview = Preview.Builder().build().also { it.setSurfaceProvider(view.surfaceProvider) }
                val frames = ImageAnalysis.Builder()
                    .setBackpressureStrategy(ImageAnalysis.STRATEGY_KEEP_ONLY_LATEST)
                    .setOutputImageFormat(ImageAnalysis.OUTPUT_IMAGE_FORMAT_RGBA_8888)
                    .build()
                frames.setAnalyzer(analysis) { proxy ->
                    if (busy.compareAndSet(false, true)) {
                        try {
                            // the frame's own rotation, applied in :core (no rotated bitmap copy)
                            val result = clf.classify(proxy.toBitmap().toRgbImage(), orientationOf(proxy.imageInfo.rotationDegrees))
                            view.post { onResult(result) }
                        } finally {
                            busy.set(false)
                        }
                    }
                    proxy.close()
                }
                provider.unbindAll()
                provider.bindToLifecycle(owner, CameraSelector.DEFAULT_BACK_CAMERA, preview, frames)
            }, ContextCompat.getMainExecutor(ctx))
            view
        })
    }

    @Composable
    private fun Result(clf: DermClassifier, classified: Classified, source: String) {
        val p: Prediction = classified.prediction
        Text("From the $source, in %.0f ms".format(classified.millis), style = MaterialTheme.typography.labelMedium)
        for ((level, probs) in p.levels) {
            val names = clf.manifest.output("probs_$level")!!
            Text("$level-way", style = MaterialTheme.typography.titleSmall)
            for ((label, prob) in probs.entries.sortedByDescending { it.value }) {
                val shown = names.names.getOrNull(names.labels.indexOf(label)) ?: label
                Text("  %s  %.3f".format(shown, prob))
            }
        }
        for (task in clf.manifest.tasks) {
            val d = p.decisions[task.id] ?: continue
            val line = if (!d.applies) {
                "${task.name}: not applicable here (P(${task.condition ?: "its condition"}) %.2f)".format(p.conditions[task.id] ?: 0.0)
            } else {
                val at = if (d.sensitivity != null && d.specificity != null) {
                    "at the %.0f%%-sensitivity point (threshold %.3f; sensitivity %.2f, specificity %.2f on held-out images)"
                        .format(d.operatingPoint.toDouble() * 100, d.threshold, d.sensitivity, d.specificity)
                } else {
                    "at the default threshold %.2f".format(d.threshold)
                }
                "${task.name}: P %.2f: %s %s".format(d.probability, if (d.positive) "POSITIVE" else "negative", at)
            }
            Text(line)
        }
        Text("Top training classes: " + p.topClasses.joinToString { (k, v) -> "%s %.3f".format(k, v) })
    }
}
