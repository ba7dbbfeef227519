import AVFoundation
import SwiftUI
import UIKit

/// The rear camera: a preview and one photo on demand, handed over as the JPEG/HEIC data the camera wrote (with its
/// EXIF orientation), so a photo takes the same path as a picked file. Nothing is stored or sent anywhere.
final class Camera: NSObject, ObservableObject, AVCapturePhotoCaptureDelegate {
    enum State: Equatable { case idle, running, denied, unavailable(String) }

    @Published private(set) var state: State = .idle
    let session = AVCaptureSession()
    private let output = AVCapturePhotoOutput()
    private var onPhoto: ((Result<Data, Error>) -> Void)?

    func start() async {
        switch AVCaptureDevice.authorizationStatus(for: .video) {
        case .notDetermined:
            guard await AVCaptureDevice.requestAccess(for: .video) else { return await set(.denied) }
        case .authorized:
            break
        default:
            return await set(.denied)
        }
        guard let device = AVCaptureDevice.default(.builtInWideAngleCamera, for: .video, position: .back),
              let input = try? AVCaptureDeviceInput(device: device)
        else { return await set(.unavailable("This device has no rear camera.")) }
        session.beginConfiguration()
        session.sessionPreset = .photo
        if session.inputs.isEmpty, session.canAddInput(input) { session.addInput(input) }
        if session.outputs.isEmpty, session.canAddOutput(output) { session.addOutput(output) }
        session.commitConfiguration()
        DispatchQueue.global(qos: .userInitiated).async { self.session.startRunning() }
        await set(.running)
    }

    func stop() {
        DispatchQueue.global(qos: .userInitiated).async { self.session.stopRunning() }
        state = .idle
    }

    func shoot(_ done: @escaping (Result<Data, Error>) -> Void) {
        onPhoto = done
        output.capturePhoto(with: AVCapturePhotoSettings(), delegate: self)
    }

    func photoOutput(_ output: AVCapturePhotoOutput, didFinishProcessingPhoto photo: AVCapturePhoto, error: Error?) {
        let result: Result<Data, Error>
        if let error {
            result = .failure(error)
        } else if let data = photo.fileDataRepresentation() {
            result = .success(data)
        } else {
            result = .failure(CocoaError(.fileReadCorruptFile))
        }
        DispatchQueue.main.async { self.onPhoto?(result) }
    }

    @MainActor private func set(_ s: State) { state = s }
}

/// The camera's live preview.
struct CameraPreview: UIViewRepresentable {
    let session: AVCaptureSession

    final class PreviewView: UIView {
        override class var layerClass: AnyClass { AVCaptureVideoPreviewLayer.self }
        var preview: AVCaptureVideoPreviewLayer { layer as! AVCaptureVideoPreviewLayer }
    }

    func makeUIView(context: Context) -> PreviewView {
        let view = PreviewView()
        view.preview.session = session
        view.preview.videoGravity = .resizeAspectFill
        return view
    }

    func updateUIView(_ view: PreviewView, context: Context) {}
}
