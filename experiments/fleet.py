"""Fleet job: simulate many devices and one cloud over the device-test period.

    python -m experiments.fleet --config=experiments/configs/fleet.py --workdir=runs/fleet

1. Trains (or resumes) Base and DUET in ``WORKDIR/train/<method>`` (the main job's training).
2. Cuts each device's device-test stream into ``T`` rounds; in every round each online
   device may request a head (per policy), the cloud generates all of the round's requests
   in batched jitted calls, and the device scores its new interactions with the head it
   holds, once per delivery format (:mod:`duet_jax.fleet`).
3. Compares upload variants (raw ids vs z) on the devices' first sync.
4. Writes ``fleet.json`` (config, machine, per-round records, totals), ``fleet.md`` and two
   plots (``fleet_auc_rounds.png``, ``fleet_bytes_auc.png``) to ``WORKDIR``.

Multi-host: ``--coordinator_address=HOST:PORT --num_processes=P --process_id=I`` (or
``--coordinator_address=auto`` under Slurm, Kubernetes, Cloud TPU) calls
``jax.distributed.initialize`` before anything else, on every host with the same command.
Process 0 trains (or resumes) in a single-process child (checkpointing and its workdir lock
are single-process) and broadcasts the parameters to every process; every process then runs
the same simulation, each round's generation split over every process's accelerators
(:class:`~duet_jax.cloud.Cloud`), and process 0 alone writes the results.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time

import jax
import ml_collections
import numpy as np
from absl import flags, logging
from ml_collections import config_flags

from duet_jax import finetune, sharding, timing
from duet_jax.cloud import UPLOADS, Cloud
from duet_jax.data.samples import Splits
from duet_jax.duet import Duet
from duet_jax.errors import RunError
from duet_jax.fleet import FleetConfig, Simulator, Streams, build_streams, totals
from duet_jax.models import DeviceModel, get_model
from experiments import cli, experiment, fleet_report, multihost
from experiments import config as config_lib

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "fleet.py")
_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "fleet config file (get_config()).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)
_CLOUD_URL = flags.DEFINE_string(
    "cloud_url", None, "Request the heads from a generation server at this URL (python -m "
    "experiments.serve --checkpoint=WORKDIR/train/duet) instead of the in-process cloud.")


def train_methods(
    config: ml_collections.ConfigDict, data: Splits, workdir: str, names: tuple[str, ...]
) -> tuple[DeviceModel, dict[str, dict], dict[str, dict]]:
    """Train (or resume, or only restore) each method in ``WORKDIR/train/<name>``.

    The run identity leaves ``config.fleet`` out, so a rerun that changes only fleet fields
    reuses the trained parameters. -> (device model, {name: kept parameters},
    {name: the main job's test metrics, best epoch, steps}).
    """
    model = get_model(config_lib.model_name(config),
                      config_lib.model_config(config, data.num_items))
    identity = config_lib.run_identity(config)
    identity.pop("fleet", None)
    params, summary = {}, {}
    for name in names:
        result = experiment.train_method(config, data, model, name,
                                         os.path.join(workdir, "train", name),
                                         base_params=params.get("base"), identity=identity)
        params[name] = result.params
        summary[name] = {"test": result.test, "best_epoch": result.best_epoch,
                         "steps": result.steps, "train_seconds": result.train_seconds}
        logging.info("%s: test auc %.4f (epoch %d)", name, result.test["auc"], result.best_epoch)
    return model, params, summary


TRAIN_WAIT_S = 7 * 24 * 3600  # how long other processes wait for process 0's training


def _train_child(config_path: str, workdir: str, out_path: str, *names: str) -> None:
    """The training step of a multi-host run, in process 0's single-process child: train (or
    resume) ``names`` and write ``{"params", "summary"}`` (msgpack) to ``out_path``."""
    from flax import serialization

    with open(config_path, "rb") as f:
        config = pickle.load(f)
    data = experiment.load_data(config, os.path.join(workdir, "train"))
    _, params, summary = train_methods(config, data, workdir, names)
    blob = serialization.msgpack_serialize(
        {"params": jax.device_get(params), "summary": json.dumps(summary)})
    with open(out_path, "wb") as f:
        f.write(blob)


def train_everywhere(config: ml_collections.ConfigDict, workdir: str, names: tuple[str, ...]
                     ) -> tuple[dict[str, dict], dict[str, dict]]:
    """Multi-host :func:`train_methods`: -> ({name: parameters}, {name: summary}) on every
    process.

    Checkpoints (orbax syncs every process at each save) and the workdir lock are
    single-process, so process 0 trains (or resumes) in a child process of its own, which
    sees one process, while the others wait; the parameters then reach every process by
    broadcast (no shared filesystem needed). Call before this process starts a JAX backend
    (``jax.process_index()`` would), so that the child has the accelerators to itself.
    """
    from flax import serialization
    from jax.experimental import multihost_utils

    blob, failed = np.zeros(0, np.uint8), None
    index, _ = sharding.distributed_process()
    if index == 0:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            config_path, out_path = os.path.join(tmp, "config.pkl"), os.path.join(tmp, "out")
            with open(config_path, "wb") as f:
                pickle.dump(config, f)
            code = "import sys; from experiments import fleet; fleet._train_child(*sys.argv[1:])"
            child = subprocess.run(
                [sys.executable, "-c", code, config_path, workdir, out_path, *names])
            if child.returncode == 0:
                with open(out_path, "rb") as f:
                    blob = np.frombuffer(f.read(), np.uint8)
            else:
                failed = f"training on process 0 failed (exit status {child.returncode})"
    sharding.wait_for_processes("duet_fleet_trained", TRAIN_WAIT_S)
    # -1: process 0's training failed, and every process stops
    size = int(multihost_utils.broadcast_one_to_all(np.int64(-1 if failed else len(blob))))
    if size < 0:
        raise RunError(failed or "training on process 0 failed; see process 0's log")
    if index != 0:
        blob = np.zeros(size, np.uint8)
    blob = np.asarray(multihost_utils.broadcast_one_to_all(blob))
    out = serialization.msgpack_restore(blob.tobytes())
    return out["params"], json.loads(out["summary"])


def compare_uploads(duet: Duet, params: dict, streams: Streams, fc: FleetConfig) -> list[dict]:
    """Each upload variant on every device's first sync (round 0): bytes up per request,
    cloud time per request, and how far its heads are from the raw-ids heads."""
    seqs = streams.seq[streams.first_event(0)[streams.first_event(0) >= 0]]
    rows, reference = [], None
    for upload in UPLOADS:
        cloud = Cloud(duet, params, upload, fc.min_bucket, fc.max_bucket,
                      vector_width=fc.vector_width)
        uploads, nbytes = cloud.device_upload(seqs)
        heads, seconds = cloud.serve(uploads)
        flat = np.asarray(duet.spec.flatten(heads, batch_ndim=1))
        reference = flat if reference is None else reference
        rows.append({
            "upload": upload,
            "requests": len(seqs),
            "bytes_up_per_request": float(nbytes.mean()),
            "cloud_seconds": seconds,
            "cloud_us_per_request": 1e6 * seconds / len(seqs),
            "requests_per_second": len(seqs) / seconds if seconds > 0 else None,
            "max_abs_head_diff_vs_ids": float(np.max(np.abs(flat - reference))),
        })
    return rows


def finetune_entry(
    config: ml_collections.ConfigDict, data: Splits, model: DeviceModel, base_params: dict,
    streams: Streams,
) -> dict | None:
    """What on-device fine-tuning would cost the same devices (``fleet.json["finetune"]``).

    Each fleet device fine-tunes Base (``config.finetune``: head or all parameters, its
    ``num_samples`` most recent labelled rows before the device-test period) for every step
    count in ``config.finetune.steps``, at the first learning rate; the wall time per device
    (vmapped groups, after warm-up) is what a fleet would spend instead of requests. None
    when Base was not trained (``config.fleet.base=False``).
    """
    if base_params is None:
        return None
    ft = config_lib.finetune_config(config)
    stage = finetune.make_stage([data.train, data.val], data.test, data.num_users,
                                ft.num_samples)
    keep = np.isin(stage.devices, streams.devices)
    stage = dataclasses.replace(
        stage, devices=stage.devices[keep],
        tune_rows=[r for r, k in zip(stage.tune_rows, keep, strict=True) if k],
        eval_rows=[r for r, k in zip(stage.eval_rows, keep, strict=True) if k],
    )
    seconds = {
        str(steps): finetune.time_adaptation(model, base_params, stage, ft,
                                             ft.learning_rates[0], steps)
        for steps in sorted(ft.steps)
    }
    return {
        "devices": len(stage.devices),
        "params": ft.params,
        "rows_per_device": ft.num_samples,
        "learning_rate": ft.learning_rates[0],
        "seconds_per_device": seconds,
        "group_size": ft.group_size,
    }


def run_fleet(config: ml_collections.ConfigDict, workdir: str, cloud_url: str | None = None
              ) -> dict:
    """The whole job; returns the fleet.json payload (also written to ``workdir``).
    ``cloud_url``: heads come from that generation server (:mod:`duet_jax.serving`)."""
    started = time.perf_counter()
    config_lib.validate(config)
    fc = FleetConfig.from_config(config.fleet)
    # two-stage DUET starts from Base's backbone, so it needs Base even when not scored
    with_base = fc.base or experiment.needs_base(config, ["duet"])
    names = ("base", "duet") if with_base else ("duet",)
    if sharding.distributed_process()[1] > 1:  # multi-host; no backend started yet
        params, trained_summary = train_everywhere(config, workdir, names)
        data = experiment.load_data(config, os.path.join(workdir, "train"))
        model = get_model(config_lib.model_name(config),
                          config_lib.model_config(config, data.num_items))
    else:
        data = experiment.load_data(config, os.path.join(workdir, "train"))
        model, params, trained_summary = train_methods(config, data, workdir, names)
    trained = time.perf_counter()

    streams = build_streams(data.test, fc.num_rounds, fc.num_devices, fc.seed)
    duet, _ = experiment.duet_variant(config, model, "duet")
    cloud = None
    if cloud_url:
        from duet_jax.serving.client import RemoteCloud

        cloud = RemoteCloud(cloud_url, duet, params["duet"], fc.upload,
                            min_bucket=fc.min_bucket, max_bucket=fc.max_bucket)
    sim = Simulator(streams, duet, params["duet"], fc, cloud=cloud)
    runs = [sim.run_policy(policy) for policy in fc.policies]
    if fc.base:
        runs.append(sim.base_run(model, params["base"]))
    uploads = compare_uploads(duet, params["duet"], streams, fc)
    finetune = finetune_entry(config, data, model, params.get("base"), streams)
    done = time.perf_counter()

    records = [rec for run in runs for rec in run.records]
    total_rows = [totals(run, streams, fmt) for run in runs for fmt in run.logits]
    payload = {
        "config": config.to_dict(),
        "fleet": {
            "devices": streams.num_devices,
            "rounds": streams.num_rounds,
            "events": len(streams.seq),
            "samples": len(streams.samples),
            "head_values": duet.spec.num_values,
            "head_leaves": len(duet.spec.sizes),
            "jax_devices": jax.device_count(),
            "processes": jax.process_count(),
            "sharded": sim.cloud.mesh is not None,
            "keep_heads": fc.keep_heads,
            # the whole job's peak resident memory (training included)
            "peak_rss_bytes": timing.peak_rss_bytes(),
        },
        "data": data.stats(),
        # the main job's evaluation of the same parameters (DUET: a sync before every
        # prediction), for reading the fleet's numbers against
        "training": trained_summary,
        "totals": total_rows,
        "uploads": uploads,
        "finetune": finetune,
        "records": records,
        "seconds": {
            "train": trained - started,
            "simulation": done - trained,
            "total": done - started,
        },
    }
    if jax.process_index() == 0:  # multi-host: process 0 writes
        fleet_report.write(workdir, payload)
    return payload


def main(argv):
    cli.start(argv)
    # before anything touches a JAX backend
    multihost.initialize()
    payload = run_fleet(_CONFIG.value, _WORKDIR.value, _CLOUD_URL.value)
    if jax.process_index() != 0:
        return
    print(fleet_report.markdown(payload))
    print(f"fleet results written to {os.path.abspath(_WORKDIR.value)}/fleet.{{json,md}}")


run = cli.entry_point(main)  # the console script

if __name__ == "__main__":
    run()
