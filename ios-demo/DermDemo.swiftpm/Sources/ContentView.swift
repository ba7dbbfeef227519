import DermCore
import PhotosUI
import SwiftUI
import UniformTypeIdentifiers

@main
struct DermApp: App {
    var body: some Scene {
        WindowGroup { ContentView() }
    }
}

/// The app's state: the model (or why there is none), the last result, and any message for the user.
@MainActor
final class AppModel: ObservableObject {
    @Published var runner: ModelRunner?
    @Published var status = "Loading the model…"
    @Published var problem: String?
    @Published var result: (source: String, classified: Classified)?
    @Published var operatingPoint = Predictor.defaultOperatingPoint

    /// The model shipped in the app (Sources/Resources/DermClassifier.mlpackage, which Xcode compiles into the
    /// bundle as DermClassifier.mlmodelc; an uncompiled package is compiled here instead).
    func loadBundled() async {
        let bundled = ["mlmodelc", "mlpackage"].lazy.compactMap {
            Bundle.module.url(forResource: "DermClassifier", withExtension: $0)
        }
        guard let url = bundled.first else {
            status = "No model in the app."
            problem = "Export one into Sources/Resources/DermClassifier.mlpackage (derm-export RUN --target coreml), "
                + "or open one with “Other model…”."
            return
        }
        await load(url)
    }

    /// A model opened from Files; the app keeps the model it had when this one cannot be used.
    func load(_ url: URL) async {
        let scoped = url.startAccessingSecurityScopedResource()
        defer { if scoped { url.stopAccessingSecurityScopedResource() } }
        status = "Loading \(url.lastPathComponent)…"
        do {
            let next = try await ModelRunner(package: url)
            if let point = next.operatingPoints.contains(operatingPoint) ? operatingPoint : next.operatingPoints.first {
                try next.use(operatingPoint: point)
                operatingPoint = point
            }
            runner = next
            result = nil
            problem = nil
            status = "\(next.name): \(next.manifest.levels.joined(separator: " / ")) levels, "
                + "\(next.manifest.tasks.count) tasks."
        } catch {
            problem = message(error)
            status = runner.map { "Still using \($0.name)." } ?? "No model loaded."
        }
    }

    func classify(_ data: Data, source: String) {
        guard let runner else { return }
        do {
            let (image, orientation) = try ImageInput.decode(data, name: source)
            result = (source, try runner.classify(image, orientation: orientation))
            problem = nil
        } catch {
            problem = message(error)
        }
    }

    func choose(operatingPoint point: String) {
        do {
            try runner?.use(operatingPoint: point)
            operatingPoint = point
            result = nil
        } catch {
            problem = message(error)
        }
    }

    private func message(_ error: Error) -> String {
        (error as? LocalizedError)?.errorDescription ?? error.localizedDescription
    }
}

struct ContentView: View {
    @StateObject private var app = AppModel()
    @StateObject private var camera = Camera()
    @State private var picked: PhotosPickerItem?
    @State private var importing = false

    var body: some View {
        NavigationStack {
            ScrollView {
                VStack(alignment: .leading, spacing: 12) {
                    Text(app.runner?.manifest.disclaimer ?? Manifest.defaultDisclaimer)
                        .font(.callout.bold())
                        .foregroundStyle(.red)
                    Text(app.status).font(.subheadline)
                    if let summary = app.runner?.manifest.trainingSummary {
                        Text(summary).font(.caption).foregroundStyle(.secondary)
                    }
                    controls
                    if let problem = app.problem {
                        Text(problem).foregroundStyle(.red).accessibilityIdentifier("problem")
                    }
                    cameraSection
                    if let runner = app.runner, let result = app.result {
                        ResultView(manifest: runner.manifest, source: result.source, classified: result.classified)
                    }
                    Text("Runs on this iPhone: the photo never leaves it. After Esteva et al., Nature 2017.")
                        .font(.caption2)
                        .foregroundStyle(.secondary)
                }
                .padding()
            }
            .navigationTitle("derm")
        }
        .task { await app.loadBundled() }
        .onChange(of: picked) { item in
            guard let item else { return }
            Task {
                if let data = try? await item.loadTransferable(type: Data.self) {
                    app.classify(data, source: "photo library")
                } else {
                    app.problem = "The photo could not be read from the library."
                }
                picked = nil
            }
        }
        .fileImporter(isPresented: $importing, allowedContentTypes: [UTType(filenameExtension: "mlpackage") ?? .package]) {
            if case .success(let url) = $0 { Task { await app.load(url) } }
        }
    }

    private var controls: some View {
        HStack {
            PhotosPicker("Photo", selection: $picked, matching: .images)
                .buttonStyle(.borderedProminent)
                .disabled(app.runner == nil)
            Button(camera.state == .running ? "Close camera" : "Camera") {
                if camera.state == .running { camera.stop() } else { Task { await camera.start() } }
            }
            .buttonStyle(.bordered)
            .disabled(app.runner == nil)
            Button("Other model…") { importing = true }.buttonStyle(.bordered)
            if let points = app.runner?.operatingPoints, !points.isEmpty {
                Picker("Operating point", selection: Binding(get: { app.operatingPoint }, set: { app.choose(operatingPoint: $0) })) {
                    ForEach(points, id: \.self) { Text("\(Int((Double($0) ?? 0) * 100))% sens.").tag($0) }
                }
            }
        }
    }

    @ViewBuilder private var cameraSection: some View {
        switch camera.state {
        case .running:
            CameraPreview(session: camera.session)
                .frame(height: 320)
                .clipShape(RoundedRectangle(cornerRadius: 8))
            Button("Classify this photo") {
                camera.shoot { result in
                    switch result {
                    case .success(let data): app.classify(data, source: "camera")
                    case .failure(let error): app.problem = "The camera could not take a photo: \(error.localizedDescription)"
                    }
                }
            }
            .buttonStyle(.borderedProminent)
        case .denied:
            Text("Camera access is off for this app. Turn it on in Settings › Privacy › Camera, or pick a photo.")
                .foregroundStyle(.red)
            Button("Open Settings") {
                if let url = URL(string: UIApplication.openSettingsURLString) { UIApplication.shared.open(url) }
            }
        case .unavailable(let why):
            Text(why).foregroundStyle(.red)
        case .idle:
            EmptyView()
        }
    }
}
