"""Train the reference model on all of ``../shared`` and choose the weight of the phone photos on validation.

    python -m derm.benchmarks.reference --runs runs/reference_weights [--weights 1,4,12] [--recipe committed|frozen]
        [--save [--replace-fine-tuned]]

Trains one run per weight of a PAD-UFES-20 photo (the feature and activation caches are shared, so every run after
the first costs only the training), measures each on the validation and test splits of every source, chooses the
weight on validation alone (rule below, fixed before any run was read), writes the results and, with ``--save``, the
committed ``reference/`` folder and its model card from the chosen run.

``--recipe committed`` (the default) trains the committed ``reference/config.json`` recipe (its fine-tuned top block,
views and learning rate) at each weight: ``benchmarks/results/reference_weights_committed.{json,md}``. ``--recipe
frozen`` trains the first reference's frozen head (``benchmarks/results/reference.{json,md}``); its ``--save`` is
refused while the committed reference fine-tunes backbone blocks, which a frozen head would replace, unless
``--replace-fine-tuned``. A run already in ``RUNS`` is reused when its configuration is the one this command would
train (apart from its paths), else refused.

Choice: the highest PAD-UFES-20 validation score (9-way mean per-class accuracy + carcinoma-vs-SK AUC) among the
weights whose validation 9-way mean per-class accuracy over all sources is within 0.02 of the unweighted run's.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from derm._cli import setup_logging
from derm.benchmarks._results import write_results

RESULTS = Path(__file__).resolve().parent / "results"
log = logging.getLogger("derm.benchmarks.reference")


def _score(val: dict[str, Any]) -> float:
    pad = val["pad_ufes20"]
    return pad["levels"]["nine"]["mpca"] + pad["tasks"]["carcinoma_vs_seborrheic_keratosis"]["auc"]


def choose(rows: list[dict[str, Any]], tolerance: float = 0.02) -> dict[str, Any]:
    base = next(r for r in rows if r["weight"] == 1.0)["val"]["all"]["levels"]["nine"]["mpca"]
    ok = [r for r in rows if r["val"]["all"]["levels"]["nine"]["mpca"] >= base - tolerance]
    return max(ok, key=lambda r: _score(r["val"]))


def _check_reused(run: Path, cfg: Any) -> None:
    """Refuse to reuse ``run`` unless it was trained with ``cfg`` apart from its data and output paths."""
    had = json.loads((run / "config.json").read_text(encoding="utf-8"))
    want = json.loads(json.dumps(cfg.to_dict()))
    paths = ("data", "out", "overwrite")
    diff = sorted(k for k in set(had) | set(want) if k not in paths and had.get(k) != want.get(k))
    if diff:
        raise SystemExit(
            f"{run} was trained with another configuration ({', '.join(f'{k}: {had.get(k)!r}' for k in diff)}; this "
            f"command trains {', '.join(f'{k}: {want.get(k)!r}' for k in diff)}). Give another --runs or remove it."
        )


def main(argv: list[str] | None = None) -> None:
    from derm.trainer.reference import (
        REFERENCE_DIR,
        committed_top_blocks,
        reference_config,
        reference_csv,
        shared_dir,
    )
    from derm.trainer.reference_build import save_reference
    from derm.trainer.reference_card import evaluate_sources, weighting_table, write_model_card
    from derm.trainer.train import train

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=Path("runs/reference_build"))
    ap.add_argument("--shared", type=Path, default=None)
    ap.add_argument("--weights", default="1,4,12", help="weights of a PAD-UFES-20 photo to compare")
    ap.add_argument(
        "--recipe",
        choices=("committed", "frozen"),
        default="committed",
        help="committed: reference/config.json's recipe at each weight; frozen: the first reference's frozen head",
    )
    ap.add_argument("--save", action="store_true", help="write reference/ and its model card from the chosen run")
    ap.add_argument(
        "--replace-fine-tuned",
        action="store_true",
        help="with --save: replace a committed reference that fine-tuned backbone blocks with a frozen head",
    )
    args = ap.parse_args(argv)
    tuned = committed_top_blocks(REFERENCE_DIR / "config.json")
    if args.save and tuned and args.recipe == "frozen" and not args.replace_fine_tuned:
        ap.error(
            f"--save: the committed reference fine-tunes its top {tuned} block(s) (reference/config.json unfreeze_top "
            f"{tuned}), and --recipe frozen trains frozen heads, so saving its choice would replace it with a weaker "
            "recipe. Compare with --recipe committed, or without --save, or pass --replace-fine-tuned."
        )
    setup_logging(logging.INFO, timestamps=True)
    data = reference_csv(args.shared or shared_dir(), args.runs / "data.csv")
    rows = []
    for w in (float(x) for x in args.weights.split(",")):
        out = args.runs / f"w{w:g}"
        t = time.perf_counter()
        weighting = {"source_weights": {"pad_ufes20": w} if w != 1.0 else None}
        cfg = reference_config(data, out, ref=REFERENCE_DIR if args.recipe == "committed" else None, **weighting)
        if (out / "run.json").is_file():
            _check_reused(out, cfg)
        else:
            train(cfg)
        metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
        rows.append(
            {
                "weight": w,
                "recipe": args.recipe,
                "run": str(out),
                "seconds": round(time.perf_counter() - t, 1),
                "timings": metrics.get("timings"),
                "val": evaluate_sources(out, "val"),
                "test": evaluate_sources(out, "test"),
            }
        )
    best = choose(rows)
    best["chosen"] = True
    res = {"rule": __doc__.split("Choice: ", 1)[1].strip(), "runs": rows, "chosen_weight": best["weight"]}
    res["recipe"] = args.recipe
    RESULTS.mkdir(exist_ok=True)
    name = "reference" if args.recipe == "frozen" else "reference_weights_committed"
    recipe = (
        "the first reference's frozen head"
        if args.recipe == "frozen"
        else f"the committed recipe (reference/config.json: top {tuned} block(s) fine-tuned, {cfg.views} views, "
        f"lr {cfg.lr:g})"
    )
    md = (
        f"# Reference model: weighting the phone photos\n\nRun `python -m derm.benchmarks.reference --runs {args.runs} "
        f"--weights {args.weights} --recipe {args.recipe}` on 2 CPU cores, {recipe}. Rule: {res['rule']}\n\n"
        f"{weighting_table(rows)}\n"
    )
    write_results(RESULTS, name, res, md)
    if args.save:
        save_reference(Path(best["run"]), REFERENCE_DIR)
        from derm.benchmarks.decisions import decisions

        write_model_card(Path(best["run"]), REFERENCE_DIR, rows, decisions(Path(best["run"])))
        print(f"reference/ written from {best['run']}")


if __name__ == "__main__":
    main()
