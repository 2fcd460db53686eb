"""``benchmark.png``: four panels drawn from a ``benchmark.json`` payload."""

from __future__ import annotations

from collections.abc import Callable

import matplotlib
import numpy as np

from duet_jax import files
from experiments.benchmark.summary import TARGET_DEVICES_PER_S, find_case, model_names

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # after choosing the Agg backend


def plot(result: dict, path: str) -> None:
    """Four panels: devices/s vs N, vs batch size, the adaptation comparison, and the
    speed-ups (vmap vs loop, low-rank, stages). ``result``: the ``benchmark.json`` payload
    (``cases``, ``config``, ``environment``, ``load_average``)."""
    cases, config = result["cases"], result["config"]
    models = model_names(config["models"])
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax = axes[0, 0]
    for m in models:
        pts = sorted((c["num_devices"], c["devices_per_s"]) for c in cases
                     if c["case"] == "generation" and c["model"] == m
                     and c["batch_size"] == config["batch_size"])
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", label=m)
    ax.axhline(TARGET_DEVICES_PER_S, ls="--", c="gray", label="target (SASRec/GRU4Rec)")
    ax.set(xscale="log", yscale="log", xlabel="devices N", ylabel="devices / s",
           title=f"head generation, batch {config['batch_size']} (heads streamed)")
    ax.legend()
    ax = axes[0, 1]
    for m in models:
        pts = sorted((c["batch_size"], c["devices_per_s"]) for c in cases
                     if c["case"] == "generation" and c["model"] == m
                     and c["num_devices"] == config["batch_sweep_devices"])
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", label=m)
    ax.set(xscale="log", yscale="log", xlabel="batch size B", ylabel="devices / s",
           title=f"head generation, N = {config['batch_sweep_devices']:,}")
    ax.legend()

    def value(kind: str, key: str, **match) -> Callable[[str], float | None]:
        def pick(m):
            c = find_case(cases, kind, m, **match)
            return None if c is None else c[key]
        return pick

    steps = config["finetune"]["steps"]
    labels = ["DUET (generate)"] + [f"fine-tune vmap k={k}" for k in steps] + [
        f"fine-tune loop k={k}" for k in steps]
    kinds = [value("duet_adapt", "ms_per_device")] + [
        value("finetune_vmap", "ms_per_device", steps=k) for k in steps] + [
        value("finetune_loop", "ms_per_device", steps=k) for k in steps]
    _bars(axes[1, 0], models, labels, kinds,
          f"adaptation per device (fine-tuning: {config['finetune']['params']}, "
          f"{config['finetune']['num_samples']} rows)", "ms / device")
    labels = ["jit+vmap", "python loop", "low-rank", "encoder only", "decoder only"]
    kinds = [value("generation", "devices_per_s", num_devices=config["loop_devices"],
                   batch_size=config["batch_size"]),
             value("loop", "devices_per_s"), value("low_rank", "devices_per_s"),
             value("encoder", "devices_per_s"), value("decoder", "devices_per_s")]
    _bars(axes[1, 1], models, labels, kinds, "generation variants", "devices / s")
    env = result["environment"]
    fig.suptitle(f"duet_jax benchmark: {env['processor']} ({env['cpu_count']} cores), "
                 f"{env['jax_backend']}, load avg {result['load_average']['start'][0]:.1f}"
                 f"→{result['load_average']['end'][0]:.1f}")
    fig.tight_layout()
    with files.atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def _bars(ax, models: list[str], labels: list[str],
          kinds: list[Callable[[str], float | None]], title: str, ylabel: str) -> None:
    """Grouped bars: one group per model, one bar per ``labels`` entry (missing: 0)."""
    width = 0.8 / len(labels)
    for i, (label, pick) in enumerate(zip(labels, kinds, strict=True)):
        vals = [pick(m) for m in models]
        ax.bar(np.arange(len(models)) + i * width, [v or 0 for v in vals], width, label=label)
    ax.set_xticks(np.arange(len(models)) + width * (len(labels) - 1) / 2, models)
    ax.set(yscale="log", title=title, ylabel=ylabel)
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    ax.set_ylim(top=ax.get_ylim()[1] * 30)  # room for the legend above the bars
