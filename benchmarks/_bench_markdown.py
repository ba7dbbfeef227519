"""``derm-bench``'s table: one row per file (the Keras reference first), then the phone's rows when ``--device``."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# derm-bench: {report['run']} on {report['images']} labelled images ({report['source']})",
        "",
        "| file | MB | load s | first ms | mean / p50 / p90 / p99 ms | peak RSS MB | 3-way MPCA | 9-way MPCA "
        "| MvN AUC (95% CI) | carc-vs-SK AUC | top-1 agree (3 / 9) | AUC diff | parity |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_file_line(r) for r in report["rows"]]
    if "device" in report:
        lines += _device_lines(report["device"])
    return "\n".join(lines) + "\n"


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _auc(acc: dict[str, Any], name: str) -> str:
    """A task's AUC with its bootstrap interval, or "-" when it was not measured."""
    a = acc.get(name)
    return f"{a['auc']:.3f} ({a['auc_ci'][0]:.3f}-{a['auc_ci'][1]:.3f})" if a else "-"


def _latency(lat: dict[str, Any]) -> str:
    """Mean / p50 / p90 / p99 ms, or "-" when the file was not timed."""
    if "mean_ms" not in lat:
        return "-"
    return f"{lat['mean_ms']:.1f} / {lat['p50_ms']:.1f} / {lat['p90_ms']:.1f} / {lat['p99_ms']:.1f}"


def _file_line(r: dict[str, Any]) -> str:
    """One file's row of the main table."""
    acc = r.get("accuracy", {})
    lat = r.get("latency", {})
    par = {(p["output"], p["metric"]): p["value"] for p in r.get("parity", [])}
    top1 = " / ".join(
        f"{par[(f'probs_{lv}', 'top1')]:.3f}" for lv in ("three", "nine") if (f"probs_{lv}", "top1") in par
    )
    aucd = par.get(("task_melanoma_vs_nevus", "auc_diff"))
    status = (r.get("skipped", "") and "not run here") or ("yes" if r.get("ok", True) else "**NO**")
    three = acc.get("probs_three", {}).get("mean_per_class_accuracy")
    nine = acc.get("probs_nine", {}).get("mean_per_class_accuracy")
    return (
        f"| {Path(r['file']).name if 'target' in r else r['file']} | {_num(r.get('size_mb'), '.1f')} | "
        f"{_num(lat.get('load_s'), '.2f')} | {_num(lat.get('first_ms'), '.0f')} | {_latency(lat)} | "
        f"{_num(lat.get('peak_rss_mb'), '.0f')} | {_num(three, '.3f')} | {_num(nine, '.3f')} | "
        f"{_auc(acc, 'task_melanoma_vs_nevus')} | {_auc(acc, 'task_carcinoma_vs_seborrheic_keratosis')} | "
        f"{top1 or '-'} | {_num(aucd, '.4f')} | {status} |"
    )


def _device_lines(d: dict[str, Any]) -> list[str]:
    """The phone's table: one row per file and delegate."""
    lines = [
        "",
        f"On {d['model']} ({d['serial']}, {d['abi']}) via adb, TFLite benchmark_model:",
        "",
        "| file | delegate | threads | init ms | first ms | avg ms | peak MB | error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in d["rows"]:
        lines.append(
            f"| {Path(r['file']).name} | {r['delegate']} | {r['threads']} | {r.get('init_ms', '-')} | "
            f"{r.get('first_ms', '-')} | {r.get('avg_ms', '-')} | {r.get('peak_memory_mb', '-')} | "
            f"{r.get('error', '')} |"
        )
    return lines
