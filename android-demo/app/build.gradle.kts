plugins {
    alias(libs.plugins.android.application)
    alias(libs.plugins.kotlin.android)
    alias(libs.plugins.kotlin.compose)
}

android {
    namespace = "derm.app"
    compileSdk = 35
    defaultConfig {
        applicationId = "org.derm.demo"
        minSdk = 24
        targetSdk = 35
        versionCode = 1
        versionName = "0.1"
        testInstrumentationRunner = "androidx.test.runner.AndroidJUnitRunner"
    }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions { jvmTarget = "17" }
    buildFeatures { compose = true }
    // the model is memory-mapped from the APK: keep it uncompressed
    androidResources { noCompress += "tflite" }
    sourceSets["androidTest"].assets.srcDir(layout.buildDirectory.dir("golden"))
}

// The file `derm-export --target tflite` wrote (default: the reference model's int8 file that quickstart.sh makes),
// copied into the app's assets as model.tflite; its golden vectors (`derm golden`) go to the instrumented tests.
val dermModel = (findProperty("dermModel") ?: "$rootDir/../runs/reference/export/model-int8.tflite").toString()
val copyModel by tasks.registering(Copy::class) {
    description = "Copies the exported .tflite (-PdermModel=PATH) into the assets as model.tflite."
    from(dermModel) { rename { "model.tflite" } }
    into(layout.projectDirectory.dir("src/main/assets"))
    doFirst { check(file(dermModel).isFile) { "No model at $dermModel: run `bash quickstart.sh` or pass -PdermModel=PATH." } }
}
val copyGolden by tasks.registering(Copy::class) {
    description = "Copies the golden vectors beside the model (derm golden) for connectedAndroidTest."
    from(file(dermModel).resolveSibling("golden"))
    into(layout.buildDirectory.dir("golden/golden"))
}
tasks.named("preBuild") { dependsOn(copyModel, copyGolden) }

dependencies {
    implementation(project(":core"))
    implementation(platform(libs.androidx.compose.bom))
    implementation(libs.androidx.compose.ui)
    implementation(libs.androidx.compose.material3)
    implementation(libs.androidx.activity.compose)
    implementation(libs.androidx.lifecycle.runtime)
    implementation(libs.androidx.camera.camera2)
    implementation(libs.androidx.camera.lifecycle)
    implementation(libs.androidx.camera.view)
    implementation(libs.androidx.exifinterface)
    implementation(libs.litert)
    implementation(libs.litert.gpu)
    implementation(libs.litert.gpu.api)
    androidTestImplementation(libs.androidx.test.runner)
    androidTestImplementation(libs.androidx.test.ext.junit)
    androidTestImplementation(libs.junit)
}
