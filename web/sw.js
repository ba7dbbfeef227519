// Offline copy of the app: on install it stores every file the page needs (the app, MediaPipe's bundle and WASM,
// the model); afterwards each request goes to the network first, so a new model or app version is used as soon as
// the server has it, and to the stored copy when the network (or the server) is gone. Same-origin files only.
const CACHE = "derm-web-1";
const WASM = "vendor/tasks-vision/wasm/";
const FILES = [
  "./", "index.html", "app.js", "derm-core.js", "runtime.js", "style.css", "app.webmanifest", "icon-192.png",
  "icon-512.png", "core/errors.js", "core/manifest.js", "core/model-file.js", "core/preprocess.js",
  "vendor/tasks-vision/vision_bundle.mjs", `${WASM}vision_wasm_internal.js`,
  `${WASM}vision_wasm_internal.wasm`, "model.tflite",
];

self.addEventListener("install", (event) => {
  event.waitUntil(caches.open(CACHE).then((c) => c.addAll(FILES)).then(() => self.skipWaiting()));
});

self.addEventListener("activate", (event) => {
  event.waitUntil(
    caches.keys().then((keys) => Promise.all(keys.filter((k) => k !== CACHE).map((k) => caches.delete(k))))
      .then(() => self.clients.claim()),
  );
});

self.addEventListener("fetch", (event) => {
  const url = new URL(event.request.url);
  if (event.request.method !== "GET" || url.origin !== self.location.origin) return;
  event.respondWith(
    fetch(event.request)
      .then((res) => {
        if (res.ok) {
          const copy = res.clone();
          caches.open(CACHE).then((c) => c.put(event.request, copy));
        }
        return res;
      })
      .catch(() => caches.match(event.request, { ignoreSearch: true }).then((hit) => hit ?? Response.error())),
  );
});
