"""The authors' generator design in PyTorch, timed side by side with ours (case
``torch_reference``).

What both sides compute, for a batch of B devices and a model's head (D = 32, L = 30):
item ids ``[B, L]`` -> embedding -> ``Dense(D, tanh)`` -> GRU (state at the last valid step)
-> ``Dense(D, tanh) -> Dense(D)`` = ``z [B, D]`` -> the head's dense layers written from
``z`` (per layer ``W = z @ w1 + b1`` reshaped ``[B, in, out]``, ``b = z @ w2 + b2``) and
applied to one input vector per device, ``tanh`` after every layer but the last: SASRec's
head ``32 -> 32 -> 32`` (2,112 values), DIN's ``64 -> 128 -> 64 -> 1`` (16,641 values).

:class:`TorchGenerator` follows the design of the authors' public ``HyperNetwork_FC``
(``torch.nn.GRU`` over the whole padded sequence, a gather at the last valid position, a
``StackedDense`` to ``z``, one ``matmul`` per generated tensor and ``torch.bmm`` per head
layer), written here from that description. Ours is ``jit(Duet.generate_prepared)`` for
SASRec (``Duet.generate`` is timed in the same rounds too) followed by the generated head on
the user vector (SASRec's ``embed_sequence`` also adds a
position embedding: one add, kept so that ours is exactly the generator the project
ships). :func:`load_ours_into` copies our parameters into the torch module, so the test can
check that both compute the same function.

torch is an optional, benchmark-only dependency: this module imports it lazily, and the
case is skipped (with a note in ``benchmark.json``) where it is not installed.

Method: both sides get the same ids and user vectors, already in memory in each framework's
own array type; the torch side runs under ``torch.inference_mode()`` with
``torch.set_num_threads(T)``, where T is the size of this process's CPU affinity mask, which
is also how many cores XLA-CPU's thread pool uses. Each side is warmed up at every batch
size; a short sweep picks each side's best batch size; then ``paired_rounds`` rounds time
the reference at its best batch, ours at the same batch and ours at its best batch, in an
order that alternates from round to round, and report each round's ratio (median, range).
A process with several accelerators (on a CPU, its cores as XLA devices:
``XLA_FLAGS=--xla_force_host_platform_device_count=N``) also times ours with each batch
split over all of them (:func:`duet_jax.sharding.per_row`), swept and paired the same way.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from duet_jax import duet as duet_lib
from duet_jax import sharding, timing
from duet_jax.duet import Duet
from duet_jax.models import layers

MODEL = "sasrec"  # the head of the summary's headline comparison (and the 3x target)


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def cpu_threads() -> int:
    """Cores this process may run on (its affinity mask): XLA-CPU sizes its pool by it."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def head_units(duet: Duet) -> tuple[int, ...]:
    """The widths of ``duet``'s head, ``(in, out_1, ..., out_K)``, for a head of dense layers
    ``dense1 .. denseK`` (SASRec ``(32, 32, 32)``, DIN ``(64, 128, 64, 1)``); ValueError for
    another structure."""
    template = duet.model.head_template()
    names = [f"dense{i + 1}" for i in range(len(template))]
    if sorted(template) != sorted(names) or any(
            sorted(template[n]) != ["bias", "kernel"] for n in names):
        raise ValueError(f"the torch reference writes heads of dense layers dense1..denseK; "
                         f"model {duet.model.name!r} has head {sorted(template)}")
    return (template["dense1"]["kernel"].shape[0],
            *(template[n]["kernel"].shape[1] for n in names))


def build_torch_generator(num_items: int, dim: int, seed: int = 0,
                          units: tuple[int, ...] | None = None):
    """A :class:`TorchGenerator` (defined inside, so importing this module needs no torch)
    writing a head of widths ``units`` (:func:`head_units`; default ``(dim, dim, dim)``)."""
    import torch

    units = tuple(units or (dim, dim, dim))

    class TorchGenerator(torch.nn.Module):
        """ids ``[B, L]`` (int64), input ``[B, units[0]]`` -> the generated head's output
        ``[B, units[-1]]``.

        Layout as the authors': ``torch.nn.GRU(batch_first=True)``, decoders ``w1 [Z, in*out]``,
        ``b1 [in*out]``, ``w2 [Z, out]``, ``b2 [out]`` per head layer, init ``fmod(N(0,1), 2)``.
        """

        def __init__(self):
            super().__init__()
            self.embedding = torch.nn.Embedding(num_items + 1, dim, padding_idx=0)
            self.seq_trans = torch.nn.Linear(dim, dim)
            self.gru = torch.nn.GRU(dim, dim, batch_first=True)
            self.mlp1 = torch.nn.Linear(dim, dim)
            self.mlp2 = torch.nn.Linear(dim, dim)
            fmod = lambda *shape: torch.nn.Parameter(torch.fmod(torch.randn(*shape), 2))
            layers = range(len(units) - 1)
            self.w1 = torch.nn.ParameterList(
                [fmod(dim, units[i] * units[i + 1]) for i in layers])
            self.b1 = torch.nn.ParameterList([fmod(units[i] * units[i + 1]) for i in layers])
            self.w2 = torch.nn.ParameterList([fmod(dim, units[i + 1]) for i in layers])
            self.b2 = torch.nn.ParameterList([fmod(units[i + 1]) for i in layers])
            self.units = units

        def forward(self, seq, user):
            batch = seq.shape[0]
            lengths = torch.clamp((seq != 0).sum(dim=1) - 1, min=0)
            h = torch.tanh(self.seq_trans(self.embedding(seq)))
            states, _ = self.gru(h)
            last = states[torch.arange(batch), lengths]
            z = self.mlp2(torch.tanh(self.mlp1(last)))
            x = user
            last = len(self.units) - 2
            for i in range(last + 1):
                weight = (z @ self.w1[i] + self.b1[i]).view(batch, self.units[i],
                                                            self.units[i + 1])
                bias = z @ self.w2[i] + self.b2[i]
                x = torch.bmm(x.unsqueeze(1), weight).squeeze(1) + bias
                if i < last:
                    x = torch.tanh(x)
            return x

    torch.manual_seed(seed)
    return TorchGenerator().eval()


def ours_fn(duet: Duet, prepared: bool = False, by_length: bool = False) -> Callable:
    """``(params, seq [B, L], user [B, units[0]]) -> [B, units[-1]]``: generate heads, apply
    each to its device's input vector (the head's MLP, ``tanh`` after all but the last).
    ``prepared``: ``params`` is :meth:`Duet.prepare`'s output, generation reads its tables,
    and a batch above ``ENCODE_CHUNK`` runs chunk by chunk (what a cloud serving many
    devices does). ``by_length`` (with ``prepared``, for a model that allows the cut): the
    batch's devices are first ordered by trigger length (:func:`duet_jax.duet.in_length_order`),
    as :meth:`Duet.generate_prepared` and the cloud order them, so each chunk's encoder is
    cut after fewer steps; the outputs come back in the input's order."""
    generate = duet.generate_prepared if prepared else duet.generate
    depth = len(head_units(duet)) - 1
    activations = (jnp.tanh,) * (depth - 1) + (None,)

    def apply(params, seq, user):
        heads = generate(params, seq)
        return layers.mlp(heads, user, activations)

    if not prepared:
        return apply

    def fn(params, seq, user):
        # Each device's head is used at once, so a large batch runs in chunks of
        # ENCODE_CHUNK devices: the heads of one chunk stay in cache instead of B x 8.4 KB
        # of heads written and read back (34 MB at B = 4,096). The same numbers.
        run = lambda s, u: apply(params, s, u)
        if by_length and duet.model.cuts_trailing_padding:
            return duet_lib.in_length_order(run, seq, user)
        return duet_lib.in_chunks(run, seq, user)

    return fn


def load_ours_into(module, params: dict) -> None:
    """Copy our DUET parameters (a model whose sequence features are ``tanh(Dense(E[seq]))``,
    as GRU4Rec's and DIN's; SASRec adds a position embedding, which has no counterpart: zero
    it in ``params`` to compare outputs) into ``module`` (same function, PyTorch layout)."""
    import torch

    bb, gen = params["backbone"], params["generator"]["params"]
    enc = gen["encoder"]
    t = lambda x: torch.from_numpy(np.array(x, np.float32))
    with torch.no_grad():
        module.embedding.weight.copy_(t(bb["item_embedding"]))
        module.seq_trans.weight.copy_(t(bb["input_proj"]["kernel"]).T)
        module.seq_trans.bias.copy_(t(bb["input_proj"]["bias"]))
        module.gru.weight_ih_l0.copy_(t(enc["gru"]["kernel_ih"]).T)  # gate order r, z, n
        module.gru.weight_hh_l0.copy_(t(enc["gru"]["kernel_hh"]).T)
        module.gru.bias_ih_l0.copy_(t(enc["gru"]["bias_ih"]))
        module.gru.bias_hh_l0.copy_(t(enc["gru"]["bias_hh"]))
        for name, lin in (("dense1", module.mlp1), ("dense2", module.mlp2)):
            lin.weight.copy_(t(enc[name]["kernel"]).T)
            lin.bias.copy_(t(enc[name]["bias"]))
        for i, layer in enumerate(f"dense{k + 1}" for k in range(len(module.units) - 1)):
            kernel, bias = gen[f"decoder_{layer}__kernel"], gen[f"decoder_{layer}__bias"]
            module.w1[i].copy_(t(kernel["kernel"]))  # [Z, in*out], row-major as ours
            module.b1[i].copy_(t(kernel["bias"]))
            module.w2[i].copy_(t(bias["kernel"]))
            module.b2[i].copy_(t(bias["bias"]))


def _passes(n: int, batch: int, seq: np.ndarray, user: np.ndarray,
            ours: dict[str, tuple[Callable, Any, Mesh | None]], torch_module,
            compiler_options: dict | None = None
            ) -> tuple[Callable[[], None], dict[str, Callable[[], None]]]:
    """(torch pass, {name: our pass}) over the same ``n`` devices in batches of ``batch`` (the
    last padded with empty sequences), inputs placed before timing; ``ours`` maps a name to
    ``(fn, args, mesh)``, the function of :func:`ours_fn`, its first argument and ``None``
    (the default accelerator) or a mesh to split each batch over
    (:func:`duet_jax.sharding.per_row`), compiled with ``compiler_options``
    (:func:`duet_jax.xla_options.generation_options`)."""
    import torch

    calls = -(-n // batch)
    s = np.zeros((calls * batch, seq.shape[1]), np.int32)
    u = np.zeros((calls * batch, user.shape[1]), np.float32)
    s[:n], u[:n] = seq[:n], user[:n]
    host_in = [(s[i * batch:(i + 1) * batch], u[i * batch:(i + 1) * batch])
               for i in range(calls)]
    torch_in = [(torch.from_numpy(s[i * batch:(i + 1) * batch].astype(np.int64)),
                 torch.from_numpy(u[i * batch:(i + 1) * batch])) for i in range(calls)]

    def torch_pass():
        with torch.inference_mode():
            for sb, ub in torch_in:
                torch_module(sb, ub)

    def our_pass(fn, args, mesh):
        if mesh is None:
            inputs = [jax.device_put(b) for b in host_in]
        else:
            fn, args = sharding.per_row(fn, mesh, 2), sharding.replicate(args, mesh)
            inputs = [sharding.shard_devices(b, mesh) for b in host_in]
        compiled = jax.jit(fn, compiler_options=compiler_options or None).lower(
            args, *inputs[0]).compile()
        return timing.pipelined_pass(compiled, [(args, sb, ub) for sb, ub in inputs])

    return torch_pass, {name: our_pass(*entry) for name, entry in ours.items()}


def _seconds(run: Callable[[], None]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def compare(duet: Duet, params: dict, seq: np.ndarray, batch_sizes: tuple[int, ...],
            rounds: int, sweep_repeats: int = 2, seed: int = 0, torch_threads: int = 0,
            prepared: dict | None = None, compiler_options: dict | None = None,
            mesh: Mesh | None = None, by_length: bool = False) -> dict:
    """Time the torch reference against ours on the ``len(seq)`` devices ``seq [N, L]``.

    ``torch_threads``: 0 = as many as XLA-CPU uses (the affinity mask: threads pinned
    equal); another value is a probe (e.g. 1 on an oversubscribed machine, where torch's
    OpenMP threads wait on each other). ``prepared``: :meth:`Duet.prepare`'s output for
    ``params``; then ours generates from its tables (what the cloud serves), and
    ``Duet.generate`` without them is timed too, at the reference's batch, in the same
    rounds (``speedup_plain_same_batch``). Returns the sweep (seconds per pass at every
    batch size, best of ``sweep_repeats``, both sides warm), each side's best batch size
    and the paired rounds at those. Ours compiles with ``compiler_options``.

    ``mesh``: several accelerators of this process (on a CPU, the cores split into XLA
    devices with ``--xla_force_host_platform_device_count``); ours is then also timed with
    each batch split over them (:func:`duet_jax.sharding.per_row`), its own best batch
    found by the same sweep, in the same paired rounds (``speedup_split_*``).

    ``by_length`` (with ``prepared``, for a model whose encoder may be cut after a batch's
    longest trigger): ours orders each batch's devices by trigger length before its chunks,
    as the cloud does (:func:`ours_fn`); the unordered path is then also timed at the
    reference's batch in the same rounds (``speedup_unordered_same_batch``, and
    ``speedup_split_unordered_same_batch`` over a mesh), so the part of the ratio that comes
    from skipping padding stays visible. The reference always runs the whole padded
    sequence, as the authors' design does."""
    import torch

    threads = cpu_threads()
    torch.set_num_threads(torch_threads or threads)
    n, dim, units = len(seq), duet.model.config.embed_dim, head_units(duet)
    user = np.random.default_rng(seed + 1).normal(size=(n, units[0])).astype(np.float32)
    module = build_torch_generator(duet.model.config.num_items, dim, seed, units)
    ordered = by_length and prepared is not None and duet.model.cuts_trailing_padding
    args = params if prepared is None else prepared
    fn = ours_fn(duet, prepared is not None, by_length=ordered)
    ours = {"ours": (fn, args, None)}
    if mesh is not None and mesh.size > 1:
        if any(b % mesh.size for b in batch_sizes):
            raise ValueError(f"batch_sizes={batch_sizes}: each must be a multiple of the "
                             f"{mesh.size} accelerators it is split over")
        ours["ours_split"] = (fn, args, mesh)
    passes = {b: _passes(n, b, seq, user, ours, module, compiler_options)
              for b in batch_sizes}
    sweep: dict[str, dict[int, float]] = {"torch": {}, **{name: {} for name in ours}}
    for b, (torch_pass, our_passes) in passes.items():
        runs = [("torch", torch_pass), *our_passes.items()]
        for _, run in runs:
            run()  # warm: allocations, thread pools, caches
        for _ in range(sweep_repeats):  # alternate, so that load changes hit both
            for side, run in runs:
                s = _seconds(run)
                sweep[side][b] = min(sweep[side].get(b, float("inf")), s)
    best = {side: min(v, key=v.get) for side, v in sweep.items()}
    best_torch = best["torch"]
    order = [("torch", passes[best_torch][0])]
    for name in ours:  # ours (and ours_split) at torch's best batch and at its own
        order += [(f"{name}_same_batch", passes[best_torch][1][name]),
                  (f"{name}_best_batch", passes[best[name]][1][name])]
    extra = {}  # timed at torch's best batch only
    if prepared is not None:
        extra["ours_plain_same_batch"] = (ours_fn(duet), params, None)
    if ordered:
        unordered = ours_fn(duet, True)
        extra["ours_unordered_same_batch"] = (unordered, args, None)
        if "ours_split" in ours:
            extra["ours_split_unordered_same_batch"] = (unordered, args, mesh)
    if extra:
        _, more = _passes(n, best_torch, seq, user, extra, module, compiler_options)
        for name, run in more.items():
            run()  # warm
            order.append((name, run))
    times: dict[str, list[float]] = {name: [] for name, _ in order}
    for r in range(rounds):
        for name, run in order if r % 2 == 0 else order[::-1]:
            times[name].append(_seconds(run))

    def ratios(name: str) -> dict:
        per_round = [t / o for t, o in zip(times["torch"], times[name], strict=True)]
        return {"median": float(np.median(per_round)), "min": min(per_round),
                "max": max(per_round), "per_round": per_round}

    out = {
        "num_devices": n, "threads": threads, "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__, "rounds": rounds,
        "ours_path": "prepared" if prepared is not None else "plain",
        "ours_ordered_by_length": ordered,
        # what the ordering can skip: the reference runs all L steps for every device
        "trigger_steps_mean": float(np.mean(np.asarray(duet_lib.steps_needed(seq)))),
        "seq_len": int(seq.shape[1]),
        "ours_compiler_options": dict(compiler_options or {}),
        "sweep_s": {side: {str(b): s for b, s in v.items()} for side, v in sweep.items()},
        "sweep_devices_per_s": {side: {str(b): n / s for b, s in v.items()}
                                for side, v in sweep.items()},
        "torch_best_batch": best_torch, "ours_best_batch": best["ours"],
        "seconds": times,
        "devices_per_s": {name: n / float(np.median(t)) for name, t in times.items()},
        # each round: torch seconds / our seconds (> 1: ours faster)
        "speedup_same_batch": ratios("ours_same_batch"),
        "speedup_best_batch": ratios("ours_best_batch"),
    }
    for name in extra:
        out["speedup_" + name.removeprefix("ours_")] = ratios(name)
    if "ours_split" in ours:
        out.update(split_accelerators=mesh.size, ours_split_best_batch=best["ours_split"],
                   speedup_split_same_batch=ratios("ours_split_same_batch"),
                   speedup_split_best_batch=ratios("ours_split_best_batch"))
    return out


def case_rows(bench: Any) -> list[dict]:
    """The benchmark rows of this case (``bench``: :class:`experiments.benchmark.cases.Bench`);
    one row noting the skip where torch is not installed."""
    c = bench.config
    # the heads of torch_reference.models that this run benchmarks (config.models)
    run = {m.strip() for m in c.models.split(",")}
    models = [m for m in (m.strip() for m in c.torch_reference.models.split(",")) if m in run]
    if not torch_available():
        return [{"case": "torch_reference", "model": m, "skipped": True,
                 "note": "torch is not installed (pip install torch): case skipped"}
                for m in models]
    rows = []
    for model in models:
        duet, params = bench.duet(model)
        prepared = bench.prepared(model)[1] if c.prepared else None
        n = c.torch_reference.devices
        # a process with several accelerators (e.g. CPU cores as XLA devices) also splits
        # each batch over them; a multi-host run keeps to one process's own
        mesh = (sharding.device_mesh(devices=jax.local_devices())
                if jax.local_device_count() > 1 else None)
        result = compare(duet, params, bench.sequences(n),
                         tuple(c.torch_reference.batch_sizes), c.paired_rounds, seed=c.seed,
                         torch_threads=c.torch_reference.threads, prepared=prepared,
                         compiler_options=bench.compiler_options, mesh=mesh,
                         by_length=c.torch_reference.by_length)
        rows.append({"case": "torch_reference", "model": model, "num_devices": n,
                     "head_units": list(head_units(duet)),
                     "devices_per_s": result["devices_per_s"]["ours_best_batch"],
                     "per_call_devices": result["ours_best_batch"], **result})
    return rows


def _selfcheck() -> None:  # pragma: no cover - a manual smoke run
    from duet_jax.models import ModelConfig, get_model

    duet = Duet.create(get_model(MODEL, ModelConfig(num_items=1000)))
    params = duet.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    seq = rng.integers(1, 1001, size=(4096, duet.model.config.seq_len)).astype(np.int32)
    print(compare(duet, params, seq, (256, 1024), rounds=3)["speedup_best_batch"])


if __name__ == "__main__":  # pragma: no cover
    _selfcheck()
