// The errors every part of the derm core throws: each message is for the user, and names the file.

/** A model file that cannot be used, with a message for the user (the app shows it on a screen, never crashes). */
export class ModelFileError extends Error {
  constructor(message) { super(message); this.name = "ModelFileError"; }
}

/** The file may be fine, but this version of the app does not read its manifest format. */
export class UnsupportedManifestError extends ModelFileError {
  constructor(message) { super(message); this.name = "UnsupportedManifestError"; }
}
