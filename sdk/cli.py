"""``derm``: the SDK's command line. Thin: each command builds arguments and calls the library."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from derm._cli import cli_app, fail, setup_logging
from derm._cli import user_errors as _user_errors
from derm._version import __version__
from derm.cli_data import data_app, taxonomy_app

app = cli_app(
    "derm",
    "Skin-lesion classification toolchain (after Esteva et al. 2017). A research and triage aid, "
    "not a diagnostic device.",
)
app.add_typer(taxonomy_app, name="taxonomy")
app.add_typer(data_app, name="data")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"derm {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More logging (-v info, -vv debug).")] = 0,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    setup_logging(verbose=verbose)


# -------------------------------------------------------------------------------------------- classify / triage
ModelOpt = Annotated[
    Path, typer.Option("--model", "-m", help="A file written by derm-export (.tflite/.onnx/.mlpackage).")
]
OpOpt = Annotated[
    str, typer.Option("--operating-point", help="Target sensitivity of the manifest's thresholds (0.8, 0.9, 0.95).")
]
ThresholdOpt = Annotated[
    float | None, typer.Option("--threshold", help="Your own threshold on the task probabilities instead.")
]
ThreadsOpt = Annotated[int | None, typer.Option("--threads", help="Inference threads (default: the runtime's).")]
TtaOpt = Annotated[
    int, typer.Option("--tta", help="Average over 1, 2, 4 or 8 test-time views (flips, quarter turns); N times slower.")
]


@app.command("classify")
def classify(
    image: Annotated[Path, typer.Argument(help="An image file.")],
    model: ModelOpt,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
    operating_point: OpOpt = "0.9",
    threshold: ThresholdOpt = None,
    threads: ThreadsOpt = None,
    tta: TtaOpt = 1,
) -> None:
    """Classify one image: inference-class probabilities, malignancy probabilities, the calls. Not a diagnosis."""
    with _user_errors():
        from derm.classifier import Classifier

        clf = Classifier.load(model, threads=threads, operating_point=operating_point, threshold=threshold, tta=tta)
        pred = clf.predict(image)
    if as_json:
        typer.echo(json.dumps(pred.to_dict(), indent=1))
        return
    typer.echo(clf.disclaimer)
    if "not verified" in clf.verified:
        typer.secho(f"Note: {clf.verified}; the result below cannot be checked against the exported model.", err=True)
    for note in clf.notes:
        typer.secho(f"Warning: {note}.", err=True, fg=typer.colors.YELLOW)
    typer.echo(f"{image}")
    for level, probs in pred.levels.items():
        ranked = sorted(probs.items(), key=lambda kv: -kv[1])[:3]
        typer.echo(f"  {level:<6} " + ", ".join(f"{k} {v:.3f}" for k, v in ranked))
    for task, d in pred.decisions.items():
        # a conditional task whose condition does not hold says "not applicable", with the condition's probability
        typer.echo("  " + clf.explain(task, d.probability, pred.conditions.get(task), applies=d.applies))
    typer.echo("  top classes: " + ", ".join(f"{k} {v:.3f}" for k, v in pred.top_classes))


@app.command("golden")
def golden(
    images: Annotated[list[Path], typer.Argument(help="Real image files (their names name the golden files).")],
    model: ModelOpt,
    out: Annotated[
        Path | None, typer.Option("--out", help="Folder to write; default 'golden' beside the model.")
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists.")] = False,
) -> None:
    """Write golden vectors beside an exported file: the images, their decoded pixels, the exact input tensors the
    SDK makes, the file's raw outputs and the SDK's predictions. Android, iOS and web tests reproduce them."""
    with _user_errors():
        from derm.golden import write_golden

        folder = write_golden(model, images, out, overwrite=overwrite)
    typer.echo(f"Golden vectors of {len(images)} images: {folder}")


@app.command("web")
def web(
    model: ModelOpt,
    port: Annotated[int, typer.Option(help="Port on --host (0: any free port).")] = 8000,
    host: Annotated[str, typer.Option(help="Address to listen on; 127.0.0.1 keeps it on this machine.")] = "127.0.0.1",
    out: Annotated[Path | None, typer.Option("--out", help="Write a static site folder instead of serving.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace --out if it exists.")] = False,
    app_dir: Annotated[Path | None, typer.Option("--app", help="The web app folder; default: the repo's web/.")] = None,
) -> None:
    """The browser app (MediaPipe Tasks, offline, nothing leaves the page) with MODEL: serve it on localhost, or
    write it as a static site with --out."""
    with _user_errors():
        from derm.web import make_server, write_site

        if out is not None:
            typer.echo(f"Wrote the web app with {model.name}: {write_site(model, out, app_dir, overwrite)}")
            return
        server = make_server(model, host, port, app_dir)
    typer.echo(f"derm web: http://{host}:{server.server_address[1]}/ (Ctrl-C stops it)", err=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


@app.command("triage")
def triage_command(
    folder: Annotated[Path, typer.Argument(help="Folder of images (searched recursively).")],
    model: ModelOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: results.csv, report.html.")],
    operating_point: OpOpt = "0.9",
    threshold: ThresholdOpt = None,
    threads: ThreadsOpt = None,
    tta: TtaOpt = 1,
    workers: Annotated[int, typer.Option(help="Decoding threads running ahead of inference.")] = 2,
) -> None:
    """Classify every image under FOLDER; write a CSV and an HTML report ordered by risk. Resumes when re-run."""
    with _user_errors():
        from derm.classifier import Classifier
        from derm.triage import TriageInterrupted, triage

        clf = Classifier.load(model, threads=threads, operating_point=operating_point, threshold=threshold, tta=tta)
        try:
            summary = triage(folder, clf, out, workers=workers)
        except TriageInterrupted as exc:
            typer.secho(str(exc), err=True, fg=typer.colors.YELLOW)
            raise typer.Exit(code=130) from None
    ignored = sum((summary.ignored or {}).values())
    typer.echo(
        f"{summary.images} images: {summary.classified} classified, {summary.unreadable} unreadable"
        f"{f', {summary.resumed} from the previous run' if summary.resumed else ''}"
        f"{f'; {ignored} other files ignored (not image suffixes)' if ignored else ''}; wrote {summary.csv} and "
        f"{summary.report}"
    )
    if summary.unreadable:
        typer.secho(
            f"{summary.unreadable} file(s) could not be read: listed in the report and the CSV (status unreadable). "
            "Exit status 3.",
            err=True,
            fg=typer.colors.YELLOW,
        )
        raise typer.Exit(code=3)


# ------------------------------------------------------------------------------------ the heavy tools, lazily
#: ``derm NAME ARGS`` runs the other tools' commands: (module, Typer app attribute, leading args, alias, what).
#: Their modules import TensorFlow, so they are imported only when one of them runs (``derm --help`` stays light).
DELEGATES: dict[str, tuple[str, str, tuple[str, ...], str, str]] = {
    "train": ("derm.trainer.cli", "app", ("train",), "derm-train train", "Train a model on a labelled CSV."),
    "cv": ("derm.trainer.cli", "app", ("cv",), "derm-train cv", "k-fold cross-validation (group-aware folds)."),
    "weights": ("derm.trainer.cli", "app", ("weights",), "derm-train weights", "Fetch and verify backbone weights."),
    "reference": (
        "derm.trainer.cli",
        "app",
        ("reference",),
        "derm-train reference",
        "Rebuild or retrain the reference model.",
    ),
    "eval": ("derm.trainer.evaluate", "app", (), "derm-eval", "Evaluate a run: metrics, plots, HTML report."),
    "export": ("derm.exporter.cli", "app", (), "derm-export", "Export a run to TFLite / ONNX / Core ML."),
    "bench": ("derm.benchmarks.bench", "app", (), "derm-bench", "Latency, memory and parity of exported files."),
}


def _delegate(name: str, args: list[str]) -> None:
    import importlib

    module, attr, lead, _, _ = DELEGATES[name]
    try:
        target = getattr(importlib.import_module(module), attr)
    except ImportError as exc:
        fail(
            f"`derm {name}` needs the {'export' if 'exporter' in module else 'train'} extra ({exc}); "
            f"pip install 'derm-toolchain[train,export]'."
        )
    command = typer.main.get_command(target)
    command.main(args=[*lead, *args], prog_name=f"derm {name}" if not lead else "derm", standalone_mode=True)


def _add_delegate(name: str) -> None:
    alias, what = DELEGATES[name][3], DELEGATES[name][4]

    @app.command(
        name,
        help=f"{what} The same as `{alias}`; `derm {name} --help` lists its options.",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
        add_help_option=False,
    )
    def _run(ctx: typer.Context) -> None:
        _delegate(name, list(ctx.args))


for _name in DELEGATES:
    _add_delegate(_name)


def main() -> None:
    from derm._cli import run_app

    run_app(app)


if __name__ == "__main__":
    main()
