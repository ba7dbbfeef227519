// Drives the real page in Debian's headless Chromium (playwright-core, executablePath) against `derm web` serving
// a model on 127.0.0.1, and writes what the page did as JSON for tests/test_web.py to check against the golden
// vectors (the Python SDK's inputs, outputs and predictions), plus a screenshot of the result screen.
//
//   node web/test/browser.mjs --derm .venv/bin/derm --golden DIR --out DIR [--no-manifest FILE] [--bench N]
//
// Steps: every golden image through the page's file input; a file without a manifest through "Other model…";
// MediaPipe's metrics flush (it posts on close) to show it is blocked; then the server is stopped and the page
// reloaded, to show the app and model come from the service worker's copy and still classify. With --bench N, the
// inference is timed N times per delegate (CPU, and GPU where the browser has one) instead.
import { spawn } from "node:child_process";
import { readFileSync, writeFileSync, mkdirSync } from "node:fs";
import { join, resolve, basename } from "node:path";
import { parseArgs } from "node:util";
import { chromium } from "playwright-core";

const { values: args } = parseArgs({
  options: {
    derm: { type: "string" }, golden: { type: "string" }, out: { type: "string" },
    "no-manifest": { type: "string" }, bench: { type: "string" }, chromium: { type: "string" },
  },
});
const CHROMIUM = args.chromium ?? process.env.CHROMIUM ?? "/usr/bin/chromium";
// The flags this machine needs (no sandbox as root, no background calls to Google that the closed network refuses).
const FLAGS = ["--no-sandbox", "--disable-quic", "--no-first-run", "--disable-background-networking",
  "--disable-component-update", "--disable-sync"];
const golden = JSON.parse(readFileSync(join(args.golden, "golden.json"), "utf8"));
const model = resolve(args.golden, golden.model.file);
mkdirSync(args.out, { recursive: true });
const report = { model, requests: [], console: [], pageErrors: [], steps: {} };

function startServer() {
  const child = spawn(args.derm, ["web", "--model", model, "--port", "0"], { stdio: ["ignore", "ignore", "pipe"] });
  return new Promise((ok, fail) => {
    let err = "";
    child.stderr.on("data", (d) => {
      err += d;
      const m = /http:\/\/127\.0\.0\.1:(\d+)\//.exec(err);
      if (m) ok({ child, url: m[0] });
    });
    child.on("exit", (code) => fail(new Error(`derm web exited (${code}): ${err}`)));
  });
}

const waitReady = (page) => page.waitForFunction(() => window.derm && window.derm.state !== "loading", null,
  { timeout: 180_000 });

async function classify(page, file) {
  const before = await page.evaluate(() => window.derm.results.length);
  await page.setInputFiles("#image-input", file);
  await page.waitForFunction((n) => window.derm.results.length > n || window.derm.error, before, { timeout: 60_000 });
  return page.evaluate(() => {
    const r = window.derm.results.at(-1);
    if (!r) return { error: window.derm.error };
    return { ...r, input: Array.from(r.input), outputs: Object.fromEntries(
      Object.entries(r.outputs).map(([k, v]) => [k, Array.from(v)])) };
  });
}

const server = await startServer();
const browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: FLAGS });
try {
  const context = await browser.newContext({ viewport: { width: 800, height: 1200 } });
  context.on("request", (r) => report.requests.push({ url: r.url(), from: r.serviceWorker() ? "service worker" : "page" }));
  const page = await context.newPage();
  page.on("console", (m) => report.console.push(`${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => report.pageErrors.push(String(e)));
  await page.goto(server.url);
  await waitReady(page);
  report.steps.load = await page.evaluate(() => ({ state: window.derm.state, error: window.derm.error,
    model: window.derm.model, crossOriginIsolated, disclaimer: document.getElementById("disclaimer").textContent,
    operatingPoint: document.getElementById("operating-point").value }));
  if (report.steps.load.state !== "ready") throw new Error(`the page did not load the model: ${report.steps.load.error}`);

  report.steps.cases = [];
  for (const c of golden.cases) report.steps.cases.push({ name: c.name, ...(await classify(page, join(args.golden, c.image))) });

  if (args.bench) {
    report.steps.mediapipeResize = [];
    for (const c of golden.cases) {
      const file = join(args.golden, c.image);
      const outputs = await page.evaluate(async ([bytes, name]) => {
        const out = await window.derm.classifyWithMediaPipeResize(new Blob([new Uint8Array(bytes)]));
        return Object.fromEntries(Object.entries(out).map(([k, v]) => [k, Array.from(v)]));
      }, [Array.from(readFileSync(file)), c.name]);
      report.steps.mediapipeResize.push({ name: c.name, outputs });
    }
    report.steps.bench = {};
    const n = Number(args.bench);
    for (const delegate of ["CPU", "GPU"]) {
      if (delegate === "GPU") {
        const loads = await page.evaluate(() => window.derm.loads);
        await page.check("#use-gpu");
        await page.waitForFunction((n) => window.derm.loads > n, loads, { timeout: 180_000 });
      }
      const model = await page.evaluate(() => window.derm.model);
      if (model.delegate !== delegate) { // the page fell back to the CPU: record why, time nothing
        const why = report.console.filter((l) => /GPU delegate|Not supported/.test(l)).map((l) => l.replace(/^\w+: /, ""));
        report.steps.bench[delegate] = { delegate: model.delegate, notice: model.notice, log: why };
        continue;
      }
      await classify(page, join(args.golden, golden.cases[0].image)); // the image the timings use
      report.steps.bench[delegate] = { ...(await page.evaluate((n) => window.derm.benchmark(n), n)), notice: "" };
    }
  } else {
    await page.screenshot({ path: join(args.out, "result.png"), fullPage: true });

    if (args["no-manifest"]) {
      await page.setInputFiles("#model-input", args["no-manifest"]);
      await page.waitForFunction(() => window.derm.error, null, { timeout: 60_000 });
      report.steps.noManifest = await page.evaluate(() => ({ error: window.derm.error, state: window.derm.state,
        model: window.derm.model.name, shown: document.getElementById("error").textContent }));
    }
    // Reloading the model closes MediaPipe's classifier, which flushes its usage metrics to Google: blocked.
    await page.evaluate(() => window.derm.reload()); // resolves once the model is loaded again
    await page.waitForTimeout(500);
    report.steps.violations = await page.evaluate(() => window.derm.violations);

    // Offline: the service worker's copy, with the server gone.
    report.steps.cached = await page.evaluate(async () => {
      await window.derm.serviceWorker;
      const keys = await (await caches.open("derm-web-1")).keys();
      return keys.map((r) => new URL(r.url).pathname);
    });
    server.child.kill("SIGTERM");
    await new Promise((ok) => server.child.once("exit", ok));
    await page.reload();
    await waitReady(page);
    const offline = await page.evaluate(() => ({ state: window.derm.state, error: window.derm.error }));
    offline.case = await classify(page, join(args.golden, golden.cases[0].image));
    delete offline.case.input;
    report.steps.offline = offline;
  }
} finally {
  await browser.close();
  server.child.kill("SIGTERM");
  writeFileSync(join(args.out, "browser.json"), JSON.stringify(report, null, 1));
}
console.log(`wrote ${join(args.out, "browser.json")} (${basename(model)})`);
