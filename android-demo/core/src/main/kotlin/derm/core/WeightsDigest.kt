package derm.core

import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.security.MessageDigest

/**
 * The digest `derm-export` records in a `.tflite` manifest (`integrity.weights_sha256`), as the SDK computes it
 * (`derm.manifest.tflite_weights_digest`): sha256 over every buffer a tensor reads, in buffer order, each preceded by
 * its index and length (two little-endian uint64). A flipped bit in any weight changes it; the metadata (which holds
 * the digest) lies outside it. Reads the flatbuffer directly (TFLite schema: Model.subgraphs / buffers,
 * SubGraph.tensors, Tensor.buffer, Buffer.data / offset / size).
 */
object WeightsDigest {
    fun sha256(model: ByteArray): String {
        val b = ByteBuffer.wrap(model).order(ByteOrder.LITTLE_ENDIAN)
        val root = b.getInt(0)
        val used = sortedSetOf<Long>()
        for (sub in tables(b, root, 2)) for (tensor in tables(b, sub, 0)) {
            used += field(b, tensor, 2)?.let { b.getInt(it).toLong() and 0xffffffffL } ?: 0L
        }
        val buffers = tables(b, root, 4)
        val md = MessageDigest.getInstance("SHA-256")
        val head = ByteBuffer.allocate(16).order(ByteOrder.LITTLE_ENDIAN)
        for (i in used) {
            if (i >= buffers.size) continue
            val buf = buffers[i.toInt()]
            val data = field(b, buf, 0)?.let { it + b.getInt(it) }
            val dataLength = data?.let { b.getInt(it) } ?: 0
            val (start, length) = if (dataLength > 0) {
                data!! + 4 to dataLength.toLong()
            } else {
                val offset = field(b, buf, 1)?.let { b.getLong(it) } ?: 0L
                val size = field(b, buf, 2)?.let { b.getLong(it) } ?: 0L
                if (offset <= 1) continue
                offset.toInt() to size // buffers stored after the flatbuffer (models over 2 GB)
            }
            head.clear()
            head.putLong(i).putLong(length)
            md.update(head.array())
            md.update(model, start, length.toInt())
        }
        return md.digest().joinToString("") { "%02x".format(it) }
    }

    /** The absolute position of a table's field, or null when absent. */
    private fun field(b: ByteBuffer, table: Int, index: Int): Int? {
        val vtable = table - b.getInt(table)
        val vsize = b.getShort(vtable).toInt() and 0xffff
        val at = 4 + 2 * index
        if (at >= vsize) return null
        val off = b.getShort(vtable + at).toInt() and 0xffff
        return if (off == 0) null else table + off
    }

    /** The tables of a vector-of-tables field. */
    private fun tables(b: ByteBuffer, table: Int, index: Int): List<Int> {
        val f = field(b, table, index) ?: return emptyList()
        val vec = f + b.getInt(f)
        val n = b.getInt(vec)
        return (0 until n).map { k -> val p = vec + 4 + 4 * k; p + b.getInt(p) }
    }
}
