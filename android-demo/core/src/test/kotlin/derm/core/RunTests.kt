package derm.core

import org.junit.runner.JUnitCore
import kotlin.system.exitProcess

/** Runs the module's tests outside Gradle (android-demo/core/test.sh) and prints one summary line for CI. */
fun main() {
    val result = JUnitCore().run(CoreTest::class.java, GoldenTest::class.java)
    for (f in result.failures) println("FAILED ${f.testHeader}: ${f.message}")
    val skipped = result.assumptionFailureCount
    println("${result.runCount - result.failureCount - skipped} passed, ${result.failureCount} failed, $skipped skipped")
    exitProcess(if (result.wasSuccessful()) 0 else 1)
}
