package derm.core

import org.junit.Assert.assertArrayEquals
import org.junit.Assert.assertEquals
import org.junit.Assert.assertTrue
import org.junit.Test

/** Rules that hold without golden vectors: orientation, the box reduction, manifests of other versions. */
class CoreTest {
    private fun image(w: Int, h: Int): RgbImage = RgbImage(w, h, ByteArray(w * h * 3) { (it * 7 % 251).toByte() })

    @Test
    fun orientationsComposeLikeRotations() {
        val im = image(5, 3)
        val cw = Preprocess.orient(im, 6)
        assertEquals(3, cw.width)
        assertEquals(5, cw.height)
        assertArrayEquals(im.pixels, Preprocess.orient(cw, 8).pixels) // 90 clockwise then 90 counter-clockwise
        assertArrayEquals(im.pixels, Preprocess.orient(Preprocess.orient(im, 3), 3).pixels)
        assertArrayEquals(im.pixels, Preprocess.orient(Preprocess.orient(im, 2), 2).pixels)
        assertArrayEquals(Preprocess.orient(Preprocess.orient(im, 6), 6).pixels, Preprocess.orient(im, 3).pixels)
        // the top-left pixel of a photo taken rotated (orientation 6) is its stored bottom-left one
        assertEquals(im.at(0, 2, 0), cw.at(0, 0, 0))
    }

    @Test
    fun reductionIsTheRoundedMeanOfEachBlock() {
        val px = ByteArray(3 * 3 * 3)
        for (i in 0 until 9) px[i * 3] = (i * 10).toByte() // red: 0, 10, ..., 80
        val r = Preprocess.reduce(RgbImage(3, 3, px), 2)
        assertEquals(2, r.width)
        assertEquals(2, r.height)
        assertEquals((0 + 10 + 30 + 40 + 2) / 4, r.at(0, 0, 0)) // full block
        assertEquals((20 + 50 + 1) / 2, r.at(1, 0, 0)) // the right edge's partial block
        assertEquals(80, r.at(1, 1, 0)) // the corner
    }

    @Test
    fun aResizeToTheSameSizeChangesNothing() {
        val im = image(4, 4)
        assertArrayEquals(im.pixels, Preprocess.resize(im, 4).pixels)
    }

    @Test
    fun manifestsOfAnotherFormatOrShapeAreRefused() {
        val e = runCatching { Manifest.parse("""{"format": "derm-manifest/9"}""", "m.tflite") }.exceptionOrNull()
        assertTrue("$e", e is UnsupportedManifestException && e.message!!.contains("derm-manifest/9"))
        val e2 = runCatching { Manifest.parse("""{"labels": []}""", "m.tflite") }.exceptionOrNull()
        assertTrue("$e2", e2 is ModelFileException && e2.message!!.contains("no 'format'"))
        val e3 = runCatching { Manifest.parse("not json", "m.tflite") }.exceptionOrNull()
        assertTrue("$e3", e3 is ModelFileException && e3.message!!.contains("not valid JSON"))
        val m = Manifest.parse(
            """{"format": "derm-manifest/1", "input": {"shape": [1, 8, 8, 3]},
               "outputs": [{"name": "probs_three", "kind": "level", "labels": ["benign", "malignant", "non_neoplastic"]}]}""",
            "m.tflite",
        )
        assertEquals(listOf("three"), m.levels)
        assertEquals(listOf("output probs_three has 2 values, the manifest names 3"), m.outputProblems(mapOf("probs_three" to 2)))
        assertTrue(m.disclaimer.contains("not a diagnostic device"))
    }
}
