"""What the benchmark times: every case's setup, timed passes and result row.

:class:`Bench` holds what the cases share (config, the machine's peaks, models, one pool
of random trigger sequences); :func:`tasks` lists the cases a config asks for, in the order
they run. Each case compiles first, then times a warm-up call apart from the ``repeats``
timed passes.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from duet_jax import finetune, sharding, timing, xla_options
from duet_jax.duet import Duet
from duet_jax.errors import ConfigError
from duet_jax.generator import ParameterGenerator
from duet_jax.models import ModelConfig, get_model
from experiments.benchmark import scaling, torch_reference, vision_case

CASE_GROUPS = {"generation", "stages", "low_rank", "loop", "adaptation", "scaling",
               "torch_reference", "encoders", "prepared", "vector_width", "streamed",
               "vision", "accelerators"}
# the opt-in encoders timed against the default "gru" (case group "encoders")
OPTIONAL_ENCODERS = ("gru_bf16", "attention")


class Bench:
    """The state every case shares: config, peaks, models, random sequences."""

    def __init__(self, config):
        self.config = config
        if not (isinstance(config.min_trigger_length, int)
                and 1 <= config.min_trigger_length <= config.seq_len):
            raise ConfigError("config.min_trigger_length", config.min_trigger_length,
                              f"an integer in 1..config.seq_len ({config.seq_len})")
        self.rng = np.random.default_rng(config.seed)
        self.model_config = ModelConfig(num_items=config.num_items, seq_len=config.seq_len,
                                        embed_dim=config.embed_dim)
        self.key = jax.random.key(config.seed)
        self.peaks: dict = {}
        self._duets: dict = {}
        self._seq = None
        # every case compiles with these (config.cpu_vector_width), ours and fine-tuning alike
        self.compiler_options = xla_options.generation_options(config.cpu_vector_width)

    def compile(self, fn: Callable, *args, vector_width: int | None = None) -> tuple[Any, float]:
        """``fn`` compiled for ``args`` with the benchmark's XLA options (``vector_width``:
        another CPU vector width for this one) and the seconds it took."""
        options = (self.compiler_options if vector_width is None
                   else xla_options.generation_options(vector_width))
        return timing.compile_timed(fn, *args, compiler_options=options or None)

    def duet(self, model: str, low_rank: int = 0, encoder: str = "gru"):
        """``(Duet, params)`` with random init (accuracy is not measured here)."""
        key = (model, low_rank, encoder)
        if key not in self._duets:
            duet = Duet.create(get_model(model, self.model_config), low_rank=low_rank,
                               encoder=encoder)
            self._duets[key] = (duet, duet.init(self.key))
            jax.block_until_ready(self._duets[key][1])
        return self._duets[key]

    def sequences(self, n: int):
        """The first ``n`` of one fixed pool of random trigger sequences ``[n, L]``."""
        if self._seq is None or len(self._seq) < n:
            have = 0 if self._seq is None else len(self._seq)
            more = scaling.random_sequences(self.rng, n - have, self.config.seq_len,
                                            self.config.num_items,
                                            self.config.min_trigger_length)
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
        compiled, compile_s = self.compile(fn, *compile_args)
        return self._measure(
            timing.pipelined_pass(compiled, args_per_call), compiled, compile_s,
            warmup=lambda: jax.block_until_ready(compiled(*args_per_call[0])),
            matmul=lambda: timing.matmul_flops(fn, *compile_args))

    def _measure(self, run: Callable[[], None], compiled, compile_s: float,
                 warmup: Callable[[], None], matmul: Callable[[], dict]) -> dict:
        """Time passes of ``run`` (after ``warmup``), then what XLA says of ``compiled``:
        the fields :meth:`case` turns into a row."""
        timing.reset_peak_rss()
        result = timing.time_pass(run, self.config.repeats, compile_s, warmup=warmup,
                                  budget_s=self.config.case_budget_s,
                                  min_repeats=self.config.min_repeats)
        return {
            "timing": result.summary(),
            "median_s": result.median_s,
            "cost_per_call": timing.cost(compiled),
            "matmul": matmul(),
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

    def prepared(self, model: str, low_rank: int = 0, encoder: str = "gru"):
        """``(Duet, prepared)``: :meth:`Duet.prepare`'s once-per-parameter-set tables (made
        before timing, as the cloud makes them when it loads a checkpoint)."""
        key = ("prepared", model, low_rank, encoder)
        if key not in self._duets:
            duet, params = self.duet(model, low_rank, encoder)
            self._duets[key] = (duet, jax.block_until_ready(jax.jit(duet.prepare)(params)))
        return self._duets[key]

    def generator_fn(self, model: str, low_rank: int = 0, encoder: str = "gru",
                     prepared: bool | None = None) -> tuple[Any, Callable, Any]:
        """``(duet, fn, args)`` with ``fn(args, seq [B, L]) -> heads``: ``Duet.generate_prepared``
        on the prepared tables (``config.prepared``, the default) or ``Duet.generate``."""
        if self.config.prepared if prepared is None else prepared:
            duet, tables = self.prepared(model, low_rank, encoder)
            return duet, duet.generate_prepared, tables
        duet, params = self.duet(model, low_rank, encoder)
        return duet, duet.generate, params

    def generation(self, model: str, n: int, batch: int, low_rank: int = 0) -> dict:
        """``n`` heads from ``jit(Duet.generate_prepared)`` (or ``jit(Duet.generate)`` with
        ``config.prepared`` off) in batches of ``batch`` (``low_rank`` > 0: low-rank
        decoders with a k x k core)."""
        duet, fn, args = self.generator_fn(model, low_rank)
        batches = self.batches(n, batch)
        measured = self.time(fn, [(args, b) for b in batches], (args, batches[0]))
        return self.case("low_rank" if low_rank else "generation", model, n, batch, measured,
                         batch_size=batch, padded_devices=len(batches) * batch, low_rank=low_rank,
                         path="prepared" if self.config.prepared else "plain",
                         heads="streamed: each batch's heads discarded once computed",
                         generated_values_per_device=duet.spec.num_values if not low_rank else None)

    def streamed(self, model: str, n: int, batch: int) -> dict:
        """``n`` heads generated in calls of ``batch`` devices whose trigger sequences are
        drawn inside each call (``jax.random``, from the seed and the call's index) and whose
        heads are dropped: nothing per device is kept on the host or the accelerator beyond
        one call's arrays, so memory stays flat however large ``n`` is (the other cases
        place every sequence before timing: ~260 bytes per device). One timed pass after one
        warm-up call, with the process's peak RSS over it."""
        c = self.config
        _, fn, args = self.generator_fn(model)
        calls = -(-n // batch)

        def call(args, key, index):
            key = jax.random.fold_in(key, index)
            return fn(args, scaling.random_sequences_on_device(key, batch, c.seq_len,
                                                               c.num_items))

        compiled, compile_s = self.compile(call, args, self.key, np.int32(0))
        jax.block_until_ready(compiled(args, self.key, np.int32(0)))  # warm
        # the call arguments made as the pass goes (nothing per device held beforehand)
        run = timing.pipelined_pass(compiled, ((args, self.key, np.int32(i)) for i in tqdm(
            range(calls), desc=f"{model} streamed N={n:,}", unit="call",
            disable=not c.progress or calls < 1000, leave=False)))
        timing.reset_peak_rss()
        rss_before = timing.current_rss_bytes()
        started = time.perf_counter()
        run()
        seconds = time.perf_counter() - started
        return {"case": "streamed", "model": model, "num_devices": n, "batch_size": batch,
                "per_call_devices": batch, "calls": calls, "padded_devices": calls * batch,
                "path": "prepared" if c.prepared else "plain",
                "devices_per_s": calls * batch / seconds, "seconds": seconds,
                "compile_s": compile_s, "rss_before_bytes": rss_before,
                "peak_rss_bytes": timing.peak_rss_bytes(),
                "device_memory": timing.device_memory(),
                "heads": "dropped call by call; sequences drawn inside each call"}

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
        compiled, compile_s = self.compile(single, params, seqs[0])

        def run():
            for s in seqs:
                jax.block_until_ready(compiled(params, s))

        case = self._timed_loop("loop", model, n, run, compiled, compile_s,
                                lambda: jax.block_until_ready(compiled(params, seqs[0])),
                                lambda: timing.matmul_flops(single, params, seqs[0]))
        case["paired_with_vmap"] = self._paired_with_vmap(model, n, run)
        return case

    def _paired_with_vmap(self, model: str, n: int, loop_pass: Callable[[], None]) -> dict:
        """The loop and jit+vmap generation of the same N devices (in batches of
        ``batch_size``) timed alternately, round by round, each round's ratio kept: a change
        in the machine's load between two separately timed cases (minutes apart) moves
        their ratio, but hits both halves of a round alike."""
        duet, params = self.duet(model)
        batches = self.batches(n, self.config.batch_size)
        compiled, _ = self.compile(duet.generate, params, batches[0])
        vmap_pass = timing.pipelined_pass(compiled, [(params, b) for b in batches])
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

    def _timed_loop(self, kind: str, model: str, n: int, run: Callable[[], None], compiled,
                    compile_s: float, warmup: Callable[[], None], matmul: Callable[[], dict],
                    **extra) -> dict:
        """A case whose pass ``run`` calls a single-device function once per device."""
        return self.case(kind, model, n, 1,
                         self._measure(run, compiled, compile_s, warmup, matmul), **extra)

    def _paired_passes(self, passes: dict[str, Callable[[], None]]) -> dict[str, list[float]]:
        """Seconds of each pass in ``paired_rounds`` rounds, timed alternately (the order
        reversed every other round), so load changes hit every pass alike; each pass is run
        once first (warm-up)."""
        for run in passes.values():
            run()
        times: dict[str, list[float]] = {name: [] for name in passes}
        order = list(passes)
        for r in range(self.config.paired_rounds):
            for name in order if r % 2 == 0 else order[::-1]:
                started = time.perf_counter()
                passes[name]()
                times[name].append(time.perf_counter() - started)
        return times

    def _generation_pass(self, model: str, batches: list, encoder: str = "gru",
                         prepared: bool | None = None,
                         vector_width: int | None = None) -> Callable[[], None]:
        _, fn, args = self.generator_fn(model, encoder=encoder, prepared=prepared)
        compiled, _ = self.compile(fn, args, batches[0], vector_width=vector_width)
        return timing.pipelined_pass(compiled, [(args, b) for b in batches])

    def encoders(self, model: str, n: int, batch: int) -> list[dict]:
        """Generation with each opt-in encoder against the default GRU on the same ``n``
        devices, timed alternately in ``paired_rounds`` rounds (ratio: GRU seconds / theirs)."""
        batches = self.batches(n, batch)
        times = self._paired_passes({e: self._generation_pass(model, batches, e)
                                     for e in ("gru", *OPTIONAL_ENCODERS)})
        return [_paired_row("encoder_option", model, n, batch, times, "gru", encoder,
                            encoder=encoder, path="prepared" if self.config.prepared else "plain")
                for encoder in OPTIONAL_ENCODERS]

    def prepared_vs_plain(self, model: str, n: int, batch: int) -> dict:
        """``Duet.generate_prepared`` (per-item tables made once) against ``Duet.generate``
        (everything per device) on the same ``n`` devices, paired rounds (ratio: plain
        seconds / prepared seconds)."""
        batches = self.batches(n, batch)
        times = self._paired_passes({
            "plain": self._generation_pass(model, batches, prepared=False),
            "prepared": self._generation_pass(model, batches, prepared=True)})
        tables = self.prepared(model)[1]
        return _paired_row("prepared", model, n, batch, times, "plain", "prepared",
                           tables=sorted(k for k in tables if k != "params"),
                           table_bytes=int(sum(x.nbytes for k, v in tables.items()
                                               if k != "params" for x in jax.tree.leaves(v))))

    def vector_width(self, model: str, n: int, batch: int) -> dict:
        """Generation compiled with ``config.cpu_vector_width`` against XLA's default CPU
        vector width (256 bits) on the same ``n`` devices, paired rounds (ratio: default
        seconds / ours). On a non-CPU backend both passes compile alike (ratio ~1)."""
        batches = self.batches(n, batch)
        width = self.config.cpu_vector_width
        times = self._paired_passes({
            "default": self._generation_pass(model, batches, vector_width=0),
            "ours": self._generation_pass(model, batches, vector_width=width)})
        return _paired_row("vector_width", model, n, batch, times, "default", "ours",
                           vector_width=width, backend=jax.default_backend(),
                           path="prepared" if self.config.prepared else "plain")

    def accelerators(self, model: str, n: int, batch: int) -> dict:
        """Generation with each batch split over this process's accelerators (on a CPU, its
        cores as XLA devices: ``--xla_force_host_platform_device_count``), each running the
        generator on its own rows as the sharded cloud does (:func:`duet_jax.sharding.per_row`,
        so with the prepared tables each orders its own rows by length), against one
        accelerator on the same ``n`` devices, paired rounds (ratio: one accelerator's
        seconds / the split's). A skipped row where the process has one accelerator."""
        mesh = sharding.device_mesh(devices=jax.local_devices())
        if mesh.size < 2:
            return {"case": "generation_split", "model": model, "batch_size": batch,
                    "skipped": True, "note": "one accelerator in this process: nothing to "
                    "split over (on a CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N)"}
        duet, fn, args = self.generator_fn(model)
        batches = self.batches(n, batch)
        split_fn = sharding.per_row(fn, mesh, out_specs=sharding.head_specs(duet))
        split_args = sharding.replicate(args, mesh)
        split_batches = [sharding.shard_devices(np.asarray(b), mesh) for b in batches]
        compiled, _ = self.compile(split_fn, split_args, split_batches[0])
        times = self._paired_passes({
            "one": self._generation_pass(model, batches),
            "split": timing.pipelined_pass(compiled, [(split_args, b) for b in split_batches])})
        return _paired_row("generation_split", model, n, batch, times, "one", "split",
                           accelerators=mesh.size,
                           path="prepared" if self.config.prepared else "plain",
                           heads="streamed: each batch's heads discarded once computed")

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
        """DUET's adaptation (generating the heads of ``finetune.devices`` devices, in groups
        of ``group_size``) against ``k`` Adam steps of fine-tuning, vmapped in groups and
        one device at a time, for each ``k`` of ``finetune.steps``."""
        ft = self.config.finetune
        group = ft.group_size
        duet, _ = self.duet(model)
        base = duet.model.init(jax.random.fold_in(self.key, 7))
        # head mode: train the head, backbone fixed; all: train everything
        head, backbone = (base["head"], base["backbone"]) if ft.params == "head" else (base, None)
        lr = jnp.float32(ft.learning_rate)
        groups = -(-ft.devices // group)
        rows = self.tune_rows(groups * group)
        # each group's (item_rows, rows) as the library fine-tunes it: in "all" mode a device
        # carries only the item rows it reads (finetune.group_inputs), padded to one width so
        # that one compiled function serves every group
        vmapped = _group_inputs(duet.model, ft.params, [
            jax.tree.map(lambda x, g=g: x[g * group:(g + 1) * group], rows)
            for g in range(groups)])
        singles = _group_inputs(duet.model, ft.params, [
            jax.tree.map(lambda x, d=d: x[d:d + 1], rows) for d in range(ft.loop_devices)])
        # every call's arguments, made once for all k; the first of each list compiles
        vmapped_args = [(head, backbone, b, lr, r) for b, r in vmapped]
        single_args = [(head, backbone, b, lr, r) for b, r in singles]
        out = [self.generation(model, ft.devices, group) | {"case": "duet_adapt"}]
        for steps in ft.steps:
            fn = functools.partial(_finetune, duet.model, ft.params, steps)
            measured = self.time(fn, vmapped_args, vmapped_args[0])
            out.append(self.case("finetune_vmap", model, ft.devices, group, measured,
                                 steps=steps, group_size=group, rows_per_device=ft.num_samples,
                                 params=ft.params, padded_devices=groups * group,
                                 local_item_rows=_width(vmapped[0][1])))
            compiled, compile_s = self.compile(fn, *single_args[0])

            def run(compiled=compiled):
                for args in single_args:
                    jax.block_until_ready(compiled(*args))

            out.append(self._timed_loop(
                "finetune_loop", model, ft.loop_devices, run, compiled, compile_s,
                lambda compiled=compiled: jax.block_until_ready(compiled(*single_args[0])),
                lambda fn=fn: timing.matmul_flops(fn, *single_args[0]),
                steps=steps, group_size=1, rows_per_device=ft.num_samples, params=ft.params,
                local_item_rows=_width(singles[0][1])))
        return out

    # ---------------------------------------------------------------- scaling

    def scaling(self) -> list[dict]:
        """Sharded generation on 1, 2, 4, ... of this machine's accelerators (all processes'
        in a multi-host run), then on fake CPU devices in subprocesses (CPU, one process)."""
        sc = self.config.scaling
        kwargs = dict(model=sc.model, num_items=self.config.num_items,
                      seq_len=self.config.seq_len, embed_dim=self.config.embed_dim,
                      devices=sc.devices, per_accelerator_batch=sc.per_accelerator_batch,
                      repeats=self.config.repeats, seed=self.config.seed)
        count = len(jax.devices())
        # a multi-host run measures the mesh over every process's accelerators (a mesh that
        # leaves a process out is refused); its speed-up is against the same case run as one
        # process, which is another run
        counts = ([count] if jax.process_count() > 1 else
                  sorted({c for c in (1, 2, 4, 8, 16, 32, 64, count) if c <= count}))
        rows = [scaling.measure(**kwargs, num_accelerators=c) | {"fake": False}
                for c in counts]
        if jax.process_count() == 1 and jax.default_backend() == "cpu":
            for c in sc.fake_devices:
                rows.append(scaling.run_fake(c, kwargs) | {
                    "fake": True,
                    "note": f"{c} fake CPU devices sharing {os.cpu_count()} cores: this "
                            "shows sharding overhead, not speed-up"})
        single = [row["devices_per_s"] for row in rows if row["accelerators"] == 1]
        for row in rows:
            row.update(case="scaling", model=sc.model,
                       speedup_vs_1=row["devices_per_s"] / single[0] if single else None)
        return rows


def _paired_row(kind: str, model: str, n: int, batch: int, times: dict[str, list[float]],
                reference: str, name: str, **extra) -> dict:
    """A row comparing pass ``name`` with pass ``reference`` from :meth:`Bench._paired_passes`
    (``speedup``: per-round ``reference`` seconds / ``name`` seconds, median and range)."""
    ratios = [r / o for r, o in zip(times[reference], times[name], strict=True)]
    return {"case": kind, "model": model, **extra, "num_devices": n, "batch_size": batch,
            "per_call_devices": batch,
            "devices_per_s": n / float(np.median(times[name])),
            f"{reference}_devices_per_s": n / float(np.median(times[reference])),
            "seconds": times[name], f"{reference}_seconds": times[reference],
            f"speedup_vs_{reference}": {"median": float(np.median(ratios)), "min": min(ratios),
                                        "max": max(ratios), "per_round": ratios}}


def _finetune(model, mode, steps, trainable, fixed, tune_batch, lr, item_rows=None):
    """``finetune_params`` with the fixed arguments first, for ``functools.partial``."""
    return finetune.finetune_params(model, mode, trainable, fixed, tune_batch, lr, steps,
                                    item_rows)


def _width(item_rows) -> int | None:
    """Item rows a fine-tuned device carries (``item_rows [G, V]``: V); None: the table."""
    return None if item_rows is None else int(item_rows.shape[1])


def _group_inputs(model, mode: str, groups: list[dict]) -> list[tuple[Any, Any]]:
    """``[(rows, item_rows)]`` placed on the device, one per group of ``groups``, as
    :func:`duet_jax.finetune.group_inputs` makes them (``item_rows`` None where fine-tuning
    reads the whole item table), every ``item_rows`` padded with 0 (padding's row, which no
    renumbered id names) to the widest group's width: one shape, one compilation."""
    made = [finetune.group_inputs(model, mode, g) for g in groups]
    if made[0][0] is None:
        return [(jax.device_put(batch), None) for _, (batch,) in made]
    width = max(item_rows.shape[1] for item_rows, _ in made)
    return [(jax.device_put(batch),
             jax.device_put(np.pad(item_rows, ((0, 0), (0, width - item_rows.shape[1])))))
            for item_rows, (batch,) in made]


def tasks(bench: Bench) -> list[tuple[str, Callable[[], list[dict]]]]:
    """Every case as ``(label, thunk)``, in the order they run; each generation (N, B)
    measured once even where several comparisons use it."""
    c = bench.config
    models = [m.strip() for m in c.models.split(",")]
    groups = {g.strip() for g in c.cases.split(",")}
    unknown = groups - CASE_GROUPS
    if unknown:
        raise ConfigError("config.cases", c.cases,
                          f"comma-separated names from {sorted(CASE_GROUPS)}")
    # cases that split each batch over this process's accelerators need batch sizes that
    # split evenly: refused here, before any case runs, rather than midway
    accelerators = jax.local_device_count()
    for group, field, sizes in (
            ("accelerators", "batch_sizes", tuple(c.batch_sizes)),
            ("torch_reference", "torch_reference.batch_sizes",
             tuple(c.torch_reference.batch_sizes))):
        if group in groups and any(b % accelerators for b in sizes):
            raise ConfigError(f"config.{field}", sizes,
                              f"multiples of this process's {accelerators} accelerators, "
                              f"which each batch is split over (case group {group})")
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
        if "encoders" in groups:
            out.append((f"{m} opt-in encoders", lambda m=m: bench.encoders(
                m, c.split_devices, c.batch_size)))
        if "prepared" in groups:
            out.append((f"{m} prepared vs plain", lambda m=m: [bench.prepared_vs_plain(
                m, c.split_devices, c.batch_size)]))
        if "streamed" in groups:
            for n in c.streamed_devices:
                out.append((f"{m} streamed N={n:,}", lambda m=m, n=n: [
                    bench.streamed(m, n, c.streamed_batch_size)]))
        if "accelerators" in groups:
            out.append((f"{m} split over accelerators", lambda m=m: [
                bench.accelerators(m, c.batch_sweep_devices, b) for b in c.batch_sizes]))
        if "vector_width" in groups:
            out.append((f"{m} CPU vector width", lambda m=m: [
                bench.vector_width(m, c.batch_sweep_devices, b) for b in c.batch_sizes]))
    if "torch_reference" in groups:  # the authors' PyTorch design, side by side
        out.append(("torch reference", lambda: torch_reference.case_rows(bench)))
    if "scaling" in groups:
        out.append(("scaling", bench.scaling))
    if "vision" in groups:  # the image task's MobileNet-style head, set encoder
        out += vision_case.tasks(bench)
    return out
