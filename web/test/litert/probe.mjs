// Times the same .tflite and input tensor in LiteRT.js (XNNPACK in WASM, like MediaPipe's, but with a threaded build
// and raw tensors): separates the WASM kernels' time from MediaPipe's image pipeline, and shows what threads buy.
import { loadAndCompile, loadLiteRt, Tensor } from "/litert/core/dist/index.js";

window.probe = async ({ threads, runs, shape }) => {
  await loadLiteRt("/litert/core/wasm/", { threads: threads > 1 });
  const fetchBytes = async (url) => new Uint8Array(await (await fetch(url)).arrayBuffer());
  const model = await loadAndCompile(await fetchBytes("/model.tflite"), {
    accelerator: "wasm",
    cpuOptions: { numThreads: threads },
  });
  const input = await fetchBytes("/input.rgb");
  const run = async () => {
    const tensor = new Tensor(input, shape);
    const results = await model.run(tensor);
    tensor.delete();
    return results;
  };
  const outputs = [];
  for (const r of await run()) outputs.push(Array.from(r.toTypedArray()));
  for (let i = 0; i < 2; i++) await run();
  const ms = [];
  for (let i = 0; i < runs; i++) {
    const t = performance.now();
    await run();
    ms.push(performance.now() - t);
  }
  ms.sort((a, b) => a - b);
  return { threads, runs, median_ms: ms[runs >> 1], min_ms: ms[0], outputs, crossOriginIsolated };
};
