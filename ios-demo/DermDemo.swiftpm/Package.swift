// swift-tools-version: 5.9
// The iOS app: a Swift Playgrounds / Xcode app package (no .xcodeproj, no CocoaPods). Open this folder in Xcode 15+
// (or Swift Playgrounds 4.4+ on an iPad), put the exported model at Sources/Resources/DermClassifier.mlpackage
// (ios-demo/README.md says how), and run it on an iPhone.
import AppleProductTypes
import PackageDescription

let package = Package(
    name: "DermDemo",
    platforms: [.iOS("16.0")],
    products: [
        .iOSApplication(
            name: "Derm",
            targets: ["AppModule"],
            bundleIdentifier: "org.derm.demo",
            teamIdentifier: "",
            displayVersion: "0.1.0",
            bundleVersion: "1",
            appIcon: .placeholder(icon: .leaf),
            accentColor: .presetColor(.indigo),
            supportedDeviceFamilies: [.phone, .pad],
            supportedInterfaceOrientations: [.portrait],
            capabilities: [
                .camera(purposeString: "The camera photographs the skin lesion to classify. The photo stays on this iPhone.")
            ],
            appCategory: .medical
        )
    ],
    dependencies: [
        .package(path: "../DermCore")
    ],
    targets: [
        .executableTarget(
            name: "AppModule",
            dependencies: [.product(name: "DermCore", package: "DermCore")],
            path: "Sources",
            resources: [.process("Resources")]  // Xcode compiles the .mlpackage into .mlmodelc
        )
    ]
)
