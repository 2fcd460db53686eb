"""jax.export of the generator: a symbolic batch, served without the model's code."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from duet_jax.errors import ConfigError
from duet_jax.export import MANIFEST, PARAMS, ExportedEngine, export_run
from duet_jax.serving import GenerationClient, ServerConfig, create_app
from tests.serving.conftest import heads_atol

# jax serializes exported functions with flatbuffers (the serve extra installs it)
pytest.importorskip("flatbuffers", reason="jax.export serialization needs flatbuffers")


@pytest.fixture(scope="module")
def exported(loaded, tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("exported"))
    manifest = export_run(loaded, directory, uploads=("ids", "z"), formats=("float32", "int8"))
    return directory, manifest


def test_exported_heads_equal_the_checkpoint_engine(exported, engine, loaded):
    """One artefact answers every batch size, equal to the checkpoint engine's heads: below
    64 rows both run affine's plain form, the same operations, but the exported program is
    lowered with a symbolic batch, so XLA may fuse it differently: within float32 rounding
    (heads_atol), far below any real difference (a wrong row, a missing term)."""
    directory, manifest = exported
    served = ExportedEngine(directory, max_batch=4, uploads=("ids", "z"),
                            formats=("float32", "int8"))
    assert served.version == loaded.version == manifest["version"]
    assert served.layout == engine.layout
    rng = np.random.default_rng(0)
    for n in (1, 3, 4):
        seq = rng.integers(0, engine.num_items + 1, size=(n, engine.seq_len)).astype(np.int32)
        got, _ = served.run("ids", "float32", seq)
        want, _ = engine.run("ids", "float32", seq)
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape
            np.testing.assert_allclose(g, w, rtol=0, atol=heads_atol())
        got, _ = served.run("ids", "int8", seq)
        want, _ = engine.run("ids", "int8", seq)
        for (gq, gs), (wq, ws) in zip(got, want, strict=True):
            # scale = max|x| / 127 moves with x by heads_atol / 127; q by one step at most
            # where x / scale sits within that of a rounding boundary
            np.testing.assert_allclose(gs, ws, rtol=0, atol=heads_atol() / 127)
            assert np.abs(gq.astype(int) - wq.astype(int)).max() <= 1


def test_manifest_versions_and_refusals(exported, tmp_path):
    directory, manifest = exported
    assert manifest["export_format"] == 1 and manifest["jax_version"]
    assert set(manifest["functions"]) == {"ids:float32", "ids:int8", "z:float32", "z:int8"}
    with pytest.raises(ConfigError, match="bfloat16"):
        ExportedEngine(directory, formats=("bfloat16",))
    # a damaged parameter file: the digest no longer matches the version
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in os.listdir(directory):
        (bad / name).write_bytes(open(os.path.join(directory, name), "rb").read())
    with np.load(bad / PARAMS) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["p0"] = arrays["p0"] + 1
    np.savez(bad / PARAMS, **arrays)
    with pytest.raises(ConfigError, match="damaged"):
        ExportedEngine(str(bad))
    doc = json.loads((bad / MANIFEST).read_text())
    (bad / MANIFEST).write_text(json.dumps({**doc, "export_format": 99}))
    with pytest.raises(ConfigError, match="export_format"):
        ExportedEngine(str(bad))


def test_the_server_runs_on_the_exported_engine(exported, engine):
    from fastapi.testclient import TestClient

    served = ExportedEngine(exported[0], max_batch=2, uploads=("ids",), formats=("int8",))
    with TestClient(create_app(served, ServerConfig(max_batch=2))) as http:
        client = GenerationClient("http://testserver", client=http)
        client.wait_ready(300)
        doc = client.generate(ids=np.ones((2, engine.seq_len), np.int32), fmt="int8")
        assert doc["version"] == engine.version and doc["rows"] == 2
        assert [e["path"] for e in doc["layout"]] == list(engine.layout.paths)
