"""Throughput benchmark: how fast the cloud writes heads for a simulated fleet, side by side.

    python -m experiments.benchmark --config=experiments/configs/benchmark.py --workdir=DIR
    python -m experiments.benchmark --config=experiments/configs/benchmark.py \
        --config.quick=True --workdir=DIR                   # < 2 minutes on 2 CPU cores

Writes ``DIR/benchmark.json`` (every case, the machine, versions, load average) and
``DIR/benchmark.png``. Cases (:mod:`.cases`), for each device model's head:

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
- ``scaling``: sharded generation over 1..n accelerators (and fake CPU devices, labelled;
  :mod:`.scaling`).

Each case reports compile time and the first (warm-up) call apart from ``repeats`` timed
passes (median, IQR, range), devices/s, ms per device, XLA's FLOPs and bytes per device with
the achieved fraction of this machine's measured peaks, and memory. :mod:`.summary` derives
the headline numbers (targets, speed-ups, ratios) and :mod:`.plots` draws them;
:mod:`.main` is the command line.

Multi-host: ``--coordinator_address=HOST:PORT --num_processes=P --process_id=I`` calls
``jax.distributed.initialize`` before anything else; the scaling case then spans every
process's accelerators, and process 0 writes the results.
"""
