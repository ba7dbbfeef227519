// node web/test/litert/run.mjs MODEL INPUT.rgb SIZE RUNS: serves the probe (cross-origin isolated, for threads) on
// 127.0.0.1 and prints LiteRT.js's timings at 1 and 2 threads as JSON. Benchmark only (benchmarks/web.py).
import { createServer } from "node:http";
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const [model, input, size, runs] = process.argv.slice(2);
const here = dirname(fileURLToPath(import.meta.url));
const modules = join(here, "..", "..", "node_modules", "@litertjs");
const TYPES = { ".js": "text/javascript", ".mjs": "text/javascript", ".html": "text/html", ".wasm": "application/wasm" };
const server = createServer((req, res) => {
  const path = req.url.split("?")[0];
  const file = path === "/model.tflite" ? model : path === "/input.rgb" ? input
    : path.startsWith("/litert/") ? join(modules, path.slice(8)) : join(here, path === "/" ? "index.html" : path);
  try {
    const body = readFileSync(file);
    res.writeHead(200, { "Content-Type": TYPES[file.slice(file.lastIndexOf("."))] ?? "application/octet-stream",
      "Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp" });
    res.end(body);
  } catch {
    res.writeHead(404).end();
  }
});
await new Promise((ok) => server.listen(0, "127.0.0.1", ok));
const browser = await chromium.launch({ executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync"] });
const out = [];
try {
  for (const threads of [1, 2]) {
    const page = await browser.newPage(); // a fresh page: the threaded and plain WASM builds do not mix
    await page.goto(`http://127.0.0.1:${server.address().port}/`);
    await page.waitForFunction(() => window.probe);
    out.push(await page.evaluate((o) => window.probe(o), { threads, runs: Number(runs), shape: [1, +size, +size, 3] }));
    await page.close();
  }
} finally {
  await browser.close();
  server.close();
}
console.log(JSON.stringify(out));
