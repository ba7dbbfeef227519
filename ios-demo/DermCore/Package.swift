// swift-tools-version:5.9
// DermCore: the derm manifest, prediction and preprocessing rules (ports of android-demo/core and web/core), in
// Foundation only, so that it builds and tests on macOS, iOS and Linux alike. The iOS app (../DermDemo.swiftpm)
// adds Core ML around it.
import PackageDescription

let package = Package(
    name: "DermCore",
    platforms: [.iOS(.v16), .macOS(.v13)],
    products: [
        .library(name: "DermCore", targets: ["DermCore"])
    ],
    targets: [
        .target(name: "DermCore"),
        .testTarget(name: "DermCoreTests", dependencies: ["DermCore"]),
    ]
)
