"""Throughput benchmark (``python -m experiments.benchmark``): what is measured, how big, how
often. ``--config.quick=True`` shrinks every case to finish in under 2 minutes on 2 CPU
cores (same cases, small sizes, few repeats); the full run took 12 minutes there (load ~5).

Sizes that another part of the project owns are read from there, not written again: the
device model's (``duet_jax.models.ModelConfig``: the authors' D and sequence length),
fine-tuning's (``duet_jax.finetune.FinetuneConfig``), the low-rank k of the main job's
``duet_low_rank`` ablation, and the peak probes' sizes (``duet_jax.timing``).
"""

import inspect

import ml_collections

from duet_jax import timing, xla_options
from duet_jax.finetune import FinetuneConfig
from duet_jax.models import ModelConfig
from experiments.configs.common import base_config


def _default(fn, name: str):
    """The default of ``fn``'s parameter ``name``."""
    return inspect.signature(fn).parameters[name].default


def get_config() -> ml_collections.ConfigDict:
    model = ModelConfig(num_items=1)
    finetune = FinetuneConfig()
    config = ml_collections.ConfigDict()
    config.quick = False  # the small variant: every case, small sizes, few repeats
    config.seed = 0
    config.models = "sasrec,gru4rec,din"  # comma-separated
    # comma-separated case groups to run: generation (N and B sweeps), stages (encoder /
    # decoder), low_rank, loop (Python loop; also runs generation at loop_devices),
    # adaptation (DUET vs fine-tuning), scaling
    # torch_reference (the authors' PyTorch generator design against ours, paired rounds;
    # skipped, noted in the results, where torch is not installed); encoders (the opt-in
    # gru_bf16 and attention encoders against the GRU, paired rounds at split_devices, B)
    # prepared (generation from Duet.prepare's per-item tables against Duet.generate, paired)
    # vector_width (cpu_vector_width against XLA's default 256-bit vectors, paired, each B)
    # streamed (streamed_devices heads, sequences drawn in each call: peak RSS against N)
    # accelerators (each batch of batch_sizes split over the process's accelerators against
    # one, paired; a CPU's cores as XLA devices with
    # XLA_FLAGS=--xla_force_host_platform_device_count=N; skipped with one accelerator)
    config.cases = ("generation,stages,low_rank,loop,adaptation,torch_reference,encoders,"
                    "prepared,vector_width,streamed,scaling,accelerators")
    # generation, encoders, torch_reference: from Duet.prepare's per-item tables, made once per
    # parameter set as the cloud does (False: Duet.generate, all work per device)
    config.prepared = True
    # LLVM's preferred vector width on CPU for every compiled case (0 = XLA's default, 256);
    # the cloud's default, duet_jax.xla_options.CPU_VECTOR_WIDTH
    config.cpu_vector_width = xla_options.CPU_VECTOR_WIDTH
    # device model sizes: a random item vocabulary; D and L as the main job's models
    config.num_items = 10_000
    config.seq_len = model.seq_len
    # trigger lengths are uniform in min_trigger_length..seq_len (right-padded); seq_len:
    # every trigger full, where skipping trailing padding gains nothing (a control)
    config.min_trigger_length = 1
    config.embed_dim = model.embed_dim

    config.repeats = 5  # timed passes per case after the warm-up pass
    config.min_repeats = 3  # a slow case (pass > case_budget_s / repeats) still gets these
    config.case_budget_s = 60.0  # seconds of timed passes a case aims at

    # head generation: N devices streamed through jit(generate) in batches of B (the last
    # padded); each batch's heads are discarded once computed (1e6 SASRec heads = 8.4 GB)
    config.num_devices = (1_000, 10_000, 100_000, 1_000_000)
    # B of the N sweep, the split and the comparisons: 256 was the fastest in the batch
    # sweep on 2 CPU cores (larger batches spill the heads out of cache; DIN's head is 66 KB)
    config.batch_size = 256
    # the batch sweep (1024 and 4096 are the batch sizes of the authors' PyTorch code), at
    # batch_sweep_devices = 2^16 so that no batch size pads
    config.batch_sizes = (64, 256, 1024, 4096)
    config.batch_sweep_devices = 65_536
    # streamed: sequences drawn inside each call, heads dropped, one pass: memory flat in N
    # (1e8 takes ~7 minutes on 2 cores at 250k devices/s; add it with
    # --config.streamed_devices="(100000,1000000,10000000,100000000)")
    config.streamed_devices = (100_000, 1_000_000, 10_000_000)
    config.streamed_batch_size = 1024
    config.split_devices = 65_536  # encoder / decoder split and full vs low-rank, at B
    # k of the low-rank decoders, as the duet_low_rank ablation (0 = skip that case)
    config.low_rank = base_config().ablation.low_rank
    config.loop_devices = 10_000  # jit+vmap vs a Python loop of the jitted single device
    # rounds of the paired comparison: loop and jit+vmap over the same loop_devices timed
    # alternately, so that the machine's load changes hit both alike
    config.paired_rounds = 7

    # DUET adaptation vs on-device fine-tuning (Adam, as duet_jax.finetune; its defaults)
    config.finetune = ml_collections.ConfigDict()
    config.finetune.steps = (5, 20, 50)  # k
    config.finetune.params = finetune.params  # head (backbone features computed once) | all
    config.finetune.learning_rate = finetune.learning_rates[0]
    config.finetune.num_samples = finetune.num_samples  # labelled rows a device tunes on
    config.finetune.group_size = finetune.group_size  # devices per vmapped group
    config.finetune.devices = 1024  # devices fine-tuned in vmapped groups
    config.finetune.loop_devices = 128  # devices fine-tuned one at a time (authors' code)

    # the authors' PyTorch generator design (experiments/benchmark/torch_reference.py) against
    # ours on the same devices: each side's best of batch_sizes, then paired_rounds rounds
    config.torch_reference = ml_collections.ConfigDict()
    config.torch_reference.devices = 65_536
    config.torch_reference.batch_sizes = (256, 1024, 4096)  # 1024, 4096: the authors' batches
    # torch threads: 0 = as many as XLA-CPU uses (pinned equal); other values are probes
    config.torch_reference.threads = 0
    # ours orders each batch's devices by trigger length before its chunks, as the cloud does
    # (the unordered path is then also timed at the reference's batch); False: unordered only
    config.torch_reference.by_length = True
    # heads compared (comma-separated; those also in config.models): SASRec's is the
    # headline (the 3x target); DIN's 16,641-value head with the same method
    config.torch_reference.models = "sasrec,din"

    # XLA cost analysis and the machine's peaks
    config.peak_matmul_size = _default(timing.peak_matmul, "size")
    config.peak_bandwidth_mb = _default(timing.peak_bandwidth, "megabytes")

    # scaling over accelerators: the real ones (1..n, in-process), and fake CPU devices
    # (subprocesses with --xla_force_host_platform_device_count; on 2 cores they share the
    # same cores, so they show overhead, not speed-up)
    config.scaling = ml_collections.ConfigDict()
    config.scaling.model = "sasrec"
    config.scaling.devices = 65_536
    config.scaling.per_accelerator_batch = 1024
    config.scaling.fake_devices = (2, 4, 8)  # () = no fake-device runs
    config.progress = True
    return config


def quick(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The ``quick=True`` sizes (applied by the benchmark after command-line overrides)."""
    config.repeats = 3
    config.min_repeats = 2
    config.case_budget_s = 5.0
    config.num_devices = (1_000, 4_096)
    config.batch_sizes = (256, 1024)
    config.batch_sweep_devices = 4_096
    config.split_devices = 4_096
    config.loop_devices = 1_000
    config.paired_rounds = 3
    config.finetune.steps = (5,)
    config.finetune.devices = 128
    config.finetune.loop_devices = 16
    config.peak_matmul_size = 1024
    config.peak_bandwidth_mb = 64
    config.torch_reference.devices = 4_096
    config.torch_reference.batch_sizes = (256, 1024)
    config.scaling.devices = 4_096
    config.scaling.per_accelerator_batch = 512
    config.scaling.fake_devices = (2,)
    config.streamed_devices = (4_096,)
    config.streamed_batch_size = 1024
    return config
