"""Request validation: every bad request names its field; good ones parse as expected."""

from __future__ import annotations

import json

import msgpack
import numpy as np
import pytest

from duet_jax.serving import codec

LIMITS = codec.Limits(seq_len=4, num_items=10, z_dim=3, max_rows=2, max_body_bytes=400)


def parse(doc, ctype=codec.JSON, raw: bytes | None = None):
    body = raw if raw is not None else (
        json.dumps(doc).encode() if ctype == codec.JSON else msgpack.packb(doc))
    return codec.parse_request(body, ctype, None, LIMITS)


BAD = [  # (document, field, words the message must hold)
    ({"ids": [1, 2, 3]}, "ids", "4 item ids"),  # wrong length
    ({"ids": [[1, 2, 3, 4], [1, 2]]}, "ids", "different lengths"),
    ({"ids": [1, 2, 3, 11]}, "ids", "outside the vocabulary"),
    ({"ids": [1, -2, 3, 0]}, "ids", "negative"),
    ({"ids": [1.0, 2.0, 3.0, 0.0]}, "ids", "floats"),  # wrong dtype
    ({"ids": [True, False, True, True]}, "ids", "booleans"),
    ({"ids": ["a", "b", "c", "d"]}, "ids", "strings"),
    ({"ids": [[[1, 2, 3, 4]]]}, "ids", "3 dimensions"),
    ({"ids": []}, "ids", "no rows"),
    ({"ids": [[1, 2, 3, 4]] * 3}, "ids", "at most 2"),
    ({"ids": [2**70, 1, 1, 1]}, "ids", "too large"),
    ({"ids": 5}, "ids", "expected an array"),
    ({"z": [0.1, 0.2]}, "z", "3 values"),  # z of the wrong size
    ({"z": [0.1, "x", 0.3]}, "z", "strings"),
    ({"ids": [1, 2, 3, 4], "z": [1, 2, 3]}, "ids", "exactly one"),
    ({}, "ids", "exactly one"),
    ({"ids": [1, 2, 3, 4], "format": "fp8"}, "format", "expected one of"),
    ({"ids": [1, 2, 3, 4], "extra": 1}, "extra", "unknown field"),
    ([1, 2], "body", "expected an object"),
]


@pytest.mark.parametrize("doc, field, words", BAD)
def test_bad_request_names_the_field(doc, field, words):
    with pytest.raises(codec.RequestError) as err:
        parse(doc)
    assert err.value.field == field
    assert words in err.value.message


def test_nan_z_oversized_body_and_bad_bodies():
    with pytest.raises(codec.RequestError, match="finite") as err:
        parse(None, raw=b'{"z": [NaN, 1, 2]}')
    assert err.value.field == "z"
    for raw, ctype, field in [
        (b"x" * 401, codec.JSON, "body"),  # oversized
        (b"{not json", codec.JSON, "body"),
        (b"\xc1", codec.MSGPACK, "body"),  # a byte msgpack never uses
        (b"{}", "text/plain", "content-type"),
    ]:
        with pytest.raises(codec.RequestError) as err:
            codec.parse_request(raw, ctype, None, LIMITS)
        assert err.value.field == field


def test_binary_arrays_checked():
    good = codec.pack_array(np.array([[1, 2, 0, 0]], np.int32))
    req = parse({"ids": good}, codec.MSGPACK)
    assert req.kind == "ids" and req.binary and req.x.dtype == np.int32
    np.testing.assert_array_equal(req.x, [[1, 2, 0, 0]])
    short = {**good, "data": good["data"][:-1]}
    with pytest.raises(codec.RequestError, match="bytes") as err:
        parse({"ids": short}, codec.MSGPACK)
    assert err.value.field == "ids"
    floats = codec.pack_array(np.zeros((1, 4), np.float32))
    with pytest.raises(codec.RequestError, match="floats"):
        parse({"ids": floats}, codec.MSGPACK)
    with pytest.raises(codec.RequestError, match="dtype"):
        parse({"ids": {**good, "dtype": "complex64"}}, codec.MSGPACK)


def test_good_requests():
    req = parse({"ids": [0, 0, 0, 0], "format": "int8"})  # an empty sequence is a trigger too
    assert (req.kind, req.fmt, req.x.shape, req.binary) == ("ids", "int8", (1, 4), False)
    req = parse({"z": [[1, 2, 3], [0.5, -1, 2]]})
    assert req.kind == "z" and req.x.dtype == np.float32 and req.x.shape == (2, 3)


def test_response_round_trip_both_encodings():
    q = np.array([[1, -127]], np.int8)
    scale = np.array([0.5], np.float32)
    for binary in (True, False):
        body, ctype = codec.encode_response([(q, scale)], "int8", binary, {"rows": 1})
        doc = codec.decode_response(body, ctype)
        np.testing.assert_array_equal(doc["heads"][0][0], q)
        np.testing.assert_array_equal(doc["heads"][0][1], scale)
