"""Multi-host for real: two JAX processes on this machine (``jax.distributed`` over
127.0.0.1, one CPU device each, gloo collectives) generate heads with each process placing
only its share of the rows, run the benchmark's scaling case and a small fleet simulation
(its cloud's mesh spanning both processes); the results equal one process's."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from duet_jax import metrics
from tests import tolerances as tol

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
    env.pop("XLA_FLAGS", None)  # one CPU device per process
    return env


def _worker(out, *args) -> list[str]:
    return [sys.executable, "-m", "tests.multihost_worker", str(out), *map(str, args)]


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    address = f"127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen(_worker(two, address, 2, i), cwd=ROOT, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    single = subprocess.run(_worker(one), cwd=ROOT, env=_env(), capture_output=True,
                            text=True, timeout=300)
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    assert single.returncode == 0, single.stderr[-3000:]

    want, got = np.load(one / "heads.npz"), np.load(two / "heads.npz")
    assert sorted(want.files) == sorted(got.files) and len(want.files) == 4
    for name in want.files:
        assert got[name].shape == want[name].shape and got[name].shape[0] == 24
        # Each process runs the same compiled per-row computation on its own rows (no
        # cross-row arithmetic in generation), so rows are bitwise equal to one process's
        # except where XLA picks a different kernel for the smaller per-process batch:
        # float32 reassociation of dots of <= 33 terms on O(1) values, ~33 * 2^-24 * scale;
        # 1e-5 absolute bounds it at these sizes (heads are O(0.1)).
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-5)
    s1 = json.loads((one / "scaling.json").read_text())
    s2 = json.loads((two / "scaling.json").read_text())
    assert (s1["processes"], s2["processes"]) == (1, 2)
    assert (s1["accelerators"], s2["accelerators"]) == (1, 2)
    assert s1["global_batch"] == s2["global_batch"] == 32
    # the checksum sums the first global batch's 32 heads (32 * 144 values at these sizes),
    # across processes in the 2-process run: float32 sums of the same values in another
    # order differ by at most n * 2^-24 * sum|x| (n = 4608 terms); the per-row values
    # themselves differ by the 1e-5 above at most, n of them
    n = 32 * 144
    bound = n * 2.0**-24 * s1["heads_abs_checksum"] + n * 1e-5
    assert abs(s1["heads_checksum"] - s2["heads_checksum"]) <= bound
    assert s1["heads_abs_checksum"] > 1.0  # a real sum, not zeros
    assert s2["devices_per_s"] > 0 and s2["num_devices"] == 64
    _check_fleet(one, two)


# what a round record holds that is timing, not a result
TIMINGS = ("cloud_seconds", "encode_seconds", "cloud_us_per_request")


def _fleet_logits_atol(sizes: dict) -> float:
    """|a fleet logit of the 2-process run - the same logit of one process|.

    The request schedule never depends on the heads, and scoring is the same jitted
    computation on the same shapes on each process's own device; only generation differs:
    each bucket's rows are split over two devices instead of one, so XLA may sum in another
    order (rows never mix). A head value then differs within a pair bound over the
    generator's longest path (SASRec's sequence embedding E[seq] + P and input projection,
    the GRU, the decoders), and reaches the logit through the head (and the backbone's
    features, identical here, through the head as well): summing the generator's and the
    device model's roundings covers the path, as in tests/test_fleet.py."""
    d = sizes["embed_dim"]
    n = tol.generator_roundings(sizes["seq_len"], d, sizes["hidden_dim"], sizes["z_dim"],
                                embed=(1, d))
    n += tol.model_roundings("sasrec", d, sizes["seq_len"], sizes["num_heads"],
                             sizes["ffn_mult"])
    return float(tol.f32_pair_atol(n, tol.MODEL_SCALE))


def _auc_range(users, labels, logits, atol) -> dict[str, tuple[float, float]]:
    """The AUC and user AUC of any logits within ``atol`` of ``logits`` lie in these ranges.

    A (positive, negative) pair counts 1, 1/2 or 0 as its margin is > 0, = 0 or < 0: moving
    every positive down by ``atol`` and every negative up (then up and down) gives each
    pair's smallest (largest) possible count, and user AUC is an unweighted mean over users
    whose membership depends on labels only. (float32 rounding of a shifted value is
    monotone, so the bound holds whatever precision the metric reads.)"""
    shift = atol * (1.0 - 2.0 * np.asarray(labels, np.float64))  # - for positives
    lo, hi = logits + shift, logits - shift
    return {"auc": (metrics.auc(labels, lo), metrics.auc(labels, hi)),
            "uauc": (metrics.user_auc(users, labels, lo), metrics.user_auc(users, labels, hi))}


def _check_fleet(one, two):
    want, got = (json.loads((d / "fleet.json").read_text()) for d in (one, two))
    a, b = np.load(one / "fleet.npz"), np.load(two / "fleet.npz")
    assert want["sizes"] == got["sizes"] and sorted(a.files) == sorted(b.files)
    runs = {(r["fleet"], r["policy"]) for r in want["records"]}
    assert runs == {("ids", "every_round"), ("ids", "drift_threshold"), ("z", "every_k_items")}
    # the streams, request schedules and staleness are integers: exactly equal
    for name in a.files:
        if not name.endswith("/logits"):
            np.testing.assert_array_equal(b[name], a[name], err_msg=name)
    assert a["ids/every_round/requests"].sum() == 3 * 80  # 80 devices, each online 3 rounds
    assert 80 < a["z/every_k_items/requests"].sum() < 3 * 80  # k = 3: fewer requests
    atol = _fleet_logits_atol(want["sizes"])
    for fleet, policy in runs:
        np.testing.assert_allclose(b[f"{fleet}/{policy}/logits"], a[f"{fleet}/{policy}/logits"],
                                   rtol=0, atol=atol, err_msg=f"{fleet}/{policy}")
    # one record per (fleet, policy, round): counts and bytes exact, timings measured, the
    # round's AUCs within the range any logits within atol could give (plus the float64
    # mean of the per-user values)
    assert len(got["records"]) == len(want["records"]) == 3 * len(runs)

    def exact(record):
        return {k: v for k, v in record.items() if k not in (*TIMINGS, "auc", "uauc")}

    for w, g in zip(want["records"], got["records"], strict=True):
        assert exact(g) == exact(w)
        assert w["requests"] == 0 or g["cloud_seconds"] > 0
        rows = a["round"] == w["round"]
        logits = a[f"{w['fleet']}/{w['policy']}/logits"][rows].astype(np.float64)
        ranges = _auc_range(a["user"][rows], a["label"][rows], logits, atol)
        slack = tol.f64_atol(int(rows.sum()))
        for key, (low, high) in ranges.items():
            assert low - slack <= g[key] <= high + slack, (w, g, key, low, high)
            assert low - slack <= w[key] <= high + slack  # the range holds the value itself
        # and each run's record is the metric of the logits that run holds (same function,
        # same float32 inputs: equal)
        for record, out in ((w, a), (g, b)):
            run_logits = out[f"{w['fleet']}/{w['policy']}/logits"][rows]
            assert record["auc"] == metrics.auc(a["label"][rows], run_logits)
            assert record["uauc"] == metrics.user_auc(a["user"][rows], a["label"][rows],
                                                      run_logits)


@pytest.mark.slow
def test_fleet_job_on_two_processes(tmp_path):
    """``python -m experiments.fleet`` with the multi-host flags: process 0 trains in a
    child, both processes simulate with generation split over them, and process 0 alone
    writes and prints the results."""
    from tests.experiments.test_fleet_main import FLEET_TINY

    address = f"127.0.0.1:{_free_port()}"
    env = {**_env(), "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
    args = [f"--workdir={tmp_path}", *FLEET_TINY, "--config.fleet.policies=never,every_round",
            "--config.fleet.formats=float32", f"--coordinator_address={address}",
            "--num_processes=2"]
    procs = [subprocess.Popen([sys.executable, "-m", "experiments.fleet", *args,
                               f"--process_id={i}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
    out = json.loads((tmp_path / "fleet.json").read_text())
    fleet = out["fleet"]
    assert (fleet["processes"], fleet["jax_devices"], fleet["sharded"]) == (2, 2, True)
    assert set(out["training"]) == {"base", "duet"}
    assert {p.parent.parent.name for p in tmp_path.glob("train/*/checkpoints/*")} == {
        "base", "duet"}
    totals = {(t["policy"], t["format"]): t for t in out["totals"]}
    assert set(totals) == {("never", "float32"), ("every_round", "float32"), ("base", "static")}
    devices = fleet["devices"]
    assert totals["never", "float32"]["requests"] == devices == 60  # one sync each
    assert totals["every_round", "float32"]["requests"] > devices
    assert all(0.0 <= t["auc"] <= 1.0 for t in out["totals"])
    # process 0 printed the table; process 1 printed and wrote nothing of its own
    table = "| policy | format | requests/device |"
    assert table in outs[0] and table not in outs[1] and "fleet results written" not in outs[1]


@pytest.mark.slow
def test_benchmark_scaling_job_on_two_processes(tmp_path):
    """The documented multi-host benchmark command (``--config.cases=scaling``): the mesh
    spans both processes, and process 0 alone writes the results."""
    from tests.experiments.test_benchmark import TINY

    address = f"127.0.0.1:{_free_port()}"
    env = {**_env(), "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
    outs = [tmp_path / f"p{i}" for i in range(2)]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "experiments.benchmark", f"--workdir={outs[i]}", *TINY,
         "--config.cases=scaling", f"--coordinator_address={address}", "--num_processes=2",
         f"--process_id={i}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    result = json.loads((outs[0] / "benchmark.json").read_text())
    assert result["complete"] and result["environment"]["process_count"] == 2
    rows = [r for r in result["cases"] if r["case"] == "scaling"]
    # one row: the mesh over both processes' accelerators (no fake devices in multi-host)
    assert [(r["processes"], r["accelerators"], r["fake"]) for r in rows] == [(2, 2, False)]
    assert rows[0]["devices_per_s"] > 0 and rows[0]["speedup_vs_1"] is None
    assert not (outs[1] / "benchmark.json").exists()
