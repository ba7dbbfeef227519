// Pure Kotlin/JVM: no Android imports. org.json is the phone's own (compileOnly here, the Android platform at run
// time); the tests use the same library from Maven (Android's org.json, repackaged). Also built and tested without
// Gradle by core/test.sh (kotlinc + Debian's junit4 and libandroid-json-java).
plugins {
    alias(libs.plugins.kotlin.jvm)
}

kotlin { jvmToolchain(17) }

dependencies {
    compileOnly(libs.android.json)
    testImplementation(libs.android.json)
    testImplementation(libs.junit)
}

tasks.test {
    // golden vectors: `derm golden` beside the exported model (see ../README.md)
    systemProperty("derm.golden", (findProperty("dermGolden") ?: "$rootDir/../runs/reference/export/golden").toString())
    exclude("**/RunTests*")
}
