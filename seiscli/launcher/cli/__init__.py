"""`seis`: the command-line front. Thin: every command parses, calls one module of the launcher, prints.

One module per command group; importing one registers its commands on the shared app (common.app), in the
order `seis --help` lists them. Nothing here imports torch, deepspeed or zarr; commands that need them import
lazily.
"""

from __future__ import annotations

import importlib

from seiscli.launcher.cli.common import app
from seiscli.launcher.cli.data import app as data_app

for _group in ("launch", "sweep", "recipes", "jobs", "runinfo", "observe", "doctor", "eval"):
    importlib.import_module(f"seiscli.launcher.cli.{_group}")
app.add_typer(data_app, name="data")


def main() -> None:
    app()
