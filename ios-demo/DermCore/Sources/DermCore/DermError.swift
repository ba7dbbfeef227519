import Foundation

/// What goes wrong in the derm core. Every message is for the user and names the file; an app shows it on a screen.
public enum DermError: Error, LocalizedError, Equatable {
    /// A model file (or its manifest, or its outputs) that cannot be used.
    case modelFile(String)
    /// The file may be fine, but this version of the app does not read its manifest format.
    case unsupportedManifest(String)
    /// A caller's argument that does not fit the model, e.g. an operating point the manifest does not have.
    case invalidArgument(String)
    /// Pixels that do not make the image they claim to be.
    case invalidImage(String)

    /// The message for the user.
    public var message: String {
        switch self {
        case .modelFile(let m), .unsupportedManifest(let m), .invalidArgument(let m), .invalidImage(let m):
            return m
        }
    }

    public var errorDescription: String? { message }

    /// True for the errors that mean "this file cannot be used here" (Kotlin's `ModelFileException` and its
    /// subclass `UnsupportedManifestException`).
    public var isModelFileError: Bool {
        switch self {
        case .modelFile, .unsupportedManifest:
            return true
        case .invalidArgument, .invalidImage:
            return false
        }
    }
}
