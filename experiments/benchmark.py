"""Throughput benchmark: how fast the cloud writes heads for a simulated fleet, side by side.

    python -m experiments.benchmark --config=experiments/configs/benchmark.py --workdir=DIR
    python -m experiments.benchmark --config=experiments/configs/benchmark.py \
        --config.quick=True --workdir=DIR                   # < 2 minutes on 2 CPU cores

Writes ``DIR/benchmark.json`` (every case, the machine, versions, load average) and
``DIR/benchmark.png``. Cases, for each device model's head:

- ``generation``: N devices streamed through ``jit(Duet.generate)`` in batches of B (the last
  padded), heads discarded batch by batch; the N sweep at one B and the B sweep at one N.
- ``encoder`` / ``decoder``: the two stages alone (sequence -> z; z -> head).
- ``low_rank``: the same generation with low-rank decoders (a k x k core per matrix leaf).
- ``loop``: a Python loop of the jitted single-device function against jit+vmap generation
  of the same N devices, timed alternately in ``paired_rounds`` rounds (the speed-up of
  batching, which includes the decoders' bias fold that only a batched call uses, see
  ``duet_jax.generator.affine``).
- ``duet_adapt``, ``finetune_vmap``, ``finetune_loop``: DUET's adaptation (generating a
  device's head, in groups of the fine-tuning group size) against k Adam steps of head
  fine-tuning, vmapped in groups and one device at a time (as the authors' code runs it).
- ``scaling``: sharded generation over 1..n accelerators (and fake CPU devices, labelled).

Each case reports compile time and the first (warm-up) call apart from ``repeats`` timed
passes (median, IQR, range), devices/s, ms per device, XLA's FLOPs and bytes per device with
the achieved fraction of this machine's measured peaks, and memory.

Multi-host: ``--coordinator_address=HOST:PORT --num_processes=P --process_id=I`` calls
``jax.distributed.initialize`` before anything else; the scaling case then spans every
process's accelerators, and process 0 writes the results.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm.auto import tqdm

from duet_jax import files, finetune, sharding, timing
from duet_jax.duet import Duet
from duet_jax.generator import ParameterGenerator
from duet_jax.models import ModelConfig, get_model
from experiments import cli, report, scaling
from experiments.configs import benchmark as benchmark_config

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after choosing the Agg backend

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs", "benchmark.py"),
    "Benchmark config file (get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.", required=True)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-host: host:port of process 0 (jax.distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: process count.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")

CASE_GROUPS = {"generation", "stages", "low_rank", "loop", "adaptation", "scaling"}
GPU_NOTE = "No GPU was lent to this run's task: CPU results only."


# ---------------------------------------------------------------------------- config


def resolve_config(config, overrides: dict):
    """``config`` with the quick sizes when ``quick`` is set, command-line overrides kept."""
    if not config.quick:
        return config
    config = benchmark_config.quick(config)
    for path, value in overrides.items():  # --config.x=... beats the quick sizes
        *parents, leaf = path.split(".")
        node = config
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


# ----------------------------------------------------------------------------- cases


class Bench:
    """The state every case shares: config, peaks, models, random sequences."""

    def __init__(self, config):
        self.config = config
        self.rng = np.random.default_rng(config.seed)
        self.model_config = ModelConfig(num_items=config.num_items, seq_len=config.seq_len,
                                        embed_dim=config.embed_dim)
        self.key = jax.random.key(config.seed)
        self.peaks: dict = {}
        self._duets: dict = {}
        self._seq = None

    def duet(self, model: str, low_rank: int = 0):
        """``(Duet, params)`` with random init (accuracy is not measured here)."""
        if (model, low_rank) not in self._duets:
            duet = Duet.create(get_model(model, self.model_config), low_rank=low_rank)
            self._duets[model, low_rank] = (duet, duet.init(self.key))
            jax.block_until_ready(self._duets[model, low_rank][1])
        return self._duets[model, low_rank]

    def sequences(self, n: int):
        """The first ``n`` of one fixed pool of random trigger sequences ``[n, L]``."""
        if self._seq is None or len(self._seq) < n:
            have = 0 if self._seq is None else len(self._seq)
            more = scaling.random_sequences(self.rng, n - have, self.config.seq_len,
                                            self.config.num_items)
            self._seq = more if self._seq is None else np.concatenate([self._seq, more])
        return self._seq[:n]

    def batches(self, n: int, batch: int):
        """``ceil(n / batch)`` device arrays ``[batch, L]`` (the last padded with empty
        sequences), placed before timing: the cloud has the ids in memory."""
        calls = -(-n // batch)
        seq = np.zeros((calls * batch, self.config.seq_len), np.int32)
        seq[:n] = self.sequences(n)
        return [jax.device_put(b) for b in seq.reshape(calls, batch, -1)]

    def time(self, fn: Callable, args_per_call: list[tuple], compile_args: tuple) -> dict:
        """Compile ``fn``, then time passes that call it on every ``args_per_call`` entry
        (one call kept in flight while the next is dispatched; results discarded)."""
        compiled, compile_s = timing.compile_timed(fn, *compile_args)
        run = _pipelined(compiled, args_per_call)
        timing.reset_peak_rss()
        result = timing.time_pass(
            run, self.config.repeats, compile_s,
            warmup=lambda: jax.block_until_ready(compiled(*args_per_call[0])),
            budget_s=self.config.case_budget_s, min_repeats=self.config.min_repeats)
        return {
            "timing": result.summary(),
            "median_s": result.median_s,
            "cost_per_call": timing.cost(compiled),
            "matmul": timing.matmul_flops(fn, *compile_args),
            "compiled_memory_bytes": timing.compiled_memory(compiled),
            "peak_rss_bytes": timing.peak_rss_bytes(),
            "device_memory": timing.device_memory(),
        }

    def case(self, kind: str, model: str, n: int, per_call: int, measured: dict,
             **extra) -> dict:
        """One result row: throughput, per-device cost, achieved fraction of the peaks."""
        median = measured.pop("median_s")
        cost = measured.pop("cost_per_call")
        matmul = measured.pop("matmul")
        flops = matmul["matmul_flops"] / per_call
        moved = cost["bytes_accessed"] / per_call
        written = measured["compiled_memory_bytes"].get("output", float("nan")) / per_call
        rate = n / median
        peak_flops = self.peaks["matmul"]["flops_per_s"]
        peak_bytes = self.peaks["bandwidth"]["bytes_per_s"]
        return {
            "case": kind, "model": model, "num_devices": n, "per_call_devices": per_call,
            **extra,
            "devices_per_s": rate,
            "ms_per_device": 1e3 * median / n,
            # matrix-product FLOPs from the jaxpr, loop bodies times their trip count
            "flops_per_device": flops,
            "uncounted_while_loops": matmul["uncounted_while_loops"],
            # XLA's cost analysis as reported: loop bodies (GRU steps, Adam steps) counted once
            "xla_flops_per_device": cost["flops"] / per_call,
            "bytes_per_device": moved,
            "output_bytes_per_device": written,
            "achieved_flops_per_s": flops * rate,
            "achieved_bytes_per_s": moved * rate,
            "fraction_of_peak_flops": flops * rate / peak_flops,
            "fraction_of_peak_bandwidth": moved * rate / peak_bytes,
            "output_fraction_of_peak_bandwidth": written * rate / peak_bytes,
            **measured,
        }

    # ---------------------------------------------------------------- generation

    def generation(self, model: str, n: int, batch: int, low_rank: int = 0) -> dict:
        duet, params = self.duet(model, low_rank)
        batches = self.batches(n, batch)
        measured = self.time(duet.generate, [(params, b) for b in batches], (params, batches[0]))
        return self.case("low_rank" if low_rank else "generation", model, n, batch, measured,
                         batch_size=batch, padded_devices=len(batches) * batch, low_rank=low_rank,
                         heads="streamed: each batch's heads discarded once computed",
                         generated_values_per_device=duet.spec.num_values if not low_rank else None)

    def stages(self, model: str, n: int, batch: int) -> list[dict]:
        """Encoder alone (ids -> z, including the backbone's sequence embedding) and decoder
        alone (z -> head)."""
        duet, params = self.duet(model)
        gen = duet.generator

        def encode(p, seq):
            features, mask = duet.model.embed_sequence(p["backbone"], seq)
            one = lambda f, m: gen.apply(p["generator"], f, m, method=ParameterGenerator.encode)
            return jax.vmap(one)(features, mask)

        def decode(p, z):  # batched, as generate runs it
            return gen.apply(p["generator"], z, method=ParameterGenerator.decode)

        batches = self.batches(n, batch)
        rows = [self.case("encoder", model, n, batch,
                          self.time(encode, [(params, b) for b in batches], (params, batches[0])),
                          batch_size=batch)]
        z = np.random.default_rng(1).normal(size=(batch, gen.z_dim)).astype(np.float32)
        zs = [jax.device_put(z)] * len(batches)  # decoding cost does not depend on z
        rows.append(self.case("decoder", model, n, batch,
                              self.time(decode, [(params, v) for v in zs], (params, zs[0])),
                              batch_size=batch, heads="streamed"))
        return rows

    def loop(self, model: str, n: int) -> dict:
        """The jitted single-device function called once per device from Python (each call
        blocked on: a cloud answering device requests one at a time)."""
        duet, params = self.duet(model)
        single = lambda p, s: jax.tree.map(lambda x: x[0], duet.generate(p, s[None]))
        seqs = [jax.device_put(s) for s in self.sequences(n)]
        compiled, compile_s = _compile(single, params, seqs[0])

        def run():
            for s in seqs:
                jax.block_until_ready(compiled(params, s))

        case = self._timed_loop("loop", model, n, run, compiled, compile_s,
                                lambda: jax.block_until_ready(compiled(params, seqs[0])),
                                timing.matmul_flops(single, params, seqs[0]))
        case["paired_with_vmap"] = self._paired_with_vmap(model, n, run)
        return case

    def _paired_with_vmap(self, model: str, n: int, loop_pass: Callable[[], None]) -> dict:
        """The loop and jit+vmap generation of the same N devices (in batches of
        ``batch_size``) timed alternately, round by round, each round's ratio kept: a change
        in the machine's load between two separately timed cases (minutes apart) moves
        their ratio, but hits both halves of a round alike."""
        duet, params = self.duet(model)
        batches = self.batches(n, self.config.batch_size)
        compiled, _ = _compile(duet.generate, params, batches[0])
        vmap_pass = _pipelined(compiled, [(params, b) for b in batches])
        vmap_pass()  # warm-up (the loop's function is warm already)
        loop_s, vmap_s = [], []
        order = [(loop_pass, loop_s), (vmap_pass, vmap_s)]
        for r in range(self.config.paired_rounds):
            # alternate which goes first, so neither always runs on a just-warmed cache
            for run, times in order if r % 2 == 0 else order[::-1]:
                started = time.perf_counter()
                run()
                times.append(time.perf_counter() - started)
        speedups = [lo / v for lo, v in zip(loop_s, vmap_s, strict=True)]
        return {"batch_size": self.config.batch_size, "rounds": len(speedups),
                "loop_s": loop_s, "vmap_s": vmap_s, "speedups": speedups,
                "median_speedup": float(np.median(speedups)),
                "min_speedup": min(speedups), "max_speedup": max(speedups)}

    def _timed_loop(self, kind: str, model: str, n: int, run: Callable, compiled,
                    compile_s: float, warmup: Callable, matmul: dict, **extra) -> dict:

        timing.reset_peak_rss()
        result = timing.time_pass(run, self.config.repeats, compile_s, warmup=warmup,
                                  budget_s=self.config.case_budget_s,
                                  min_repeats=self.config.min_repeats)
        measured = {"timing": result.summary(), "median_s": result.median_s,
                    "cost_per_call": timing.cost(compiled), "matmul": matmul,
                    "compiled_memory_bytes": timing.compiled_memory(compiled),
                    "peak_rss_bytes": timing.peak_rss_bytes(),
                    "device_memory": timing.device_memory()}
        return self.case(kind, model, n, 1, measured, **extra)

    # ---------------------------------------------------------------- adaptation

    def tune_rows(self, n: int) -> dict:
        """Each device's ``num_samples`` labelled rows ``[n, S, ...]`` (all real: weight 1)."""
        ft = self.config.finetune
        s = ft.num_samples
        return {
            "click_seq": self.sequences(n * s).reshape(n, s, -1),
            "target": self.rng.integers(1, self.config.num_items + 1, (n, s), dtype=np.int32),
            "label": self.rng.integers(0, 2, (n, s)).astype(np.float32),
            "weight": np.ones((n, s), np.float32),
        }

    def adaptation(self, model: str) -> list[dict]:


        ft = self.config.finetune
        group = ft.group_size
        duet, _ = self.duet(model)
        base = duet.model.init(jax.random.fold_in(self.key, 7))
        # head mode: train the head, backbone fixed; all: train everything
        head, backbone = (base["head"], base["backbone"]) if ft.params == "head" else (base, None)
        lr = jnp.float32(ft.learning_rate)
        groups = -(-ft.devices // group)
        rows = self.tune_rows(groups * group)
        vmapped = [jax.device_put(jax.tree.map(lambda x, g=g: x[g * group:(g + 1) * group], rows))
                   for g in range(groups)]
        singles = [jax.device_put(jax.tree.map(lambda x, d=d: x[d:d + 1], rows))
                   for d in range(ft.loop_devices)]
        out = [self.generation(model, ft.devices, group) | {"case": "duet_adapt"}]
        for steps in ft.steps:
            fn = functools.partial(_finetune, duet.model, ft.params, steps)
            measured = self.time(fn, [(head, backbone, b, lr) for b in vmapped],
                                 (head, backbone, vmapped[0], lr))
            out.append(self.case("finetune_vmap", model, ft.devices, group, measured,
                                 steps=steps, group_size=group, rows_per_device=ft.num_samples,
                                 params=ft.params, padded_devices=groups * group))
            compiled, compile_s = _compile(fn, head, backbone, singles[0], lr)

            def run(compiled=compiled):
                for b in singles:
                    jax.block_until_ready(compiled(head, backbone, b, lr))

            out.append(self._timed_loop(
                "finetune_loop", model, ft.loop_devices, run, compiled, compile_s,
                lambda compiled=compiled: jax.block_until_ready(
                    compiled(head, backbone, singles[0], lr)),
                timing.matmul_flops(fn, head, backbone, singles[0], lr),
                steps=steps, group_size=1, rows_per_device=ft.num_samples, params=ft.params))
        return out

    # ---------------------------------------------------------------- scaling

    def scaling(self) -> list[dict]:


        sc = self.config.scaling
        kwargs = dict(model=sc.model, num_items=self.config.num_items,
                      seq_len=self.config.seq_len, embed_dim=self.config.embed_dim,
                      devices=sc.devices, per_accelerator_batch=sc.per_accelerator_batch,
                      repeats=self.config.repeats, seed=self.config.seed)
        count = len(jax.devices())
        counts = sorted({c for c in (1, 2, 4, 8, 16, 32, 64, count) if c <= count})
        rows = [scaling.measure(**kwargs, num_accelerators=c) | {"fake": False}
                for c in counts]
        if jax.process_count() == 1 and jax.default_backend() == "cpu":
            for c in sc.fake_devices:
                rows.append(scaling.run_fake(c, kwargs) | {
                    "fake": True,
                    "note": f"{c} fake CPU devices sharing {os.cpu_count()} cores: this "
                            "shows sharding overhead, not speed-up"})
        base = rows[0]["devices_per_s"]
        for row in rows:
            row.update(case="scaling", model=sc.model, speedup_vs_1=row["devices_per_s"] / base)
        return rows


def _compile(fn: Callable, *args):
    return timing.compile_timed(fn, *args)


def _pipelined(compiled, args_per_call: list[tuple]) -> Callable[[], None]:
    """A pass that calls ``compiled`` on every ``args_per_call`` entry, keeping one call in
    flight while the next is dispatched, and blocks on the last (results discarded)."""
    def run():
        previous = None
        for args in args_per_call:
            out = compiled(*args)
            if previous is not None:
                jax.block_until_ready(previous)
            previous = out
        jax.block_until_ready(previous)

    return run


def _finetune(model, mode, steps, trainable, fixed, tune_batch, lr):
    return finetune.finetune_params(model, mode, trainable, fixed, tune_batch, lr, steps)


# ---------------------------------------------------------------------------- summary


def summarise(cases: list[dict], config) -> dict:
    """The headline numbers: targets, speed-ups, ratios, what bounds generation."""
    def find(kind, model, **match):
        for c in cases:
            if c["case"] == kind and c["model"] == model and all(
                    c.get(k) == v for k, v in match.items()):
                return c
        return None

    out: dict = {"models": {}}
    for model in [m.strip() for m in config.models.split(",")]:
        s: dict = {}
        gens = [c for c in cases if c["case"] == "generation" and c["model"] == model]
        if gens:
            best = max(gens, key=lambda c: c["devices_per_s"])
            s["best_devices_per_s"] = best["devices_per_s"]
            s["best_at"] = {"num_devices": best["num_devices"], "batch_size": best["batch_size"]}
            s["target_devices_per_s"] = 250_000 if model in ("sasrec", "gru4rec") else None
            if s["target_devices_per_s"]:
                s["target_met"] = best["devices_per_s"] >= 250_000
            f, b = best["fraction_of_peak_flops"], best["fraction_of_peak_bandwidth"]
            s["fraction_of_peak_flops"], s["fraction_of_peak_bandwidth"] = f, b
            s["output_fraction_of_peak_bandwidth"] = best["output_fraction_of_peak_bandwidth"]
            s["bound"] = ("compute (matmul rate)" if f >= b else "memory bandwidth") + (
                "" if max(f, b) >= 0.3 else
                ": but both fractions are low, so latency-bound (small matmuls, the "
                "encoder GRU's sequential steps, dispatch)")
        loop = find("loop", model)
        vmap = find("generation", model, num_devices=config.loop_devices,
                    batch_size=config.batch_size)
        paired = loop.get("paired_with_vmap") if loop else None
        if loop and (vmap or paired):
            # the paired (alternating) measurement when there is one; the ratio of the two
            # separately timed cases is kept beside it
            s["vmap_vs_loop"] = {"num_devices": config.loop_devices, "loop_extrapolated": False}
            if vmap:
                s["vmap_vs_loop"]["unpaired_speedup"] = (vmap["devices_per_s"]
                                                         / loop["devices_per_s"])
            if paired:
                s["vmap_vs_loop"] |= {
                    "speedup": paired["median_speedup"], "measured": "paired rounds, median",
                    "rounds": paired["rounds"],
                    "speedup_range": [paired["min_speedup"], paired["max_speedup"]]}
            else:
                s["vmap_vs_loop"] |= {"speedup": s["vmap_vs_loop"]["unpaired_speedup"],
                                      "measured": "separate cases"}
        duet = find("duet_adapt", model)
        if duet:
            ratios = {}
            for c in cases:
                if c["model"] == model and c["case"] in ("finetune_vmap", "finetune_loop"):
                    name = f"{c['case']}_{c['params']}_k{c['steps']}"
                    ratios[name] = c["ms_per_device"] / duet["ms_per_device"]
            s["adaptation"] = {"duet_ms_per_device": duet["ms_per_device"],
                               "duet_group_size": duet["batch_size"],
                               "finetune_over_duet": ratios}
        enc, dec = find("encoder", model), find("decoder", model)
        full = find("generation", model, num_devices=config.split_devices,
                    batch_size=config.batch_size)
        if enc and dec and full:
            s["split_ms_per_device"] = {"encoder": enc["ms_per_device"],
                                        "decoder": dec["ms_per_device"],
                                        "full": full["ms_per_device"]}
        low = find("low_rank", model)
        if low and full:
            s["low_rank_vs_full_speedup"] = low["devices_per_s"] / full["devices_per_s"]
        out["models"][model] = s
    out["acceptance"] = {
        "vmap_vs_loop_at_least_10x": {m: s["vmap_vs_loop"]["speedup"] >= 10
                                      for m, s in out["models"].items() if "vmap_vs_loop" in s},
        "sequential_finetune_at_least_100x_duet": {
            f"{m}/{k}": v >= 100 for m, s in out["models"].items() if "adaptation" in s
            for k, v in s["adaptation"]["finetune_over_duet"].items()
            if k.startswith("finetune_loop")},
    }
    return out


# ---------------------------------------------------------------------------- plot


def plot(result: dict, path: str) -> None:
    """Four panels: devices/s vs N, vs batch size, the adaptation comparison, and the
    speed-ups (vmap vs loop, low-rank, stages)."""
    matplotlib.use("Agg")


    cases, config = result["cases"], result["config"]
    models = [m.strip() for m in config["models"].split(",")]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    ax = axes[0, 0]
    for m in models:
        pts = sorted((c["num_devices"], c["devices_per_s"]) for c in cases
                     if c["case"] == "generation" and c["model"] == m
                     and c["batch_size"] == config["batch_size"])
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-", label=m)
    ax.axhline(250_000, ls="--", c="gray", label="target (SASRec/GRU4Rec)")
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

    def bars(ax, labels, kinds, title, ylabel):
        width = 0.8 / len(labels)
        for i, (label, pick) in enumerate(zip(labels, kinds, strict=True)):
            vals = [pick(m) for m in models]
            ax.bar(np.arange(len(models)) + i * width, [v or 0 for v in vals], width,
                   label=label)
        ax.set_xticks(np.arange(len(models)) + width * (len(labels) - 1) / 2, models)
        ax.set(yscale="log", title=title, ylabel=ylabel)
        ax.legend(fontsize=7, ncol=2, loc="upper left")
        ax.set_ylim(top=ax.get_ylim()[1] * 30)  # room for the legend above the bars

    def value(kind, key, **match):
        def pick(m):
            for c in cases:
                if c["case"] == kind and c["model"] == m and all(
                        c.get(k) == v for k, v in match.items()):
                    return c[key]
            return None
        return pick

    steps = config["finetune"]["steps"]
    labels = ["DUET (generate)"] + [f"fine-tune vmap k={k}" for k in steps] + [
        f"fine-tune loop k={k}" for k in steps]
    kinds = [value("duet_adapt", "ms_per_device")] + [
        value("finetune_vmap", "ms_per_device", steps=k) for k in steps] + [
        value("finetune_loop", "ms_per_device", steps=k) for k in steps]
    bars(axes[1, 0], labels, kinds,
         f"adaptation per device (fine-tuning: {config['finetune']['params']}, "
         f"{config['finetune']['num_samples']} rows)", "ms / device")
    labels = ["jit+vmap", "python loop", "low-rank", "encoder only", "decoder only"]
    kinds = [value("generation", "devices_per_s", num_devices=config["loop_devices"],
                   batch_size=config["batch_size"]),
             value("loop", "devices_per_s"), value("low_rank", "devices_per_s"),
             value("encoder", "devices_per_s"), value("decoder", "devices_per_s")]
    bars(axes[1, 1], labels, kinds, "generation variants", "devices / s")
    env = result["environment"]
    fig.suptitle(f"duet_jax benchmark: {env['processor']} ({env['cpu_count']} cores), "
                 f"{env['jax_backend']}, load avg {result['load_average']['start'][0]:.1f}"
                 f"→{result['load_average']['end'][0]:.1f}")
    fig.tight_layout()
    with files.atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- main


def tasks(bench: Bench) -> list[tuple[str, Callable[[], list[dict]]]]:
    """Every case as ``(label, thunk)``, in the order they run; each generation (N, B)
    measured once even where several comparisons use it."""
    c = bench.config
    models = [m.strip() for m in c.models.split(",")]
    groups = {g.strip() for g in c.cases.split(",")}
    unknown = groups - CASE_GROUPS
    if unknown:
        raise ValueError(f"config.cases: unknown {sorted(unknown)}; expected {CASE_GROUPS}")
    sizes = []
    if "generation" in groups:
        sizes += [(n, c.batch_size) for n in c.num_devices]
        sizes += [(c.batch_sweep_devices, b) for b in c.batch_sizes]
    if "stages" in groups or "low_rank" in groups:
        sizes.append((c.split_devices, c.batch_size))  # the full-rank reference
    if "loop" in groups:
        sizes.append((c.loop_devices, c.batch_size))  # what the loop is compared with
    out = []
    for m in models:
        for n, b in dict.fromkeys(sizes):
            out.append((f"{m} generate N={n} B={b}",
                        lambda m=m, n=n, b=b: [bench.generation(m, n, b)]))
        if "stages" in groups:
            out.append((f"{m} encoder/decoder",
                        lambda m=m: bench.stages(m, c.split_devices, c.batch_size)))
        if "low_rank" in groups and c.low_rank:
            out.append((f"{m} low-rank k={c.low_rank}", lambda m=m: [
                bench.generation(m, c.split_devices, c.batch_size, c.low_rank)]))
        if "loop" in groups:
            out.append((f"{m} python loop N={c.loop_devices}",
                        lambda m=m: [bench.loop(m, c.loop_devices)]))
        if "adaptation" in groups:
            out.append((f"{m} adaptation", lambda m=m: bench.adaptation(m)))
    if "scaling" in groups:
        out.append(("scaling", bench.scaling))
    return out


def run(config, workdir: str) -> dict:
    """Run every case, writing ``benchmark.json`` after each (``complete`` at the end)."""


    started = time.time()
    load_start = list(os.getloadavg())
    bench = Bench(config)
    bench.peaks = {"matmul": timing.peak_matmul(config.peak_matmul_size),
                   "bandwidth": timing.peak_bandwidth(config.peak_bandwidth_mb)}
    gpu = any(d.platform == "gpu" for d in jax.devices())
    result = {
        "config": config.to_dict(),
        "environment": report.environment() | {
            "device_kind": jax.devices()[0].device_kind, "process_count": jax.process_count()},
        "gpu": {"lent": gpu, "note": None if gpu else GPU_NOTE},
        "peaks": bench.peaks,
        "load_average": {"start": load_start, "end": None},
        "cases": [],
        "complete": False,
    }
    path = os.path.join(workdir, "benchmark.json")
    write = jax.process_index() == 0
    todo = tasks(bench)
    for label, thunk in tqdm(todo, desc="benchmark", unit="case", disable=not config.progress):
        logging.info("case %s", label)
        result["cases"].extend(thunk())
        if write:
            files.write_text_atomic(path, files.dumps(result))
    result["load_average"]["end"] = list(os.getloadavg())
    result["wall_s"] = time.time() - started
    result["summary"] = summarise(result["cases"], config)
    result["complete"] = True
    if write:
        files.write_text_atomic(path, files.dumps(result))
        plot(result, os.path.join(workdir, "benchmark.png"))
    return result


def main(argv):
    cli.start(argv)
    # before anything touches a JAX backend
    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    config = resolve_config(_CONFIG.value,
                            config_flags.get_override_values(flags.FLAGS["config"]))
    result = run(config, _WORKDIR.value)
    for model, s in result["summary"]["models"].items():
        print(model, files_dumps_short(s))
    print(f"benchmark written to {os.path.abspath(_WORKDIR.value)}/benchmark.{{json,png}}")


def files_dumps_short(obj) -> str:
    return json.dumps(files.strict_json(obj), default=str)


if __name__ == "__main__":
    app.run(main)
