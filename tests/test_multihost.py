"""Multi-host for real: two JAX processes on this machine (``jax.distributed`` over
127.0.0.1, one CPU device each, gloo collectives) generate heads with each process placing
only its share of the rows, and run the benchmark's scaling case; the results equal one
process's."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

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
