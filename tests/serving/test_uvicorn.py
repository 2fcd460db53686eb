"""On a real uvicorn server over localhost TCP: the fleet over HTTP equals the in-process
fleet, and a shutdown lets in-flight requests finish."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import httpx
import numpy as np
import pytest
import uvicorn

from duet_jax.fleet import FleetConfig, Simulator, build_streams
from duet_jax.serving import Engine, RemoteCloud, ServerConfig, create_app, load_run
from experiments import experiment
from tests.conftest import tiny_config
from tests.serving.conftest import write_run
from tests.serving.test_app import SlowEngine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(app, grace_s: int = 30):
    """``app`` on uvicorn in a thread at a free localhost port -> (url, server)."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning",
                                           timeout_graceful_shutdown=grace_s))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}", server
    finally:
        server.should_exit = True
        thread.join(60)


def test_fleet_over_http_equals_the_in_process_fleet(tmp_path):
    """Same heads, so the same predictions, bit for bit: the fleet's cloud and the server
    both generate in calls of exactly 64 rows (min_bucket = max_bucket = the server's
    max_batch), so both run the same compiled program on the same rows. (With calls of
    other sizes XLA may block a matmul differently: on an AVX2 CPU heads then differ by a
    float32 rounding, 2e-8.)"""
    config = tiny_config()
    data = experiment.load_data(config)
    run_dir = str(tmp_path / "duet")
    write_run(run_dir, "sasrec", num_items=data.num_items, seq_len=config.seq_len, seed=5)
    run = load_run(run_dir)
    fc = FleetConfig(progress=False, min_bucket=64, max_bucket=64, score_batch_size=128,
                     base=False,
                     policies=("every_round", "every_k_items"), formats=("float32", "int8"))
    streams = build_streams(data.test, num_rounds=3)
    local = Simulator(streams, run.duet, run.params, fc)
    engine = Engine(run, max_batch=64, min_bucket=64, uploads=("ids",), formats=("float32",))
    with serving(create_app(engine, ServerConfig(max_batch=64))) as (url, _):
        cloud = RemoteCloud(url, run.duet, run.params, "ids", min_bucket=64)
        remote = Simulator(streams, run.duet, run.params, fc, cloud=cloud)
        for policy in fc.policies:
            want, got = local.run_policy(policy), remote.run_policy(policy)
            assert sum(r["requests"] for r in got.records) > 64  # several chunks
            for fmt in fc.formats:
                np.testing.assert_array_equal(got.logits[fmt], want.logits[fmt])
            np.testing.assert_array_equal(got.requests, want.requests)
        other = dict(run.params, generator=jax_tree_plus_one(run.params["generator"]))
        with pytest.raises(ValueError, match="not these parameters"):
            RemoteCloud(url, run.duet, other, "ids")


def jax_tree_plus_one(tree):
    import jax

    return jax.tree.map(lambda x: np.asarray(x) + 1, tree)


def test_shutdown_completes_in_flight_requests(engine):
    slow = SlowEngine(engine)
    slow.warm.set()
    with serving(create_app(slow, ServerConfig(max_batch=4))) as (url, server):
        while httpx.get(url + "/readyz").status_code != 200:
            time.sleep(0.05)
        slow.go.clear()
        answers = []

        def call():
            answers.append(httpx.post(url + "/v1/generate", json={"ids": [1] * engine.seq_len},
                                      timeout=60))

        caller = threading.Thread(target=call)
        caller.start()
        assert slow.started.wait(30)
        server.should_exit = True  # what SIGTERM does
        time.sleep(0.3)
        with pytest.raises(httpx.HTTPError):  # no new connections once shutting down
            httpx.get(url + "/healthz", timeout=2)
        slow.go.set()
        caller.join(60)
    assert [r.status_code for r in answers] == [200]
    assert answers[0].json()["rows"] == 1
