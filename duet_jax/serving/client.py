"""Calling a generation server: a small httpx client, and :class:`RemoteCloud`, the
in-process :class:`duet_jax.cloud.Cloud`'s interface over HTTP (what the fleet uses)."""

from __future__ import annotations

import time
from typing import Any

import httpx
import jax
import numpy as np

from duet_jax.cloud import Cloud
from duet_jax.duet import Duet
from duet_jax.serving import codec
from duet_jax.serving.engine import params_version


class ServerError(RuntimeError):
    """The server answered with an error (``status``, and its ``field`` for a 400)."""

    def __init__(self, status: int, doc: dict):
        err = doc.get("error", {}) if isinstance(doc, dict) else {}
        self.status, self.field = status, err.get("field")
        super().__init__(f"HTTP {status}: {err.get('field') or ''} {err.get('message', doc)}")


class GenerationClient:
    """``client.generate(ids=...)`` or ``(z=...)`` -> the response document, ``heads`` as
    numpy payload leaves (:mod:`duet_jax.serving.codec`). ``transport`` lets tests call an
    ASGI app in process."""

    def __init__(self, url: str, timeout_s: float = 30.0, binary: bool = True,
                 client: httpx.Client | None = None):
        self.url = url.rstrip("/")
        self.binary = binary
        self.http = client or httpx.Client(base_url=self.url, timeout=timeout_s)

    def model(self) -> dict:
        return self._check(self.http.get("/v1/model"))

    def ready(self) -> bool:
        try:
            return self.http.get("/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.ready():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.url} not ready after {timeout_s} s")
            time.sleep(0.2)

    def generate(self, ids: np.ndarray | None = None, z: np.ndarray | None = None,
                 fmt: str = "float32") -> dict:
        kind, x = ("ids", ids) if ids is not None else ("z", z)
        body, ctype = codec.encode_request(kind, np.asarray(x), fmt, self.binary)
        r = self.http.post("/v1/generate", content=body, headers={"content-type": ctype})
        if r.status_code != 200:
            raise ServerError(r.status_code, _json(r))
        return codec.decode_response(r.content, r.headers.get("content-type"))

    def _check(self, r: httpx.Response) -> Any:
        if r.status_code != 200:
            raise ServerError(r.status_code, _json(r))
        return r.json()

    def close(self) -> None:
        self.http.close()


def _json(r: httpx.Response) -> Any:
    try:
        return r.json()
    except ValueError:
        return {"error": {"message": r.text[:200]}}


class RemoteCloud:
    """:class:`duet_jax.cloud.Cloud`'s interface (``device_upload``, ``serve``, ``spec``,
    ``mesh``) answered by a generation server at ``url``.

    The devices' side stays in process: ``device_upload`` is the local cloud's (a ``z``
    upload is encoded with the device's own backbone and encoder). ``serve`` sends the
    uploads in requests of at most the server's ``max_rows`` rows, in float32, and returns
    the heads and the server-side generation seconds. The server must serve these very
    parameters: its version is checked against ``params`` at construction.
    """

    mesh = None  # generation happens elsewhere

    def __init__(self, url: str, duet: Duet, params: dict, upload: str = "ids",
                 client: GenerationClient | None = None, **cloud_kwargs):
        self.local = Cloud(duet, params, upload, mesh=None, **cloud_kwargs)
        self.duet, self.upload = duet, upload
        self.client = client or GenerationClient(url)
        self.client.wait_ready()
        info = self.client.model()
        method = info["version"].rsplit("-", 1)[0]
        expected = params_version(method, jax.tree.map(np.asarray, params))
        if info["version"] != expected:
            raise ValueError(f"the server at {url} serves {info['version']}, not these "
                             f"parameters ({expected}): start it on this run's checkpoint")
        self.max_rows = int(info["max_rows"])

    @property
    def spec(self):
        return self.duet.spec

    def device_upload(self, seqs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.local.device_upload(seqs)

    def serve(self, uploads: np.ndarray) -> tuple[Any, float]:
        """Heads (numpy leaves ``[n, ...]``) for ``uploads`` and the server's seconds."""
        if len(uploads) == 0:
            raise ValueError("serve() needs at least one request")
        parts, seconds = [], 0.0
        for start in range(0, len(uploads), self.max_rows):
            chunk = uploads[start:start + self.max_rows]
            doc = self.client.generate(**{self.upload: chunk})
            parts.append(doc["heads"])
            # the batch's call time, shared among its rows: this chunk's share
            timing = doc["timing"]
            seconds += timing["generation_s"] * len(chunk) / timing["batch_rows"]
        leaves = [np.concatenate(xs) for xs in zip(*parts, strict=True)]
        return self.spec.unflatten_leaves(leaves), seconds
