"""Throughput benchmark (``python -m experiments.benchmark``): what is measured, how big, how
often. ``--config.quick=True`` shrinks every case to finish in under 2 minutes on 2 CPU
cores (same cases, small sizes, few repeats); the full run took 12 minutes there (load ~5).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.quick = False  # the small variant: every case, small sizes, few repeats
    config.seed = 0
    config.models = "sasrec,gru4rec,din"  # comma-separated
    # comma-separated case groups to run: generation (N and B sweeps), stages (encoder /
    # decoder), low_rank, loop (Python loop; also runs generation at loop_devices),
    # adaptation (DUET vs fine-tuning), scaling
    config.cases = "generation,stages,low_rank,loop,adaptation,scaling"
    # device model sizes (the authors': D = 32, sequences of 30); a random item vocabulary
    config.num_items = 10_000
    config.seq_len = 30
    config.embed_dim = 32

    config.repeats = 5  # timed passes per case after the warm-up pass
    config.min_repeats = 3  # a slow case (pass > case_budget_s / repeats) still gets these
    config.case_budget_s = 60.0  # seconds of timed passes a case aims at

    # head generation: N devices streamed through jit(generate) in batches of B (the last
    # padded); each batch's heads are discarded once computed (1e6 SASRec heads = 8.4 GB)
    config.num_devices = (1_000, 10_000, 100_000, 1_000_000)
    # B of the N sweep, the split and the comparisons: 256 was the fastest in the batch
    # sweep on 2 CPU cores (larger batches spill the heads out of cache; DIN's head is 66 KB)
    config.batch_size = 256
    # the batch sweep (1024 and 4096 are the PyTorch reference's sizes, DESIGN.md §5), at
    # batch_sweep_devices = 2^16 so that no batch size pads
    config.batch_sizes = (64, 256, 1024, 4096)
    config.batch_sweep_devices = 65_536
    config.split_devices = 65_536  # encoder / decoder split and full vs low-rank, at B
    config.low_rank = 8  # k of the low-rank decoders (0 = skip that case)
    config.loop_devices = 10_000  # jit+vmap vs a Python loop of the jitted single device
    # rounds of the paired comparison: loop and jit+vmap over the same loop_devices timed
    # alternately, so that the machine's load changes hit both alike
    config.paired_rounds = 7

    # DUET adaptation vs on-device fine-tuning (head mode, Adam, as duet_jax.finetune)
    config.finetune = ml_collections.ConfigDict()
    config.finetune.steps = (5, 20, 50)  # k
    config.finetune.params = "head"  # head (backbone features computed once) | all
    config.finetune.learning_rate = 1e-3
    config.finetune.num_samples = 64  # labelled rows a device fine-tunes on
    config.finetune.group_size = 64  # devices per vmapped group
    config.finetune.devices = 1024  # devices fine-tuned in vmapped groups
    config.finetune.loop_devices = 128  # devices fine-tuned one at a time (authors' code)

    # XLA cost analysis and the machine's peaks
    config.peak_matmul_size = 2048
    config.peak_bandwidth_mb = 256

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
    config.scaling.devices = 4_096
    config.scaling.per_accelerator_batch = 512
    config.scaling.fake_devices = (2,)
    return config
