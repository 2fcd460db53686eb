"""Main job: train Base and DUET on one dataset and compare them on the device-test period.

    python -m experiments.main --config=experiments/configs/synthetic.py --workdir=runs/demo

Writes ``results.json``, ``results.csv`` and ``results.md`` to ``--workdir`` and prints the
table. Rerunning the same command resumes from the checkpoints in ``--workdir``.
"""

from __future__ import annotations

import os

from absl import flags, logging
from ml_collections import config_flags

from experiments import cli, experiment, report
from experiments import config as config_lib

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "synthetic.py")
_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "ml_collections config file (get_config()).", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output directory (default: runs/<config name>[_<variant>]/<model>)."
)


def default_workdir(config_file: str, model: str) -> str:
    """``runs/<config name>[_<variant>]/<model>``: "configs/amazon_cds.py:quick" with sasrec
    -> "runs/amazon_cds_quick/sasrec", so a variant never shares a workdir with the full run."""
    path, _, variant = config_file.partition(":")
    name = "_".join(filter(None, [os.path.splitext(os.path.basename(path))[0], variant]))
    return os.path.join("runs", name, model)


def main(argv):
    cli.start(argv)
    config = _CONFIG.value
    if config.get("task", "recommendation") == "vision":  # the image task has its own job
        from experiments import vision
        name = config_flags.get_config_filename(flags.FLAGS["config"])
        vision.main_job(config, _WORKDIR.value or default_workdir(name, config.model))
        return
    config_lib.validate(config)
    config_file = config_flags.get_config_filename(flags.FLAGS["config"])
    workdir = _WORKDIR.value or default_workdir(config_file, config.model)
    logging.info("config %s, workdir %s", config_file, workdir)
    data = experiment.load_data(config, workdir)
    stats = data.stats()
    print(f"data: {stats}", flush=True)
    rows = experiment.run(config, workdir, data=data)
    table = report.write_results(workdir, rows, config.to_dict(), stats)
    print(table)
    print(f"results written to {os.path.abspath(workdir)}/results.{{json,csv,md}}")


run = cli.entry_point(main)  # the console script

if __name__ == "__main__":
    run()
