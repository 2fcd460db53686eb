"""The app end to end in process: heads equal Duet.generate, 400s, 503s, readiness, drain."""

from __future__ import annotations

import asyncio
import threading

import httpx
import jax
import numpy as np
import pytest
from fastapi.testclient import TestClient

from duet_jax import delivery
from duet_jax.cloud import _encode_z
from duet_jax.serving import GenerationClient, ServerConfig, codec, create_app
from tests import tolerances as tol
from tests.serving.conftest import NUM_ITEMS, SEQ_LEN, heads_atol


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(create_app(engine, ServerConfig(max_batch=engine.max_batch))) as c:
        GenerationClient("http://testserver", client=c).wait_ready(600)
        yield c


def triggers(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    seq = rng.integers(1, NUM_ITEMS + 1, size=(n, SEQ_LEN))
    seq[np.arange(SEQ_LEN) >= rng.integers(0, SEQ_LEN + 1, size=(n, 1))] = 0
    return seq.astype(np.int32)


def reference(loaded, seq: np.ndarray) -> list[np.ndarray]:
    """Duet.generate's heads for ``seq`` (jitted, as the server runs it), as leaves."""
    heads = jax.jit(loaded.duet.generate)(loaded.params, seq)
    return [np.asarray(x) for x in loaded.duet.spec.treedef.flatten_up_to(heads)]


@pytest.mark.parametrize("binary", [True, False])
def test_round_trip_equals_duet_generate(client, loaded, binary):
    """float32: within two float32 evaluations of the generator (the server reads the
    per-item tables of Duet.prepare and compiles with generation_options, so XLA may order
    a sum differently: bitwise equal on an AVX-512 CPU, 1.7e-8 apart on an AVX2 one); bfloat16 and
    int8 within their delivery bounds (duet_jax.delivery: half a bfloat16 ulp, 2**-8
    relative; int8: scale / 2 per value, plus the float32 roundings of the decode: scale =
    max|x| / 127 is off by U relative and q * scale rounds once, each at most U * 127 *
    scale, so 2 * 127 * U * scale = 4 * 127 * U * (scale / 2) more, U = 2**-24)."""
    api = GenerationClient("http://testserver", client=client, binary=binary)
    spec = loaded.duet.spec
    for n in (1, 4):  # bucket sizes: no padding, so the very same program runs
        seq = triggers(n, seed=n)
        want = reference(loaded, seq)
        doc = api.generate(ids=seq, fmt="float32")
        assert doc["version"] == loaded.version and doc["rows"] == n
        assert [entry["path"] for entry in doc["layout"]] == list(spec.paths)
        for got, ref in zip(doc["heads"], want, strict=True):
            tol.assert_within(got, ref, heads_atol(), "float32 heads")
        for fmt in ("bfloat16", "int8"):
            doc = api.generate(ids=seq, fmt=fmt)
            head = codec.to_head(spec, doc["heads"], fmt)
            got = spec.treedef.flatten_up_to(head)
            if fmt == "bfloat16":
                for g, ref in zip(got, want, strict=True):
                    assert np.all(np.abs(g - ref) <= 2.0**-8 * np.abs(ref))
            else:
                bounds = spec.treedef.flatten_up_to(delivery.int8_tolerance(
                    spec, spec.unflatten_leaves(want)))
                for g, ref, bound in zip(got, want, bounds, strict=True):
                    wide = np.asarray(bound).reshape(n, *([1] * (ref.ndim - 1)))
                    assert np.all(np.abs(g - ref) <= wide * (1 + 4 * 127 * 2.0**-24))


def test_z_upload_equals_ids_upload(client, loaded):
    """A device that uploads z (its own encoder's output) gets the head an ids upload gets:
    the same decoders on the same z, so equal to float32 rounding of the encoder run
    (vmapped in both; equal here because both are the same jitted encoder)."""
    api = GenerationClient("http://testserver", client=client)
    seq = triggers(4, seed=3)
    z = np.asarray(jax.jit(lambda p, s: _encode_z(loaded.duet, p, s))(loaded.params, seq))
    by_z = api.generate(z=z)["heads"]
    by_ids = api.generate(ids=seq)["heads"]
    for a, b in zip(by_z, by_ids, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bad_requests_answer_400_and_the_server_lives(client):
    cases = [
        ({"ids": [1, 2, 3]}, "ids"),
        ({"ids": [[1] * SEQ_LEN] * 5}, "ids"),  # more rows than max_batch (4)
        ({"ids": [NUM_ITEMS + 1] * SEQ_LEN}, "ids"),
        ({"ids": [-1] * SEQ_LEN}, "ids"),
        ({"ids": [0.5] * SEQ_LEN}, "ids"),
        ({"z": [0.0] * 3}, "z"),
        ({"ids": [1] * SEQ_LEN, "format": "int4"}, "format"),
    ]
    for doc, field in cases:
        r = client.post("/v1/generate", json=doc)
        assert r.status_code == 400, doc
        assert r.json()["error"]["field"] == field
    r = client.post("/v1/generate", content=b"0" * (2 << 20),
                    headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["field"] == "body"
    assert client.post("/v1/generate", json={"ids": [1] * SEQ_LEN}).status_code == 200
    metrics = client.get("/metrics").text
    assert 'duet_requests_total{status="400"} 8.0' in metrics
    assert 'duet_errors_total{kind="bad_request"} 8.0' in metrics
    assert client.get("/healthz").json() == {"status": "ok"}


class SlowEngine:
    """The real engine, with warm-up and generation held until the test releases them."""

    def __init__(self, engine):
        self.inner = engine
        self.warm = threading.Event()
        self.go = threading.Event()
        self.started = threading.Event()
        self.go.set()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def warm_up(self):
        self.warm.wait(60)
        return 0.0

    def run(self, kind, fmt, x):
        self.started.set()
        self.go.wait(60)
        return self.inner.run(kind, fmt, x)


def test_ready_only_after_warm_up(engine):
    slow = SlowEngine(engine)
    with TestClient(create_app(slow, ServerConfig(max_batch=4))) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 503
        r = c.post("/v1/generate", json={"ids": [1] * SEQ_LEN})
        assert r.status_code == 503 and "Retry-After" in r.headers
        slow.warm.set()
        GenerationClient("http://testserver", client=c).wait_ready(30)
        assert c.get("/readyz").json()["ready"] is True
        assert c.post("/v1/generate", json={"ids": [1] * SEQ_LEN}).status_code == 200


def test_full_queue_answers_503_and_shutdown_drains(engine):
    """One request held in generation, ``max_queue`` more waiting: the next gets 503 with
    Retry-After; closing the app then answers every waiting request (200)."""
    slow = SlowEngine(engine)
    slow.warm.set()
    app = create_app(slow, ServerConfig(max_batch=1, max_queue=2, max_wait_ms=0))

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                while (await c.get("/readyz")).status_code != 200:
                    await asyncio.sleep(0.01)
                slow.go.clear()
                body = {"ids": [1] * SEQ_LEN}
                held = asyncio.create_task(c.post("/v1/generate", json=body))
                while not slow.started.is_set():
                    await asyncio.sleep(0.01)
                waiting = [asyncio.create_task(c.post("/v1/generate", json=body))
                           for _ in range(2)]
                while app.state.batcher.depth() < 2:
                    await asyncio.sleep(0.01)
                full = await c.post("/v1/generate", json=body)
                assert "duet_queue_depth 2.0" in (await c.get("/metrics")).text
                slow.go.set()
                return full, await held, await asyncio.gather(*waiting)

    full, held, waiting = asyncio.run(scenario())
    assert full.status_code == 503 and full.headers["Retry-After"] == "1"
    assert full.json()["error"]["kind"] == "queue_full"
    assert held.status_code == 200 and [r.status_code for r in waiting] == [200, 200]
