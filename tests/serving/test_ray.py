"""The Ray Serve deployment on a local Ray instance (slow: Ray starts in tens of seconds)."""

from __future__ import annotations

import concurrent.futures
import os
import socket

import httpx
import numpy as np
import pytest

from duet_jax.serving import codec
from tests.serving.conftest import heads_atol

pytest.importorskip("ray.serve")


def test_replica_cores_are_disjoint_blocks_of_the_nodes_cores():
    from experiments.serve_ray import replica_cores

    available = [7, 2, 5, 3, 4]  # an affinity mask, in any order
    assert replica_cores(0, 1, available) == [2]
    assert replica_cores(1, 2, available) == [4, 5]  # blocks of ceil(2) after [2, 3]
    assert replica_cores(1, 1.5, available) == [4, 5]  # 1.5 CPUs take 2 whole cores
    assert replica_cores(0, 0.25, available) == [2]  # at least one core
    assert replica_cores(2, 2, available) is None  # only 5 cores: no third block of 2
    with pytest.raises(ValueError, match="local_rank -1"):
        replica_cores(-1, 1, available)


@pytest.mark.slow
# ray.init starts its processes with subprocess, whose fork is followed at once by exec in
# the child: JAX's warning about forking a multithreaded process does not apply there
@pytest.mark.filterwarnings(r"ignore:os\.fork\(\) was called:RuntimeWarning")
def test_ray_serve_answers_like_the_engine(run_dir, engine):
    import ray
    from ray import serve

    from experiments.serve_ray import deployment

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # two replicas, each pinned to its own core where the machine has two
        handle = serve.run(deployment(run_dir, replicas=2, max_batch=4, uploads=("ids", "z"),
                                      formats=("float32",), pin_cores=True),
                           name="duet", route_prefix="/v1/generate")
        url = f"http://127.0.0.1:{port}/v1/generate"
        rng = np.random.default_rng(0)
        seqs = rng.integers(0, engine.num_items + 1, size=(8, engine.seq_len)).astype(np.int32)

        def call(row):
            body, ctype = codec.encode_request("ids", seqs[row:row + 1], "float32")
            r = httpx.post(url, content=body, headers={"content-type": ctype}, timeout=120)
            assert r.status_code == 200, r.text
            return codec.decode_response(r.content, r.headers["content-type"])

        with concurrent.futures.ThreadPoolExecutor(8) as pool:  # concurrent: Ray batches
            docs = list(pool.map(call, range(len(seqs))))
        for row, doc in enumerate(docs):
            assert doc["version"] == engine.version
            want, _ = engine.run("ids", "float32", seqs[row:row + 1])
            for got, ref in zip(doc["heads"], want, strict=True):
                # Ray may batch the row with others: the same row in another batch shape,
                # equal to float32 rounding (heads_atol)
                np.testing.assert_allclose(got, ref, rtol=0, atol=heads_atol())
        bad = httpx.post(url, json={"ids": [-1] * engine.seq_len}, timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["field"] == "ids"

        from experiments.serve_ray import replica_cores

        seen = {tuple(handle.affinity.remote().result()) for _ in range(40)}
        mine = sorted(os.sched_getaffinity(0))
        if len(mine) >= 2:  # each replica on its own core: two distinct one-core masks
            assert seen == {tuple(replica_cores(r, 1, mine)) for r in (0, 1)}, seen
        else:  # one core: replica 1 finds no core of its own and stays unpinned
            assert seen == {tuple(mine)}, seen
    finally:
        serve.shutdown()
        ray.shutdown()
