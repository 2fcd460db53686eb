"""The vision benchmark case runs and reports throughput (no speed asserted)."""

import math

import jax

from duet_jax.vision.model import vision_model
from experiments.benchmark import cases, vision_case
from experiments.configs import benchmark as bench_config


def test_vision_case_row():
    config = bench_config.get_config()
    config.num_devices = (8,)
    config.batch_size = 4
    config.repeats = 1
    config.min_repeats = 1
    config.case_budget_s = 1.0
    bench = cases.Bench(config)
    bench.peaks = {"matmul": {"flops_per_s": 1e9}, "bandwidth": {"bytes_per_s": 1e9}}
    (label, thunk), = vision_case.tasks(bench)
    assert label == "mobilenet generate N=8 B=4"
    row, = thunk()
    assert row["case"] == "vision_generation" and row["num_devices"] == 8
    assert row["padded_devices"] == 8 and row["generated_values_per_device"] == sum(
        x.size for x in jax.tree.leaves(vision_model().head_template()))
    assert math.isfinite(row["devices_per_s"]) and row["devices_per_s"] > 0
    assert math.isclose(row["ms_per_device"], 1e3 / row["devices_per_s"])
