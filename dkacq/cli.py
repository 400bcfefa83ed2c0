"""The ``dkacq`` command: ``fit``/``validate``/``test`` probes, ``attribute`` neurons, ``report`` figures.

Each command lives in its own module under :mod:`dkacq.commands`, imported only when it runs.
"""

import importlib
import os
import sys
import warnings

COMMANDS = {
    "fit": "probe", "validate": "probe", "test": "probe", "attribute": "attribute", "report": "report", "sweep": "sweep",
}
USAGE = """usage: dkacq {fit,validate,test,attribute,report,sweep} [options]

  fit        train a linear probe per layer on cached embeddings, test the best epoch, append results.csv
  validate   validate trained probes
  test       test trained probes and record their results
  attribute  integrated-gradients neuron attribution of a preset's MLP neurons
  report     figures and a Markdown summary from results tables and attribution runs
  sweep      a study config's grid of probes and attribution runs, resumable, then its report

Each command takes --help, --config FILE and --print_config."""


def main(args: list[str] | None = None) -> None:
    args = sys.argv[1:] if args is None else list(args)
    if not args or args[0] not in COMMANDS:
        print(USAGE)
        raise SystemExit(0 if args and args[0] in ("-h", "--help") else 2)
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    importlib.import_module(f"dkacq.commands.{COMMANDS[args[0]]}").run(args)
