import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from duet_jax.cloud import Cloud, _encode_z
from duet_jax.data.batching import bucket_size
from duet_jax.duet import Duet
from duet_jax.lowrank import materialize
from duet_jax.models import ModelConfig, get_model
from tests import tolerances as tol

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _heads_atol(embed: tuple[int, ...], seq_len: int = 6, d: int = 8, rank: int = 0) -> float:
    """Two float32 generations of the same heads (other bucket shapes, chunks, jit or not):
    the model's sequence embedding (fan-ins ``embed``), the generator at hidden = z = D, and
    with low rank ``U C V`` (inner lengths ``rank``, twice)."""
    n = tol.generator_roundings(seq_len, d, d, d, embed=embed)
    if rank:
        n += tol.path_roundings(rank, rank)
    return tol.f32_pair_atol(n, tol.MODEL_SCALE)


SASREC_EMBED = (1, 8)  # E[seq] + P, then the input projection (D = 8)


@pytest.fixture(scope="module")
def duet_and_params():
    model = get_model("sasrec", ModelConfig(num_items=50, seq_len=6, embed_dim=8, num_heads=2))
    duet = Duet.create(model)
    return duet, duet.init(jax.random.key(0))


def _seqs(rng, n, seq_len=6, num_items=50):
    lengths = rng.integers(1, seq_len + 1, size=n)
    seqs = rng.integers(1, num_items + 1, size=(n, seq_len))
    seqs[np.arange(seq_len)[None] >= lengths[:, None]] = 0
    return seqs.astype(np.int32)


@pytest.mark.parametrize(
    ("n", "expected"), [(1, 64), (64, 64), (65, 128), (700, 1024), (5000, 4096)]
)
def test_bucket_sizes_are_powers_of_two_within_bounds(n, expected):
    assert bucket_size(n, 64, 4096) == expected


def test_bucket_size_is_a_multiple_of_the_shards():
    assert bucket_size(3, 1, 4096, multiple=6) == 6
    assert bucket_size(9, 8, 4096, multiple=8) == 16


@pytest.mark.parametrize(("n", "max_bucket"), [(1, 64), (5, 64), (70, 256), (40, 16)])
def test_served_heads_equal_direct_generation(duet_and_params, rng, n, max_bucket):
    duet, params = duet_and_params
    cloud = Cloud(duet, params, "ids", min_bucket=4, max_bucket=max_bucket, mesh=None)
    seqs = _seqs(rng, n)
    uploads, nbytes = cloud.device_upload(seqs)
    heads, seconds = cloud.serve(uploads)
    direct = jax.jit(duet.generate)(params, seqs)
    assert seconds > 0
    np.testing.assert_array_equal(nbytes, 4 * (seqs > 0).sum(axis=1))
    for a, b in zip(jax.tree.leaves(heads), jax.tree.leaves(direct), strict=True):
        assert a.shape == b.shape
        tol.assert_within(a, b, _heads_atol(SASREC_EMBED), "served vs direct")


def test_z_upload_gives_the_same_heads_and_sends_z(duet_and_params, rng):
    duet, params = duet_and_params
    seqs = _seqs(rng, 9)
    by_ids, _ = Cloud(duet, params, "ids", mesh=None).serve(seqs)
    cloud = Cloud(duet, params, "z", mesh=None)
    uploads, nbytes = cloud.device_upload(seqs)
    assert uploads.shape == (9, duet.generator.z_dim) and uploads.dtype == np.float32
    np.testing.assert_array_equal(nbytes, 4 * duet.generator.z_dim)
    by_z, _ = cloud.serve(uploads)
    for a, b in zip(jax.tree.leaves(by_z), jax.tree.leaves(by_ids), strict=True):
        tol.assert_within(a, b, _heads_atol(SASREC_EMBED), "z upload vs ids upload")


def test_z_uploads_are_bucketed_and_chunked(duet_and_params, rng):
    duet, params = duet_and_params
    cloud = Cloud(duet, params, "z", min_bucket=8, max_bucket=16, mesh=None)
    seqs = _seqs(rng, 40)
    direct = np.asarray(_encode_z(duet, params, seqs))  # unpadded, unjitted
    shapes = []
    cloud._encode = lambda p, s, f=cloud._encode: shapes.append(s.shape[0]) or f(p, s)
    for n in (5, 6, 7, 40):  # buckets 8, 8, 8 and chunks 16 + 16 + 8: two shapes in all
        z, nbytes = cloud.device_upload(seqs[:n])
        assert z.shape == (n, duet.generator.z_dim) and nbytes.shape == (n,)
        tol.assert_within(z, direct[:n], _heads_atol(SASREC_EMBED), "bucketed z vs direct")
    assert shapes == [8, 8, 8, 16, 16, 8]
    empty, no_bytes = cloud.device_upload(seqs[:0])
    assert empty.shape == (0, duet.generator.z_dim) and no_bytes.shape == (0,)


@pytest.mark.parametrize("upload", ["ids", "z"])
def test_low_rank_heads_are_delivered_in_the_templates_structure(rng, upload):
    model = get_model("sasrec", ModelConfig(num_items=50, seq_len=6, embed_dim=8, num_heads=2))
    duet = Duet.create(model, low_rank=2)
    params = duet.init(jax.random.key(0))
    cloud = Cloud(duet, params, upload, min_bucket=4, mesh=None)
    seqs = _seqs(rng, 5)
    heads, _ = cloud.serve(cloud.device_upload(seqs)[0])
    duet.spec.check(heads, batch_ndim=1)  # plain leaves, template shapes, leading [5]
    direct = materialize(jax.jit(duet.generate)(params, seqs))
    for a, b in zip(jax.tree.leaves(heads), jax.tree.leaves(direct), strict=True):
        tol.assert_within(a, b, _heads_atol(SASREC_EMBED, rank=2), "low-rank served vs direct")


SHARDED_SCRIPT = """
import json, jax, numpy as np
from duet_jax.cloud import Cloud
from duet_jax.duet import Duet
from duet_jax.models import ModelConfig, get_model
model = get_model("gru4rec", ModelConfig(num_items=40, seq_len=5, embed_dim=8))
duet = Duet.create(model)
params = duet.init(jax.random.key(1))
rng = np.random.default_rng(0)
seqs = rng.integers(0, 41, size=(21, 5)).astype(np.int32)
sharded = Cloud(duet, params, "ids", min_bucket=4, max_bucket=64)
plain = Cloud(duet, params, "ids", min_bucket=4, max_bucket=64, mesh=None)
a, _ = sharded.serve(seqs)
b, _ = plain.serve(seqs)
# 4,000 rows: a 4,096 bucket, 512 rows per accelerator, so each orders its own rows by
# length and encodes them in two chunks (Duet.generate_prepared); rows of every length;
# compared with plain generation
many = rng.integers(1, 41, size=(4000, 5)).astype(np.int32)
many[np.arange(5)[None, :] >= rng.integers(1, 6, size=(4000, 1))] = 0
c, _ = Cloud(duet, params, "ids", max_bucket=4096).serve(many)
d = jax.jit(duet.generate)(params, many)  # no tables, no ordering, no chunks
out = sharded._serve(sharded._inputs, sharded._put(np.zeros((32, 5), np.int32)))
print(json.dumps({
    "devices": jax.device_count(),
    "mesh": int(sharded.mesh.devices.size),
    "shards": len(jax.tree.leaves(out)[0].sharding.device_set),
    "max_diff": max(float(np.max(np.abs(x - y))) for x, y in
                    zip(jax.tree.leaves(a), jax.tree.leaves(b))),
    "rows": int(jax.tree.leaves(a)[0].shape[0]),
    "max_diff_ordered": max(float(np.max(np.abs(x - y))) for x, y in
                            zip(jax.tree.leaves(c), jax.tree.leaves(d))),
    "rows_ordered": int(jax.tree.leaves(c)[0].shape[0]),
}))
"""


def test_sharded_generation_over_8_cpu_devices_equals_unsharded():
    env = {
        **os.environ,
        "PYTHONPATH": ROOT,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
    }
    run = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["devices"] == 8 and out["mesh"] == 8 and out["shards"] == 8
    assert out["rows"] == 21 and out["rows_ordered"] == 4000
    # GRU4Rec's embedding is the input projection alone; 5 positions
    assert out["max_diff"] <= _heads_atol((8,), seq_len=5)
    assert out["max_diff_ordered"] <= _heads_atol((8,), seq_len=5)
