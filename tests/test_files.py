import json
import math

import pytest

from duet_jax import files


def test_write_text_atomic_replaces_whole_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "out.json"
    files.write_text_atomic(path, "first")
    files.write_text_atomic(path, "second")
    assert path.read_text() == "second"
    assert [p.name for p in path.parent.iterdir()] == ["out.json"]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.txt"
    files.write_text_atomic(path, "old")

    class Boom:
        def __str__(self):
            raise RuntimeError("boom")

    with pytest.raises(TypeError):
        files.write_text_atomic(path, Boom())  # not a str: fails mid-write
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_dumps_is_strict_json():
    text = files.dumps({"a": math.nan, "b": [1.0, math.inf], "c": (1, 2)})
    assert json.loads(text, parse_constant=lambda t: pytest.fail(t)) == {
        "a": None,
        "b": [1.0, None],
        "c": [1, 2],
    }
