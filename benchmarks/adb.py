"""Phone benchmarks through ``adb``: push a .tflite and TFLite's ``benchmark_model``, run it per delegate, parse it.

Errors say what to do: adb missing, no device, several devices and none chosen, a device not authorized, an ABI
with no binary. ``benchmark_model`` comes from a path the user gives, or the cache (``$DERM_CACHE/benchmark_model/
<abi>/benchmark_model``) filled by :func:`download_benchmark_model` from TensorFlow's nightly builds.
"""

from __future__ import annotations

import enum
import os
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from derm.errors import DermError

REMOTE_DIR = "/data/local/tmp/derm"
# TensorFlow's prebuilt benchmark_model per Android ABI (nightly; see tensorflow.org/lite/performance/measurement)
BENCHMARK_URLS = {
    "arm64-v8a": "https://storage.googleapis.com/tensorflow-nightly-public/prod/tensorflow/release/lite/tools/nightly/"
    "latest/android_aarch64_benchmark_model",
    "armeabi-v7a": "https://storage.googleapis.com/tensorflow-nightly-public/prod/tensorflow/release/lite/tools/nightly/"
    "latest/android_arm_benchmark_model",
}


class Delegate(enum.StrEnum):
    """Where ``benchmark_model`` runs the graph on the phone: the CPU (XNNPACK), the GPU delegate or NNAPI."""

    CPU = "cpu"
    GPU = "gpu"
    NNAPI = "nnapi"


DELEGATE_FLAGS = {
    Delegate.CPU: ["--use_xnnpack=true"],
    Delegate.GPU: ["--use_gpu=true"],
    Delegate.NNAPI: ["--use_nnapi=true"],
}


def parse_delegates(text: str) -> list[Delegate]:
    """``cpu,gpu``: the comma-separated delegates of the command line, each checked against :class:`Delegate`."""
    names = [d.strip() for d in text.split(",") if d.strip()]
    unknown = [d for d in names if d not in set(Delegate)]
    if unknown or not names:
        raise DeviceError(f"--delegates {text!r}: choose one or more of {', '.join(Delegate)}, comma-separated.")
    return [Delegate(d) for d in names]


class DeviceError(DermError, RuntimeError):
    """adb or the phone cannot do what was asked; the message says how to fix it."""


@dataclass(frozen=True)
class Device:
    adb: str
    serial: str

    def run(self, *args: str, timeout: float = 600) -> str:
        return _adb(self.adb, "-s", self.serial, *args, timeout=timeout)

    def shell(self, command: str, timeout: float = 600) -> str:
        return self.run("shell", command, timeout=timeout)

    @property
    def abi(self) -> str:
        return self.shell("getprop ro.product.cpu.abi").strip()

    @property
    def model(self) -> str:
        return self.shell("getprop ro.product.model").strip()


def find_adb(adb: str | None = None) -> str:
    path = adb or os.environ.get("ADB") or shutil.which("adb")
    if not path or not (Path(path).is_file() or shutil.which(path)):
        raise DeviceError(
            "adb not found: install Android's platform-tools (Debian: apt-get install adb) or pass --adb PATH."
        )
    return str(path)


def _adb(adb: str, *args: str, timeout: float = 600) -> str:
    try:
        proc = subprocess.run([adb, *args], capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise DeviceError(f"adb {' '.join(args)} did not finish within {timeout:.0f} s.") from exc
    if proc.returncode != 0:
        raise DeviceError(f"adb {' '.join(args)} failed (exit {proc.returncode}): {proc.stderr.strip() or proc.stdout}")
    return proc.stdout


def list_devices(adb: str) -> list[tuple[str, str]]:
    """``(serial, state)`` of every device adb sees (state: device, unauthorized, offline, ...)."""
    out = _adb(adb, "devices")
    rows = []
    for line in out.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 2 and not line.startswith("*"):
            rows.append((parts[0], parts[1]))
    return rows


def choose_device(adb: str, serial: str | None = None) -> Device:
    devices = list_devices(adb)
    if serial:
        match = [d for d in devices if d[0] == serial]
        if not match:
            raise DeviceError(f"No device {serial!r} attached; adb sees {[d[0] for d in devices] or 'none'}.")
    else:
        if not devices:
            raise DeviceError("No Android device attached: connect one with USB debugging on (adb devices is empty).")
        if len(devices) > 1:
            raise DeviceError(
                f"Several devices attached ({', '.join(d[0] for d in devices)}); choose one with --device."
            )
        match = devices
    serial, state = match[0]
    if state == "unauthorized":
        raise DeviceError(f"Device {serial} is unauthorized: accept the USB debugging prompt on the phone, then retry.")
    if state != "device":
        raise DeviceError(f"Device {serial} is {state}; reconnect it (adb reconnect) and retry.")
    return Device(adb, serial)


def cache_dir() -> Path:
    return Path(os.environ.get("DERM_CACHE", Path.home() / ".cache" / "derm")) / "benchmark_model"


def download_benchmark_model(abi: str, url: str | None = None, dest: Path | None = None) -> Path:
    """Fetch ``benchmark_model`` for ``abi`` into the cache (written to a temporary file, then renamed)."""
    url = url or BENCHMARK_URLS.get(abi)
    if url is None:
        raise DeviceError(
            f"No prebuilt benchmark_model for ABI {abi!r} (known: {', '.join(BENCHMARK_URLS)}); build it from "
            "tensorflow/lite/tools/benchmark and pass --benchmark-model PATH."
        )
    dest = dest or cache_dir() / abi / "benchmark_model"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(".partial")
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, open(tmp, "wb") as f:
            shutil.copyfileobj(resp, f)
        os.replace(tmp, dest)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise DeviceError(
            f"Cannot download benchmark_model for {abi} from {url}: {exc}. Pass --benchmark-model."
        ) from exc
    dest.chmod(0o755)
    return dest


def benchmark_binary(abi: str, given: str | None = None, download: bool = True) -> Path:
    if given:
        if not Path(given).is_file():
            raise DeviceError(f"--benchmark-model {given!r} does not exist.")
        return Path(given)
    cached = cache_dir() / abi / "benchmark_model"
    if cached.is_file():
        return cached
    if not download:
        raise DeviceError(f"No benchmark_model for ABI {abi!r} in {cached.parent}; pass --benchmark-model PATH.")
    return download_benchmark_model(abi)


_TIMINGS = re.compile(
    r"Inference timings in us: Init: (?P<init>[\d.]+), First inference: (?P<first>[\d.]+), "
    r"Warmup \(avg\): (?P<warmup>[\d.e+]+), Inference \(avg\): (?P<avg>[\d.e+]+)"
)
_MEMORY = re.compile(r"Peak memory footprint \(MB\): init=(?P<init>[\d.]+) overall=(?P<overall>[\d.]+)")
_STDDEV = re.compile(r"count=(?P<count>\d+) .*?avg=(?P<avg>[\d.e+]+) std=(?P<std>[\d.e+]+)")


def parse_benchmark_output(text: str) -> dict[str, Any]:
    """The numbers of a ``benchmark_model`` run (times in ms, memory in MB)."""
    m = _TIMINGS.search(text)
    if m is None:
        tail = "\n".join(text.strip().splitlines()[-8:])
        raise DeviceError(f"benchmark_model printed no timings (did it fail?):\n{tail}")
    out: dict[str, Any] = {
        "init_ms": float(m["init"]) / 1e3,
        "first_ms": float(m["first"]) / 1e3,
        "warmup_avg_ms": float(m["warmup"]) / 1e3,
        "avg_ms": float(m["avg"]) / 1e3,
    }
    runs = [r for r in _STDDEV.finditer(text)]
    if runs:
        out["runs"] = int(runs[-1]["count"])
        out["std_ms"] = float(runs[-1]["std"]) / 1e3
    mem = _MEMORY.search(text)
    if mem:
        out["peak_memory_mb"] = float(mem["overall"])
    return out


def run_on_device(
    device: Device,
    model: str | os.PathLike[str],
    binary: str | os.PathLike[str],
    delegates: Sequence[Delegate | str] = (Delegate.CPU,),
    threads: int = 4,
    runs: int = 50,
) -> list[dict[str, Any]]:
    """Push the model and the binary, run ``benchmark_model`` once per delegate; one row per delegate (a delegate the
    phone lacks gives a row with its error instead of numbers)."""
    unknown = [d for d in delegates if d not in DELEGATE_FLAGS]
    if unknown:
        raise DeviceError(f"Unknown delegate(s) {unknown}; choose from {', '.join(Delegate)}.")
    device.shell(f"mkdir -p {REMOTE_DIR}")
    remote_model = f"{REMOTE_DIR}/{Path(model).name}"
    remote_bin = f"{REMOTE_DIR}/benchmark_model"
    device.run("push", str(model), remote_model)
    device.run("push", str(binary), remote_bin)
    device.shell(f"chmod 755 {remote_bin}")
    rows = []
    for delegate in delegates:
        flags = " ".join(
            [
                f"--graph={remote_model}",
                f"--num_threads={threads}",
                f"--num_runs={runs}",
                "--report_peak_memory_footprint=true",
                *DELEGATE_FLAGS[delegate],
            ]
        )
        row: dict[str, Any] = {"delegate": delegate, "threads": threads}
        try:
            row.update(parse_benchmark_output(device.shell(f"{remote_bin} {flags}")))
        except DeviceError as exc:
            row["error"] = str(exc)
        rows.append(row)
    return rows
