"""``derm web``: the browser app (the repository's ``web/`` folder) with one exported ``.tflite``, served on localhost
to try it, or written out as a static site to put on any host.

The site is the app's own files, MediaPipe Tasks' bundle and WASM from the pinned npm package (``web/node_modules``,
``npm ci --prefix web``), and the model as ``model.tflite``: every file the page loads comes from its own origin, so
it works offline once loaded (its service worker keeps a copy) and nothing leaves the phone. The same
Content-Security-Policy is in the page (a ``<meta>`` any host keeps) and sent as a header here; the headers a host
should add are written to ``_headers`` (the format Netlify and Cloudflare Pages read).
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socketserver
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from derm._util import sha256_file, unwritable
from derm._version import __version__
from derm.errors import DermError
from derm.manifest import read_manifest

#: The app folder of a source checkout (the SDK lives in sdk/, the app in web/).
DEFAULT_APP = Path(__file__).resolve().parent.parent / "web"
TASKS_VISION = Path("node_modules") / "@mediapipe" / "tasks-vision"
#: The app's own files: those at the top of web/ with these suffixes, and its core/ modules.
APP_SUFFIXES = {".html", ".js", ".css", ".webmanifest", ".png", ".svg"}

#: The policy in index.html's <meta>, repeated as a header. connect-src 'self' is what keeps MediaPipe's usage
#: metrics (a POST to a Google endpoint every 60 s and on close) and anything else from leaving the page's origin.
CSP = (
    "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; connect-src 'self'; img-src 'self' blob: data:; "
    "media-src 'self' blob: mediastream:; style-src 'self'; worker-src 'self'; object-src 'none'; base-uri 'self'; "
    "form-action 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    # Cross-origin isolation: SharedArrayBuffer and fine timers for the latency shown; every file is same-origin.
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Permissions-Policy": "camera=(self), microphone=(), geolocation=()",
}
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".webmanifest": "application/manifest+json",
    ".wasm": "application/wasm",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".tflite": "application/octet-stream",
}


class WebError(DermError, ValueError):
    """The app cannot be served or written as asked."""


def site_files(
    model: str | os.PathLike[str], app: str | os.PathLike[str] | None = None
) -> tuple[dict[str, Path], dict[str, Any]]:
    """URL path (relative to the site root) -> file, after checking the model is a derm .tflite and the app is
    complete, and the model's manifest. The one list both the server and the static build use."""
    model, app = Path(model), Path(app) if app is not None else DEFAULT_APP
    if model.suffix != ".tflite":
        raise WebError(
            f"The web app runs .tflite files (MediaPipe Tasks); {str(model)!r} is not one. Export one with "
            "`derm-export RUN --target tflite`."
        )
    manifest = read_manifest(model)  # not a derm export, truncated, or a newer format: say so now, not in the browser
    if not (app / "index.html").is_file():
        raise WebError(
            f"No web app at {str(app)!r} (no index.html). Pass --app with the web/ folder of the derm repository."
        )
    vendor = app / TASKS_VISION
    if not (vendor / "vision_bundle.mjs").is_file():
        raise WebError(
            f"MediaPipe Tasks is not installed in {str(app)!r}: run `npm ci --prefix {app}` (the version pinned in "
            "its package-lock.json), then run this again."
        )
    mine = [*app.iterdir(), *(app / "core").glob("*.js")]
    files = {p.relative_to(app).as_posix(): p for p in sorted(mine) if p.is_file() and p.suffix in APP_SUFFIXES}
    files["vendor/tasks-vision/vision_bundle.mjs"] = vendor / "vision_bundle.mjs"
    for p in sorted((vendor / "wasm").iterdir()):
        if p.suffix in (".js", ".wasm") and "_module_" not in p.name:  # the ES-module build is not what loads
            files[f"vendor/tasks-vision/wasm/{p.name}"] = p
    files["model.tflite"] = model
    return files, manifest


def build_info(files: dict[str, Path], manifest: dict[str, Any]) -> dict[str, object]:
    """What the site is made of, served as build.json: the model's and the runtime's versions and hashes."""
    vendor = files["vendor/tasks-vision/vision_bundle.mjs"].parent
    return {
        "model": {
            "file": files["model.tflite"].name,
            "sha256": sha256_file(files["model.tflite"]),
            "bytes": files["model.tflite"].stat().st_size,
            "created": manifest.get("created"),
        },
        "tasks_vision": json.loads((vendor / "package.json").read_text(encoding="utf-8"))["version"],
        "derm": __version__,
    }


def write_site(
    model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    app: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the app with this model as a static site folder (atomically: OUT.partial, then renamed)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise WebError(f"{str(out)!r} exists; pass --overwrite to replace it, or choose another --out.")
    if out.exists() and not (out / "model.tflite").is_file():
        raise WebError(f"{str(out)!r} is not a site derm web wrote (no model.tflite); not replacing it.")
    if why := unwritable(out):
        raise WebError(f"Cannot write the site to {str(out)!r}: {why}.")
    files, manifest = site_files(model, app)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for rel, src in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tmp / rel)
        (tmp / "build.json").write_text(json.dumps(build_info(files, manifest), indent=1) + "\n", encoding="utf-8")
        rules = "".join(f"  {k}: {v}\n" for k, v in HEADERS.items())
        (tmp / "_headers").write_text(f"/*\n{rules}", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET/HEAD of the site's files only, with the app's headers; no directory listings, nothing else on disk."""

    files: dict[str, Path]
    build: bytes
    log: Callable[[str], None] | None

    def do_GET(self) -> None:
        self._send(head=False)

    def do_HEAD(self) -> None:
        self._send(head=True)

    def _send(self, head: bool) -> None:
        rel = self.path.split("?", 1)[0].split("#", 1)[0].lstrip("/") or "index.html"
        if rel == "build.json":
            body, ctype = self.build, TYPES[".json"]
        elif rel in self.files:
            body, ctype = None, TYPES.get(Path(rel).suffix, "application/octet-stream")
        else:
            self.send_error(404, "Not in the derm web app")
            return
        path = self.files.get(rel)
        size = len(body) if body is not None else path.stat().st_size  # type: ignore[union-attr]
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(size))
        self.send_header("Cache-Control", "no-cache")  # revalidate; the service worker keeps the offline copy
        for k, v in HEADERS.items():
            self.send_header(k, v)
        self.end_headers()
        if head:
            return
        try:
            if body is not None:
                self.wfile.write(body)
            else:
                with open(path, "rb") as f:  # type: ignore[arg-type]
                    shutil.copyfileobj(f, self.wfile)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the page went away mid-download

    def log_message(self, format: str, *args: object) -> None:
        if self.log is not None:
            self.log(f"{self.address_string()} {format % args}")


class _Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def make_server(
    model: str | os.PathLike[str],
    host: str = "127.0.0.1",
    port: int = 8000,
    app: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> http.server.HTTPServer:
    """A server for the app with this model (port 0: any free port). Call ``serve_forever()``."""
    files, manifest = site_files(model, app)
    build = json.dumps(build_info(files, manifest)).encode()
    handler = type("Handler", (_Handler,), {"files": files, "build": build, "log": log})
    try:
        return _Server((host, port), partial(handler))
    except OSError as exc:
        raise WebError(
            f"Cannot listen on {host}:{port} ({exc.strerror or exc}); pass another --port (0 picks a free one)."
        ) from None
