"""Every-layer fine-tuning on a lent GPU machine that has no TensorFlow and receives at most 64 MiB a call.

The GPU machines this project is sometimes lent (see docs/training.md, "On a lent GPU") hold PyTorch and JAX but
not TensorFlow, cannot reach the internet, and receive the repository plus at most 64 MiB of carried folders a
call, warm for only half a minute between calls. So the run goes in three steps:

1. ``pack`` (here): the datasets and the backbone weights of ``../shared`` are cut into parts that each fit one
   call beside the repository (a large file in chunks), with a plan of every file's sha256; the first part also
   holds the wheels the machine lacks (this project, Keras and its two missing dependencies, for Python 3.12).
2. ``run`` (there, through ``tools/gpu_finetune.sh``): the parts are checked and joined into a shared folder and a
   weights cache, ``derm-train --mode finetune`` trains one job under Keras' JAX backend (the input pipeline is then
   a ``PyDataset``, :mod:`derm.trainer.data`), and only what is needed comes back: the run directory without its
   model, and its weights (each large backbone tensor as its float16 change from the pretrained backbone, the rest
   float32) in chunks of at most 15 MiB.
3. ``unpack`` (here): the model is rebuilt under TensorFlow from those weights into an ordinary run directory
   (``derm-eval``, ``derm-export``, ``derm-bench`` take it unchanged); the validation and test images are predicted
   again here and compared with the machine's predictions, so the transport and the change of backend are measured,
   not assumed.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import hashlib
import io
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from derm._util import sha256_file
from derm.errors import DermError

log = logging.getLogger(__name__)

MiB = 1024 * 1024
PLAN = "plan.json"
CARRY_LIMIT = 64 * MiB  # what one device call carries: the repository's tree plus the carried folders
RETURN_CHUNK = 15 * MiB  # files back from the machine: at most 16 MiB each, 8 files, 64 MiB in all
DATASETS = ("ham10000", "isic2017_trainval", "pad_ufes20")
WEIGHTS_FILE = "inception_v3_2015_notop.weights.h5"
SIDECAR = "inception_v3_2015_notop.json"
#: What the machine lacks for a Keras 3 run on JAX (it has numpy, h5py, ml-dtypes, rich, absl-py, pillow, pyyaml,
#: typer, packaging): pinned to this environment's versions so the weights format matches.
WHEELS = ("keras", "namex", "optree")
JOBS = ("ham-fold", "isic2017", "reference")
FLOAT16_MIN_SIZE = 4096  # backbone tensors this large travel as float16 changes; BatchNorm, biases, head float32


class DeviceError(DermError, RuntimeError):
    """A GPU run cannot be packed, run or unpacked as asked."""


# --------------------------------------------------------------------------------------------------- pack (here)
def tree_bytes(repo: Path) -> int:
    """Bytes of what every device call sends anyway: tracked files and untracked files git does not ignore."""
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo,
        check=True,
        capture_output=True,
    ).stdout
    return sum((repo / p).stat().st_size for p in out.decode().split("\0") if p and (repo / p).is_file())


def _files(shared: Path, datasets: Sequence[str]) -> list[tuple[str, Path]]:
    """``(path in the joined folder, source)`` of every file to carry: the datasets, then the backbone weights."""
    files: list[tuple[str, Path]] = []
    for name in datasets:
        base = shared / "data" / name
        if not (base / "labels.csv").is_file():
            raise DeviceError(
                f"{str(base / 'labels.csv')!r} is missing: --data names datasets of {str(shared)!r}/data "
                f"({', '.join(DATASETS)})."
            )
        files += [(f"data/{name}/{p.relative_to(base).as_posix()}", p) for p in sorted(base.rglob("*")) if p.is_file()]
    weights = shared / "weights" / WEIGHTS_FILE
    if not weights.is_file():
        raise DeviceError(f"No backbone weights at {str(weights)!r}; the run fine-tunes them (see weights/WEIGHTS.md).")
    return [*files, (f"cache/{WEIGHTS_FILE}", weights)]


def _wheels(dest: Path, repo: Path, python: str = "3.12") -> list[str]:
    """This project's wheel (built from the working tree) and :data:`WHEELS` for CPython ``python`` on x86-64 Linux
    (3.12: the GPU machines' interpreter)."""
    from importlib.metadata import version

    dest.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*py, "wheel", "--no-deps", "-w", str(dest), str(repo)], check=True)
    platforms = [f"--platform=manylinux_2_{n}_x86_64" for n in (28, 27, 17)] + ["--platform=manylinux2014_x86_64"]
    reqs = [f"{name}=={version(name)}" for name in WHEELS]
    target = ["--only-binary=:all:", f"--python-version={python}", "--implementation=cp", *platforms]
    subprocess.run([*py, "download", "--no-deps", *target, "-d", str(dest), *reqs], check=True)
    return sorted(p.name for p in dest.glob("*.whl"))


def _sidecar(entry: dict[str, Any]) -> dict[str, Any]:
    """The weights cache's sidecar for the carried file (so that ``weights: inception-2015`` finds it there): this
    machine's own when it records the same sha256, else one naming the file's origin."""
    from derm.trainer.weights_cache import cache_dir

    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        mine = json.loads((cache_dir() / SIDECAR).read_text(encoding="utf-8"))
        if mine["weights"]["sha256"] == entry["sha256"]:
            return mine
    return {
        "source": "inception-2015",
        "variant": "inception-2015",
        "description": "carried from the shared folder's weights/ (its WEIGHTS.md says how it was converted)",
        "weights": {"file": WEIGHTS_FILE, "sha256": entry["sha256"], "size": entry["size"]},
    }


def pack(
    shared: Path,
    out: Path,
    datasets: Sequence[str] = DATASETS,
    repo: Path | None = None,
    part_bytes: int | None = None,
    wheels: bool = True,
    python: str = "3.12",
) -> dict[str, Any]:
    """Cut ``datasets`` and the backbone weights of ``shared`` into ``out/p1``, ``out/p2``... (each carried by one
    device call beside the repository) and write ``out/p1/plan.json``; returns the plan."""
    repo = Path(repo) if repo is not None else Path(__file__).resolve().parents[1]
    if part_bytes is None:
        part_bytes = CARRY_LIMIT - tree_bytes(repo) - 2 * MiB  # 2 MiB of room for the plan and rounding
    if part_bytes < 8 * MiB:
        raise DeviceError(
            f"Only {part_bytes / MiB:.1f} MiB of a device call are left for data beside the repository; make the "
            "repository lighter (untracked files travel too) or pass a larger --part-mib."
        )
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "p1").mkdir(parents=True)
    wheel_names = _wheels(tmp / "p1" / "whl", repo, python) if wheels else []
    used = sum(p.stat().st_size for p in (tmp / "p1").rglob("*") if p.is_file())
    files = _files(shared, datasets)
    table: dict[str, dict[str, Any]] = {}
    parts = [used]
    for dest, src in files:
        size = src.stat().st_size
        table[dest] = {"size": size, "sha256": sha256_file(src), "chunks": []}
        with open(src, "rb") as f:
            offset = 0
            while offset < size or not table[dest]["chunks"]:
                room = part_bytes - parts[-1]
                if size - offset > room and (room < MiB or size < MiB):  # small files are never cut
                    parts.append(0)
                    room = part_bytes
                piece = f.read(min(room, size - offset))
                name = dest if len(piece) == size else f"{dest}.{len(table[dest]['chunks']):03d}"
                target = tmp / f"p{len(parts)}" / "files" / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(piece)
                table[dest]["chunks"].append(f"p{len(parts)}/files/{name}")
                parts[-1] += len(piece)
                offset += len(piece)
    plan = {
        "format": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "datasets": list(datasets),
        "parts": [{"name": f"p{k + 1}", "bytes": b} for k, b in enumerate(parts)],
        "part_limit_bytes": part_bytes,
        "wheels": wheel_names,
        "weights_sidecar": _sidecar(table[f"cache/{WEIGHTS_FILE}"]),
        "files": table,
    }
    (tmp / "p1" / PLAN).write_text(json.dumps(plan, indent=1), encoding="utf-8")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    log.info("Packed %d files into %d parts of at most %.1f MiB in %s.", len(table), len(parts), part_bytes / MiB, out)
    return plan


# ------------------------------------------------------------------------------------------------ run (there)
def join(parts: Path, dest: Path) -> tuple[Path, Path, dict[str, Any]]:
    """Check every carried file against the plan and join the parts into ``dest/shared`` and ``dest/cache``."""
    plan_path = parts / "p1" / PLAN
    if not plan_path.is_file():
        raise DeviceError(f"No {PLAN} at {str(plan_path)!r}: carry the first part made by `pack`.")
    plan = json.loads(plan_path.read_text(encoding="utf-8"))
    missing = [p["name"] for p in plan["parts"] if not (parts / p["name"]).is_dir()]
    if missing:
        raise DeviceError(f"Parts {missing} did not arrive: carry each in its own call while the machine is warm.")
    shared, cache = dest / "shared", dest / "cache"
    for rel, info in plan["files"].items():
        target = cache / rel.removeprefix("cache/") if rel.startswith("cache/") else shared / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        # Copies, not links: the datasets resolve image paths, which must name the joined folder, not a part.
        with open(target, "wb") as f:
            for c in info["chunks"]:
                f.write((parts / c).read_bytes())
        if target.stat().st_size != info["size"] or sha256_file(target) != info["sha256"]:
            raise DeviceError(f"{rel} arrived changed (size or sha256 differs from the plan); pack and carry it again.")
    (cache / SIDECAR).write_text(json.dumps(plan["weights_sidecar"], indent=1), encoding="utf-8")
    return shared, cache, plan


def job_config(job: str, shared: Path, out: Path, fold: int = 0, **overrides: Any) -> Any:
    """The training configuration of ``job``, in every-layer mode, else as the CPU benchmarks train it: the HAM10000
    benchmark's fold ``fold`` (5 lesion-grouped folds, within nine, maxClassSize 100) and ISIC 2017 train ->
    validation (within its labels) as ``derm.benchmarks.trainer``, or the reference model (its committed
    configuration, every layer instead of the top block)."""
    from derm.trainer.config import TrainConfig

    common = {"mode": "finetune", "pool_layers": ["mixed7", "mixed8", "mixed9", "mixed10"], "unfreeze_top": 0}
    if job == "ham-fold":
        cfg = TrainConfig(
            data=str(shared / "data/ham10000/labels.csv"),
            out=str(out),
            within="nine",
            max_class_size=100,
            folds=5,
            fold=fold,
            **common,
        )
    elif job == "isic2017":
        cfg = TrainConfig(
            data=str(shared / "data/isic2017_trainval/labels.csv"),
            out=str(out),
            within="labels",
            holdout="split=val",
            **common,
        )
    elif job == "reference":
        from derm.trainer.reference import reference_config, reference_csv

        data = reference_csv(shared, out.with_name(out.name + ".data.csv"))
        cfg = reference_config(data, out, **common)
    else:
        raise DeviceError(f"Unknown job {job!r}; one of {', '.join(JOBS)}.")
    cfg = dataclasses.replace(cfg, **overrides)
    cfg.check()
    return cfg


def _starting_point(cfg: dict[str, Any], n_classes: int) -> tuple[Any, list[np.ndarray]]:
    """A freshly built model of the run's configuration and the backbone's starting weights (every tensor but the
    ``logits`` layer's, in the model's order)."""
    from derm.trainer.model import build_model

    model = build_model(n_classes, cfg["input_size"], cfg["weights"], cfg["pool_layers"], cfg["dropout"])
    k = len(model.weights) - len(model.get_layer("logits").weights)
    return model, model.get_weights()[:k]


def weights_payload(model: Any, start: Sequence[np.ndarray]) -> bytes:
    """The trained weights as one ``.npz``: each large backbone tensor as its float16 change from ``start`` (the
    backbone it began from, which both ends hold), the small ones and the head whole in float32."""
    arrays = {}
    for i, w in enumerate(model.get_weights()):
        if i < len(start) and w.size >= FLOAT16_MIN_SIZE:
            arrays[f"d{i:04d}"] = (w.astype(np.float32) - start[i]).astype(np.float16)
        else:
            arrays[f"w{i:04d}"] = w.astype(np.float32)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def apply_payload(payload: bytes, start: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The weights :func:`weights_payload` carried, rebuilt on ``start``."""
    arrays = np.load(io.BytesIO(payload))
    n = len(arrays.files)
    out = []
    for i in range(n):
        if f"d{i:04d}" in arrays.files:
            out.append(start[i] + arrays[f"d{i:04d}"].astype(np.float32))
        else:
            out.append(arrays[f"w{i:04d}"])
    return out


def run(job: str, parts: Path, out: Path, work: Path, fold: int = 0, overrides: dict[str, Any] | None = None) -> Path:
    """Join the parts, train ``job`` under the current Keras backend, write what comes back into ``out``."""
    import keras

    t0 = time.perf_counter()
    shared, cache, plan = join(parts, work)
    os.environ["DERM_CACHE"] = str(cache)
    os.environ["DERM_SHARED"] = str(shared)
    from derm.trainer.model import load_model
    from derm.trainer.train import train

    # One folder a job: a call cut off by its time limit resumes from its last epoch when run again (BackupAndRestore),
    # a finished one is replaced.
    name = f"{job}{fold}" if job == "ham-fold" else job
    cfg = job_config(job, shared, work / name, fold=fold, **{"overwrite": True, **(overrides or {})})
    t_join = time.perf_counter() - t0
    log.info(
        "Joined %d files in %.0f s; training %s under Keras %s on %s.",
        len(plan["files"]),
        t_join,
        job,
        keras.__version__,
        keras.backend.backend(),
    )
    run_dir = train(cfg)
    model = load_model(run_dir / "model.keras")
    _, start = _starting_point(dataclasses.asdict(cfg), model.output_shape[-1])
    out.mkdir(parents=True, exist_ok=True)
    payload = weights_payload(model, start)
    chunks = [payload[i : i + RETURN_CHUNK] for i in range(0, len(payload), RETURN_CHUNK)]
    for k, c in enumerate(chunks):
        (out / f"weights.npz.{k}").write_bytes(c)
    info = {
        "job": job,
        "fold": fold if job == "ham-fold" else None,
        "overrides": overrides or {},
        "backend": keras.backend.backend(),
        "keras": keras.__version__,
        "python": platform.python_version(),
        "devices": _devices(),
        "shared": str(shared),
        "join_s": round(t_join, 1),
        "total_s": round(time.perf_counter() - t0, 1),
        "weights_sha256": hashlib.sha256(payload).hexdigest(),
        "weights_chunks": len(chunks),
        "n_weights": len(model.get_weights()),
    }
    (run_dir / "device.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
    with tarfile.open(out / "run.tar.gz", "w:gz") as tar:
        for p in sorted(run_dir.iterdir()):
            if p.name != "model.keras":
                tar.add(p, arcname=p.name)
    log.info("Done in %.0f s: %s", info["total_s"], sorted(x.name for x in out.iterdir()))
    return out


def _devices() -> list[str]:
    try:
        import jax

        return [str(d) for d in jax.devices()]
    except Exception:  # another backend, or no jax: the record says so
        return []


# ----------------------------------------------------------------------------------------------- unpack (here)
def unpack(back: Path, out: Path, shared: Path | None = None) -> dict[str, Any]:
    """Rebuild the machine's run in ``out`` from ``run.tar.gz`` and the weight chunks in ``back``: an ordinary run
    directory (``model.keras`` rebuilt here, the machine's image paths moved to ``shared``, this machine's copy of the
    data, ``run.json`` listing the files anew). Its held-out images are predicted again here; the largest difference
    from the machine's predictions goes to ``out/unpack.json``."""
    from derm.trainer.reference import shared_dir
    from derm.trainer.rundir import file_hashes, write_json

    shared = Path(shared) if shared is not None else shared_dir()
    chunks = sorted(back.glob("weights.npz.*"), key=lambda p: int(p.suffix[1:]))
    if not (back / "run.tar.gz").is_file() or not chunks:
        raise DeviceError(f"{str(back)!r} lacks run.tar.gz or weights.npz.N: give the folder the device call returned.")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with tarfile.open(back / "run.tar.gz") as tar:
        tar.extractall(tmp, filter="data")
    device = json.loads((tmp / "device.json").read_text(encoding="utf-8"))
    payload = b"".join(c.read_bytes() for c in chunks)
    if hashlib.sha256(payload).hexdigest() != device["weights_sha256"]:
        raise DeviceError(f"The weight chunks in {str(back)!r} do not add up to what the machine wrote (sha256).")
    there_prefix, here_prefix = device["shared"].rstrip("/") + "/", str(shared.resolve()).rstrip("/") + "/"
    for p in sorted(tmp.iterdir()):
        if p.suffix in (".csv", ".json") and p.name not in ("run.json", "device.json"):
            p.write_text(p.read_text(encoding="utf-8").replace(there_prefix, here_prefix), encoding="utf-8")
    cfg = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
    n_cls = len(json.loads((tmp / "partition.json").read_text(encoding="utf-8"))["classes"])
    model, start = _starting_point(cfg, n_cls)
    model.set_weights(apply_payload(payload, start))
    model.save(tmp / "model.keras")
    report: dict[str, Any] = {"device": device, "shared_here": here_prefix, "roles": {}}
    for role in ("val", "test"):
        pred = tmp / f"predictions_{role}.csv"
        if not pred.is_file():
            continue
        with open(pred, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        classes = [c for c in rows[0] if c not in ("image", "label", "node", "role")]
        there = np.asarray([[float(r[c]) for c in classes] for r in rows], dtype=np.float64)
        here = _predict_paths(model, [r["image"] for r in rows], cfg["input_size"])
        report["roles"][role] = {
            "n": len(rows),
            "max_abs_diff": float(np.abs(here - there).max()),
            "mean_abs_diff": float(np.abs(here - there).mean()),
            "argmax_agreement": float((here.argmax(1) == there.argmax(1)).mean()),
        }
    write_json(tmp / "unpack.json", report)
    run = json.loads((tmp / "run.json").read_text(encoding="utf-8"))
    run["files"] = file_hashes(tmp)
    write_json(tmp / "run.json", run)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return report


def _predict_paths(model: Any, paths: list[str], size: int) -> np.ndarray:
    from derm.trainer.data import image_dataset

    return np.asarray(model.predict(image_dataset(paths, size, batch_size=32), verbose=0), dtype=np.float64)


# --------------------------------------------------------------------------------------------------------- CLI
def _overrides(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise DeviceError(f"--set takes KEY=VALUE (a derm-train config key), received {item!r}.")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m derm.trainer.device", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="cut ../shared into parts for device calls")
    p.add_argument("--shared", type=Path, default=None, help="the shared folder [$DERM_SHARED or ../shared]")
    p.add_argument("--out", type=Path, default=Path(".device"))
    p.add_argument("--data", default="ham10000", help=f"comma-separated datasets among {', '.join(DATASETS)}")
    p.add_argument("--part-mib", type=float, default=None, help="bytes a part may hold [64 MiB less the repo]")
    p.add_argument("--no-wheels", action="store_true", help="leave out the wheels (a machine that has Keras)")
    p.add_argument("--python", default="3.12", help="the machine's Python, for the wheels [3.12]")
    r = sub.add_parser("run", help="(on the GPU machine) join the parts, train, write what comes back")
    r.add_argument("job", choices=JOBS)
    r.add_argument("--fold", type=int, default=0)
    r.add_argument("--parts", type=Path, default=Path(".device"))
    r.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "device-out")))
    r.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "derm-device")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    u = sub.add_parser("unpack", help="rebuild the run here from what the call returned")
    u.add_argument("back", type=Path)
    u.add_argument("--out", type=Path, required=True)
    u.add_argument("--shared", type=Path, default=None, help="this machine's shared folder [$DERM_SHARED or ../shared]")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        if args.cmd == "pack":
            from derm.trainer.reference import shared_dir

            plan = pack(
                args.shared or shared_dir(),
                args.out,
                args.data.split(","),
                part_bytes=int(args.part_mib * MiB) if args.part_mib else None,
                wheels=not args.no_wheels,
                python=args.python,
            )
            names = [p["name"] for p in plan["parts"]]
            print(json.dumps({"parts": plan["parts"], "carry_one_per_call": [f"{args.out}/{n}" for n in names]}))
        elif args.cmd == "run":
            run(args.job, args.parts, args.out, args.work, args.fold, _overrides(args.set))
        else:
            print(json.dumps(unpack(args.back, args.out, args.shared)["roles"], indent=1))
    except DermError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
