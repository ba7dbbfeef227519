package derm.core

import java.util.zip.Inflater

/** A model file that cannot be used, with a message for the user (the app shows it on a screen, never crashes). */
open class ModelFileException(message: String) : Exception(message)

/** The file may be fine, but this version of the app does not read its manifest format. */
class UnsupportedManifestException(message: String) : ModelFileException(message)

/**
 * The bytes of a `.tflite` file written by `derm-export`: a TFLite flatbuffer with the standard metadata, whose
 * associated files (the labels and `manifest.json`) form a zip archive appended to the flatbuffer. Everything an app
 * needs to know about the model (labels, input size, levels, tasks, operating points, what it was trained on) is
 * read from here: no app keeps a second list.
 */
class ModelFile(private val bytes: ByteArray, private val name: String = "model") {
    init {
        if (bytes.size < 8 || String(bytes, 4, 4, Charsets.US_ASCII) != "TFL3") {
            val hint = when {
                bytes.size >= 2 && bytes[0] == 'P'.code.toByte() && bytes[1] == 'K'.code.toByte() ->
                    "; it looks like a zip archive"
                bytes.isNotEmpty() && bytes[0] == 0x08.toByte() -> "; it looks like an ONNX file"
                else -> ""
            }
            throw ModelFileException(
                "$name is not a TFLite model (bytes 4-8 are not 'TFL3')$hint. Use the .tflite file derm-export wrote."
            )
        }
    }

    private val entries: Map<String, ByteArray> by lazy { readAppendedZip() }

    /** The names of the associated files packed in the model's metadata. */
    val associatedFiles: Set<String> get() = entries.keys

    /** One associated file, or null. */
    fun associatedFile(fileName: String): ByteArray? = entries[fileName]

    /** The embedded manifest, checked for a format this version reads. */
    val manifest: Manifest by lazy {
        val data = associatedFile(MANIFEST_FILE) ?: throw ModelFileException(
            "$name carries no derm manifest (no $MANIFEST_FILE in its metadata): it was not written by derm-export, " +
                "or it is truncated or damaged (${bytes.size} bytes). Export the model with derm-export."
        )
        Manifest.parse(String(data, Charsets.UTF_8), name)
    }

    /**
     * Checks the weights against the digest the manifest recorded at export. Returns how the file was verified (a
     * sentence for the screen); throws when the weights changed, so a damaged file never gives an answer.
     */
    fun verify(): String {
        val want = manifest.weightsSha256
            ?: return "weights not verified: the file was exported before derm recorded a weights digest"
        val got = WeightsDigest.sha256(bytes)
        if (got != want) {
            throw ModelFileException(
                "$name is damaged or was altered after export: its weights' sha256 is ${got.take(16)}..., its " +
                    "manifest recorded ${want.take(16)}... No result is given from it; copy the original file again."
            )
        }
        return "weights verified (sha256 ${want.take(16)}...)"
    }

    private fun readAppendedZip(): Map<String, ByteArray> {
        val eocd = findEndOfCentralDirectory() ?: return emptyMap()
        val count = u16(eocd + 10)
        val cdSize = u32(eocd + 12)
        val cdOffset = u32(eocd + 16)
        val cdStart = eocd - cdSize
        val shift = cdStart - cdOffset // the archive's offsets are relative to where it starts (after the flatbuffer)
        if (cdStart < 0 || shift < 0) return emptyMap()
        val out = LinkedHashMap<String, ByteArray>()
        var p = cdStart.toInt()
        repeat(count) {
            if (p + 46 > bytes.size || u32(p) != 0x02014b50L) throw damaged("central directory")
            val method = u16(p + 10)
            val compressed = u32(p + 20).toInt()
            val size = u32(p + 24).toInt()
            val nameLen = u16(p + 28)
            val extraLen = u16(p + 30)
            val commentLen = u16(p + 32)
            val local = (u32(p + 42) + shift).toInt()
            val entryName = String(bytes, p + 46, nameLen, Charsets.UTF_8)
            if (local + 30 > bytes.size || u32(local) != 0x04034b50L) throw damaged("entry $entryName")
            val start = local + 30 + u16(local + 26) + u16(local + 28)
            if (start + compressed > bytes.size) throw damaged("entry $entryName")
            out[entryName] = when (method) {
                0 -> bytes.copyOfRange(start, start + compressed)
                8 -> inflate(start, compressed, size, entryName)
                else -> throw ModelFileException("$name: metadata entry $entryName uses zip method $method.")
            }
            p += 46 + nameLen + extraLen + commentLen
        }
        return out
    }

    private fun inflate(start: Int, compressed: Int, size: Int, entryName: String): ByteArray {
        val inflater = Inflater(true)
        try {
            inflater.setInput(bytes, start, compressed)
            val out = ByteArray(size)
            var n = 0
            while (n < size && !inflater.finished()) {
                val got = inflater.inflate(out, n, size - n)
                if (got == 0 && (inflater.needsInput() || inflater.needsDictionary())) break
                n += got
            }
            if (n != size) throw damaged("entry $entryName")
            return out
        } catch (e: java.util.zip.DataFormatException) {
            throw damaged("entry $entryName")
        } finally {
            inflater.end()
        }
    }

    private fun findEndOfCentralDirectory(): Int? {
        val last = bytes.size - 22
        val first = maxOf(0, last - 65535)
        for (p in last downTo first) {
            if (u32(p) == 0x06054b50L) return p
        }
        return null
    }

    private fun damaged(what: String) =
        ModelFileException("$name: its metadata ($what) cannot be read: the file is truncated or damaged.")

    private fun u16(p: Int): Int = (bytes[p].toInt() and 0xff) or ((bytes[p + 1].toInt() and 0xff) shl 8)

    private fun u32(p: Int): Long = (u16(p).toLong()) or (u16(p + 2).toLong() shl 16)

    companion object {
        const val MANIFEST_FILE = "manifest.json"
    }
}
