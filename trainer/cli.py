"""``derm-train``: the trainer's command line (so far: obtaining the pretrained weights)."""

from __future__ import annotations

import logging
import sys

import typer

from derm.trainer.weights import weights_app

app = typer.Typer(
    name="derm-train",
    help="Train the skin-lesion classifier (Esteva et al. 2017 recipe). A research aid, not a diagnostic device.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(weights_app, name="weights")


@app.callback()
def _main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
