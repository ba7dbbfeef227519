"""``derm-export``: a trained run directory in; a TFLite, ONNX or Core ML file out, with the aggregation baked in,
quantized, self-describing and checked against the Keras model. Exit status 2 on a bad argument or a failed
parity check (nothing is written then)."""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from derm._cli import cli_app, setup_logging, user_errors
from derm._util import atomic_write
from derm.errors import DermError
from derm.exporter.config import ExportConfig, ExportResult
from derm.exporter.rounding import METHODS as ROUNDING_METHODS
from derm.exporter.targets import TARGETS

app = cli_app(
    "derm-export",
    "Export a trained skin-lesion classifier for phones and desktops. A research aid, not a diagnostic device.",
)

TargetName = enum.StrEnum("TargetName", {name.upper(): name for name in TARGETS})
WeightRounding = enum.StrEnum("WeightRounding", {name.upper(): name for name in ROUNDING_METHODS})
# every default below is ExportConfig's: one source for the command, the Python API and the help
_D = {f.name: f.default for f in dataclasses.fields(ExportConfig) if f.default is not dataclasses.MISSING}

_QUANT_HELP = "; ".join(
    f"{t.name}: {', '.join(t.quantizations)} (default {t.default_quantize})" for t in TARGETS.values()
)


@app.command()
def export_command(
    run: Annotated[Path, typer.Argument(help="A derm-train run directory (the --out of derm-train train).")],
    target: Annotated[TargetName, typer.Option(help="The runtime the file is for.")] = TargetName(_D["target"]),
    quantize: Annotated[Optional[str], typer.Option(help=_QUANT_HELP, show_default=False)] = None,  # noqa: UP045
    out: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Output file (Core ML: .mlpackage directory). Default RUN/export/model-<quantize><suffix>."),
    ] = None,
    levels: Annotated[str, typer.Option(help="Comma-separated inference levels baked in as outputs.")] = ",".join(
        _D["levels"]
    ),
    calibration: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="CSV with an image column: real images for int8 ranges. Default: the run's training images."),
    ] = None,
    calibration_size: Annotated[int, typer.Option(help="Calibration images drawn (seeded).")] = _D["calibration_size"],
    validation: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Labelled CSV the file is compared on. Default: the run's held-out images."),
    ] = None,
    validation_size: Annotated[int, typer.Option(help="Validation images drawn (seeded).")] = _D["validation_size"],
    image_column: Annotated[str, typer.Option(help="Image column of --calibration / --validation.")] = _D[
        "image_column"
    ],
    label_column: Annotated[str, typer.Option(help="Label column of --validation.")] = _D["label_column"],
    seed: Annotated[int, typer.Option(help="Seed for drawing images (and QAT).")] = _D["seed"],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
    force: Annotated[bool, typer.Option(help="Keep the file even when it fails the parity thresholds.")] = False,
    threads: Annotated[Optional[int], typer.Option(help="Runtime threads for validation.")] = None,  # noqa: UP045
    qat_epochs: Annotated[int, typer.Option(help="--quantize qat: epochs of quantization-aware fine-tuning.")] = _D[
        "qat_epochs"
    ],
    qat_steps: Annotated[
        Optional[int],  # noqa: UP045
        typer.Option(help="--quantize qat: steps per epoch (default all; 0 converts without fine-tuning)."),
    ] = None,
    weight_rounding: Annotated[
        WeightRounding,
        typer.Option(
            help="int8 weights: gptq (rounding that keeps each layer's output on real images) or nearest (the "
            "converters' own)."
        ),
    ] = WeightRounding(_D["weight_rounding"]),
    rounding_images: Annotated[
        int, typer.Option(help="Calibration images GPTQ measures layers on (equalization uses them all).")
    ] = _D["rounding_images"],
    equalize: Annotated[
        bool,
        typer.Option(
            help="Full-integer int8: exact rewrites for per-tensor int8 activations: the input scaling folded into the "
            "first convolution, ReLU channels rescaled (compensated in the next layers) so small channels use more of "
            "their tensor's int8 range."
        ),
    ] = _D["equalize"],
    equalize_alpha: Annotated[
        float, typer.Option(help="Equalization strength in (0, 1]: gain (tensor max / channel max) ** alpha.")
    ] = _D["equalize_alpha"],
    float_head: Annotated[
        bool, typer.Option(help="TFLite int8: keep the head (global pooling onward, <0.1% of the compute) in float32.")
    ] = _D["float_head"],
    report: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Also write the result (structure checks, parity table, timings, manifest) as JSON."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the output path.")] = False,
) -> None:
    """Convert RUN's model into one file an app can embed: uint8 RGB image in; training-class, inference-class and
    conditional task probabilities out, with labels, operating points and provenance inside the file."""
    setup_logging(logging.WARNING)
    cfg = ExportConfig(
        run=str(run),
        target=target.value,
        quantize=quantize,
        out=str(out) if out else None,
        levels=tuple(x.strip() for x in levels.split(",") if x.strip()),
        calibration=str(calibration) if calibration else None,
        calibration_size=calibration_size,
        validation=str(validation) if validation else None,
        validation_size=validation_size,
        image_column=image_column,
        label_column=label_column,
        seed=seed,
        overwrite=overwrite,
        force=force,
        threads=threads,
        qat_epochs=qat_epochs,
        qat_steps=qat_steps,
        weight_rounding=weight_rounding.value,
        rounding_images=rounding_images,
        equalize=equalize,
        equalize_alpha=equalize_alpha,
        float_head=float_head,
    )
    result = _run_export(cfg, report)
    _print_result(result, quiet)


def _run_export(cfg: ExportConfig, report: Path | None) -> ExportResult:
    """Export (the report path checked first), exit 2 on a derm error, write the report if asked."""
    from derm.exporter.export import export

    with user_errors(DermError):
        if report is not None:  # checked before minutes of conversion, not after
            _check_writable(report, "--report")
        result = export(cfg)
    if report:
        with atomic_write(report) as f:
            json.dump(result.to_dict(), f, indent=1)
    return result


def _print_result(result: ExportResult, quiet: bool) -> None:
    """The output path (only that with ``--quiet``), size, timings, structure checks and the parity table."""
    from derm.exporter.parity import format_parity

    if quiet:
        typer.echo(result.path)
        return
    typer.echo(f"{result.target} {result.quantize}: {result.path}")
    typer.echo(f"  {result.size_bytes / 1e6:.1f} MB, sha256 {result.sha256 or '(directory)'}")
    typer.echo("  " + ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items()))
    for check in result.structure:
        typer.echo(f"  checked: {check}")
    if result.parity_skipped:
        typer.echo(f"  parity not measured: {result.parity_skipped}")
    else:
        typer.echo(f"  parity with the Keras model on {result.n_validation} images:")
        typer.echo("    " + format_parity(result.parity).replace("\n", "\n    "))
        typer.echo(f"    {GATE_NOTE}")
        if not result.ok:
            typer.secho("  KEPT WITH --force although it fails the thresholds above.", fg=typer.colors.YELLOW)


def _check_writable(path: Path, option: str) -> None:
    from derm.exporter.export import check_writable_parent
    from derm.exporter.graph import ExportError

    if path.is_dir():
        raise ExportError(f"{option} {str(path)!r} is a folder; give a file name.")
    check_writable_parent(path, option)


GATE_NOTE = (
    "(top-1 agreement fails only when its 95% interval lies wholly below the bar; a loss of AUC or accuracy, float "
    "model minus file, only when its interval lies wholly above the allowed loss: derm.exporter.targets.Parity)"
)


def main() -> None:
    from derm._cli import run_app

    run_app(app)
