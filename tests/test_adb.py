"""The adb layer of derm-bench: Debian's real adb (no phone here: the right error), and the whole flow against a
STAND-IN device: a fake ``adb`` that runs the pushed commands on this machine, with a stand-in ``benchmark_model`` that
really runs the pushed .tflite in ai-edge-litert and prints TFLite's report format. No phone is involved."""

from __future__ import annotations

import http.server
import shutil
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from derm.benchmarks import adb

FAKE_ADB = textwrap.dedent(
    """\
    #!{python}
    import os, shutil, subprocess, sys
    root = os.environ["STANDIN_ROOT"]
    args = sys.argv[1:]
    if args == ["devices"]:
        print("List of devices attached")
        for item in filter(None, os.environ.get("STANDIN_DEVICES", "STANDIN01:device").split(",")):
            serial, state = item.split(":")
            print(f"{{serial}}\\t{{state}}")
        sys.exit(0)
    assert args[0] == "-s", args
    args = args[2:]
    local = lambda p: p.replace("/data/local/tmp", root + "/data/local/tmp")
    if args[0] == "push":
        os.makedirs(os.path.dirname(local(args[2])), exist_ok=True)
        shutil.copy(args[1], local(args[2]))
        sys.exit(0)
    if args[0] == "shell":
        cmd = " ".join(args[1:])
        if cmd.startswith("getprop"):
            print({{"ro.product.cpu.abi": "arm64-v8a", "ro.product.model": "Stand-in"}}[cmd.split()[1]])
            sys.exit(0)
        sys.exit(subprocess.run(["bash", "-c", local(cmd)]).returncode)
    sys.exit(f"stand-in adb: unsupported {{args}}")
    """
)

STANDIN_BENCHMARK_MODEL = textwrap.dedent(
    """\
    #!{python}
    # Stand-in for TFLite's benchmark_model: runs the graph in ai-edge-litert and prints the same report lines.
    import sys, time
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter
    flags = dict(a[2:].split("=", 1) for a in sys.argv[1:])
    if flags.get("use_gpu") == "true":
        print("ERROR: GPU delegate is not available on this stand-in device"); sys.exit(1)
    t0 = time.perf_counter()
    it = Interpreter(model_path=flags["graph"], num_threads=int(flags["num_threads"])); it.allocate_tensors()
    init = (time.perf_counter() - t0) * 1e6
    inp = it.get_input_details()[0]
    x = np.zeros(inp["shape"], inp["dtype"])
    def once():
        t = time.perf_counter(); it.set_tensor(inp["index"], x); it.invoke(); return (time.perf_counter() - t) * 1e6
    first = once(); warm = [once() for _ in range(2)]; runs = [once() for _ in range(int(flags["num_runs"]))]
    print(f"count={{len(runs)}} first={{int(runs[0])}} curr={{int(runs[-1])}} min={{int(min(runs))}} "
          f"max={{int(max(runs))}} avg={{np.mean(runs):.1f}} std={{int(np.std(runs))}}")
    print(f"Inference timings in us: Init: {{int(init)}}, First inference: {{int(first)}}, "
          f"Warmup (avg): {{np.mean(warm):.1f}}, Inference (avg): {{np.mean(runs):.1f}}")
    print("Peak memory footprint (MB): init=3.1 overall=41.5")
    """
)


@pytest.fixture
def standin(tmp_path, monkeypatch):
    root = tmp_path / "device"
    root.mkdir()
    fake = tmp_path / "adb"
    fake.write_text(FAKE_ADB.format(python=sys.executable))
    fake.chmod(0o755)
    binary = tmp_path / "benchmark_model"
    binary.write_text(STANDIN_BENCHMARK_MODEL.format(python=sys.executable))
    binary.chmod(0o755)
    monkeypatch.setenv("STANDIN_ROOT", str(root))
    return str(fake), binary, root


@pytest.mark.skipif(shutil.which("adb") is None, reason="Debian's adb is not installed (apt-get install adb)")
def test_real_adb_without_a_phone_says_so():
    with pytest.raises(adb.DeviceError, match="No Android device attached"):
        adb.choose_device(adb.find_adb())


def test_adb_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("ADB", raising=False)
    with pytest.raises(adb.DeviceError, match="apt-get install adb"):
        adb.find_adb()


def test_standin_device_choice_errors(standin, monkeypatch):
    fake, _, _ = standin
    monkeypatch.setenv("STANDIN_DEVICES", "")
    with pytest.raises(adb.DeviceError, match="No Android device attached"):
        adb.choose_device(fake)
    monkeypatch.setenv("STANDIN_DEVICES", "AAA:device,BBB:device")
    with pytest.raises(adb.DeviceError, match=r"Several devices attached \(AAA, BBB\); choose one with --device"):
        adb.choose_device(fake)
    assert adb.choose_device(fake, "BBB").serial == "BBB"
    with pytest.raises(adb.DeviceError, match="No device 'CCC'"):
        adb.choose_device(fake, "CCC")
    monkeypatch.setenv("STANDIN_DEVICES", "AAA:unauthorized")
    with pytest.raises(adb.DeviceError, match="unauthorized: accept the USB debugging prompt"):
        adb.choose_device(fake)


def test_standin_device_full_flow_runs_the_pushed_model(standin, small_tflite):
    fake, binary, root = standin
    device = adb.choose_device(fake)
    assert device.abi == "arm64-v8a"
    rows = adb.run_on_device(device, small_tflite, binary, delegates=("cpu", "gpu"), threads=2, runs=5)
    assert (root / "data/local/tmp/derm" / Path(small_tflite).name).is_file()  # really pushed
    cpu, gpu = rows
    assert cpu["delegate"] == "cpu" and cpu["runs"] == 5 and cpu["avg_ms"] > 0 and cpu["init_ms"] > 0
    assert cpu["peak_memory_mb"] == 41.5
    assert "error" in gpu and "GPU delegate is not available" in gpu["error"]
    with pytest.raises(adb.DeviceError, match="Unknown delegate"):
        adb.run_on_device(device, small_tflite, binary, delegates=("tpu",))


def test_parse_benchmark_model_report():
    text = (
        "count=50 first=74133 curr=73210 min=72544 max=80021 avg=73921.4 std=1312\n"
        "Inference timings in us: Init: 31427, First inference: 98311, Warmup (avg): 80412.5, "
        "Inference (avg): 73921.4\n"
        "Peak memory footprint (MB): init=5.2 overall=68.9\n"
    )
    got = adb.parse_benchmark_output(text)
    assert got == pytest.approx(
        {
            "init_ms": 31.427,
            "first_ms": 98.311,
            "warmup_avg_ms": 80.4125,
            "avg_ms": 73.9214,
            "runs": 50,
            "std_ms": 1.312,
            "peak_memory_mb": 68.9,
        }
    )
    with pytest.raises(adb.DeviceError, match="no timings"):
        adb.parse_benchmark_output("ERROR: Failed to load model\n")


def test_download_benchmark_model_from_a_local_server(tmp_path, monkeypatch):
    """The real download code against a local HTTP server (no internet here); the cache is reused afterwards."""
    served = tmp_path / "srv"
    served.mkdir()
    (served / "benchmark_model").write_bytes(b"\x7fELF stand-in binary")
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(served), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("DERM_CACHE", str(tmp_path / "cache"))
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/benchmark_model"
        path = adb.download_benchmark_model("arm64-v8a", url=url)
        assert path.read_bytes() == b"\x7fELF stand-in binary" and path.stat().st_mode & 0o111
        assert adb.benchmark_binary("arm64-v8a", download=False) == path
        with pytest.raises(adb.DeviceError, match="Cannot download"):
            adb.download_benchmark_model("arm64-v8a", url=url + "-missing")
        assert not list((tmp_path / "cache").rglob("*.partial"))
    finally:
        server.shutdown()
        server.server_close()
    with pytest.raises(adb.DeviceError, match="No prebuilt benchmark_model for ABI 'mips'"):
        adb.download_benchmark_model("mips")
    with pytest.raises(adb.DeviceError, match="No benchmark_model for ABI 'x86'"):
        adb.benchmark_binary("x86", download=False)


def test_derm_bench_device_rows_through_the_standin_device(standin, small_run, small_tflite, tmp_path):
    """derm-bench --device end to end, on the STAND-IN device (no phone here): a row per delegate in bench.json/md."""
    import json

    from typer.testing import CliRunner

    from derm.benchmarks.bench import app

    fake, binary, _ = standin
    _, run = small_run
    args = ["--run", str(run), "--targets", "", "--files", small_tflite, "--out", str(tmp_path), "--runs", "3"]
    args += ["--n-boot", "20", "--device", "auto", "--adb", fake, "--benchmark-model", str(binary)]
    res = CliRunner().invoke(app, [*args, "--delegates", "cpu,nnapi", "--device-threads", "2"])
    assert res.exit_code == 0, res.output
    dev = json.loads((tmp_path / "bench.json").read_text())["device"]
    assert dev["serial"] == "STANDIN01" and dev["abi"] == "arm64-v8a" and dev["model"] == "Stand-in"
    assert [r["delegate"] for r in dev["rows"]] == ["cpu", "nnapi"] and all(r["avg_ms"] > 0 for r in dev["rows"])
    assert "On Stand-in (STANDIN01, arm64-v8a) via adb" in (tmp_path / "bench.md").read_text()
    # a delegate the tool does not know is refused up front, with the known ones, before anything is pushed
    res = CliRunner().invoke(app, [*args, "--delegates", "cpu,tpu"])
    assert res.exit_code == 2 and "--delegates 'cpu,tpu'" in res.output and "cpu, gpu, nnapi" in res.output
