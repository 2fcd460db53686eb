"""Request and response bodies of ``POST /v1/generate``: JSON for people, msgpack for devices.

Request (a JSON object or msgpack map), exactly one of:

- ``ids``: item ids, one row ``[L]`` or a batch ``[n, L]`` (``1..num_items``, ``0`` pads);
- ``z``: the generator's encoding, ``[Z]`` or ``[n, Z]`` (the privacy-preserving upload);

plus ``format``: ``float32`` (default), ``bfloat16`` or ``int8`` (:mod:`duet_jax.delivery`).
In msgpack an array may also be a map ``{"dtype", "shape", "data": raw little-endian bytes}``.

Response: ``version``, ``format``, ``rows`` (n), ``layout`` (each head leaf's ``path``,
``shape``, ``dtype``, in order), ``heads`` (one entry per leaf, with a leading ``n`` axis:
an array, or for int8 ``{"q": int8, "scale": float32 [n]}``; the device decodes
``q * scale``) and ``timing`` (server seconds: ``generation_s`` of the batched call that
answered, ``batch_rows`` in that call, ``queue_s`` waited). JSON writes arrays as nested
lists; msgpack as ``{"dtype", "shape", "data"}`` maps (bfloat16 as its 2-byte pattern).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import ml_dtypes
import msgpack
import numpy as np

from duet_jax import delivery

JSON = "application/json"
MSGPACK = "application/msgpack"
MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack")
FIELDS = ("ids", "z", "format")
_DTYPES = {"int32": np.int32, "int64": np.int64, "float32": np.float32,
           "float64": np.float64, "bfloat16": ml_dtypes.bfloat16, "int8": np.int8}


class RequestError(ValueError):
    """A bad request: ``field`` names what to fix (answered as 400)."""

    def __init__(self, field: str, message: str):
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}")


@dataclasses.dataclass(frozen=True)
class Limits:
    """What the server accepts: sizes of the loaded model and request bounds."""

    seq_len: int
    num_items: int
    z_dim: int
    max_rows: int
    max_body_bytes: int = 1 << 20
    uploads: tuple[str, ...] = ("ids", "z")
    formats: tuple[str, ...] = delivery.FORMATS


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
    kind: str  # "ids" | "z"
    x: np.ndarray  # int32 [n, L] or float32 [n, Z]
    fmt: str
    binary: bool  # answer in msgpack


def wants_msgpack(content_type: str | None, accept: str | None) -> bool:
    """Answer in msgpack when the client sent msgpack or asks for it."""
    def has(header):
        return any(t in (header or "").lower() for t in MSGPACK_TYPES)

    if accept and "json" in accept.lower() and not has(accept):
        return False
    return has(content_type) or has(accept)


def _array(value: Any, field: str) -> np.ndarray:
    if isinstance(value, dict):  # msgpack's binary form
        if set(value) != {"dtype", "shape", "data"}:
            raise RequestError(field, "a binary array is a map with keys dtype, shape, data")
        dtype = _DTYPES.get(str(value["dtype"]))
        shape = value["shape"]
        if dtype is None:
            raise RequestError(field, f"dtype {value['dtype']!r} is not one of {list(_DTYPES)}")
        if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
                or not isinstance(value["data"], bytes)):
            raise RequestError(field, "shape must be a list of sizes and data raw bytes")
        count = math.prod(shape)
        if len(value["data"]) != count * np.dtype(dtype).itemsize:
            raise RequestError(field, f"data has {len(value['data'])} bytes, shape {shape} of "
                                      f"{value['dtype']} needs {count * np.dtype(dtype).itemsize}")
        return np.frombuffer(value["data"], dtype).reshape(shape)
    if not isinstance(value, list):
        raise RequestError(field, "expected an array (a list of numbers, or of rows)")
    try:
        arr = np.asarray(value)
    except (ValueError, OverflowError):
        raise RequestError(field, "rows of different lengths") from None
    if arr.dtype == object:
        raise RequestError(field, "rows of different lengths, or numbers too large")
    if arr.size == 0:
        raise RequestError(field, "no rows")
    return arr


def _rows(arr: np.ndarray, field: str, width: int, what: str, limits: Limits) -> np.ndarray:
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2:
        raise RequestError(field, f"expected one row [{width}] or rows [n, {width}], got "
                                  f"{arr.ndim} dimensions")
    if arr.shape[0] == 0:
        raise RequestError(field, "no rows")
    if arr.shape[1] != width:
        raise RequestError(field, f"each row must hold {width} {what}, got {arr.shape[1]}")
    if arr.shape[0] > limits.max_rows:
        raise RequestError(field, f"{arr.shape[0]} rows; at most {limits.max_rows} per request")
    return arr


def _ids(value: Any, limits: Limits) -> np.ndarray:
    arr = _array(value, "ids")
    if arr.dtype.kind not in "iu":
        raise RequestError("ids", f"expected integer item ids, got {_kind(arr)}")
    arr = _rows(arr, "ids", limits.seq_len, "item ids (right-padded with 0)", limits)
    if arr.size and arr.min() < 0:
        raise RequestError("ids", f"negative item id {int(arr.min())}; ids are 1.."
                                  f"{limits.num_items}, 0 pads")
    if arr.size and arr.max() > limits.num_items:
        raise RequestError("ids", f"item id {int(arr.max())} is outside the vocabulary 1.."
                                  f"{limits.num_items} (0 pads)")
    return arr.astype(np.int32)


def _z(value: Any, limits: Limits) -> np.ndarray:
    arr = _array(value, "z")
    if arr.dtype.kind not in "iuf" and arr.dtype != ml_dtypes.bfloat16:
        raise RequestError("z", f"expected numbers, got {_kind(arr)}")
    arr = _rows(arr, "z", limits.z_dim, "values", limits).astype(np.float32)
    if not np.isfinite(arr).all():
        raise RequestError("z", "values must be finite (no NaN or inf)")
    return arr


def _kind(arr: np.ndarray) -> str:
    names = {"b": "booleans", "f": "floats", "U": "strings", "S": "bytes", "c": "complex"}
    return names.get(arr.dtype.kind, str(arr.dtype))


def parse_request(body: bytes, content_type: str | None, accept: str | None,
                  limits: Limits) -> GenerateRequest:
    """Validate a request body; any problem raises :class:`RequestError` naming the field."""
    if len(body) > limits.max_body_bytes:
        raise RequestError("body", f"{len(body)} bytes; at most {limits.max_body_bytes}")
    ctype = (content_type or JSON).split(";")[0].strip().lower()
    try:
        if ctype in MSGPACK_TYPES:
            doc = msgpack.unpackb(body, raw=False, strict_map_key=True)
        elif ctype == JSON or ctype.endswith("+json"):
            doc = json.loads(body)
        else:
            raise RequestError("content-type", f"{ctype!r}; expected {JSON} or {MSGPACK}")
    except RequestError:
        raise
    except (ValueError, TypeError, RecursionError, msgpack.UnpackException) as err:
        raise RequestError("body", f"not valid {ctype}: {str(err)[:100]}") from None
    if not isinstance(doc, dict):
        raise RequestError("body", "expected an object with ids or z, and format")
    unknown = sorted(str(k) for k in doc if k not in FIELDS)
    if unknown:
        raise RequestError(unknown[0], f"unknown field; expected {list(FIELDS)}")
    fmt = doc.get("format", "float32")
    if fmt not in limits.formats:
        raise RequestError("format", f"{fmt!r}; expected one of {list(limits.formats)}")
    if ("ids" in doc) == ("z" in doc):
        raise RequestError("ids", "send exactly one of ids or z")
    kind = "ids" if "ids" in doc else "z"
    if kind not in limits.uploads:
        raise RequestError(kind, f"this server does not take {kind} uploads; it takes "
                                 f"{list(limits.uploads)}")
    x = _ids(doc["ids"], limits) if kind == "ids" else _z(doc["z"], limits)
    return GenerateRequest(kind, x, fmt, wants_msgpack(content_type, accept))


def encode_request(kind: str, x: np.ndarray, fmt: str = "float32", binary: bool = True
                   ) -> tuple[bytes, str]:
    """What a client sends: -> (body, content type)."""
    x = np.ascontiguousarray(x, np.int32 if kind == "ids" else np.float32)
    if binary:
        doc = {kind: pack_array(x), "format": fmt}
        return msgpack.packb(doc, use_bin_type=True), MSGPACK
    return json.dumps({kind: x.tolist(), "format": fmt}).encode(), JSON


def pack_array(x: np.ndarray) -> dict:
    x = np.ascontiguousarray(x)  # numpy and ml_dtypes arrays are little-endian on every host
    return {"dtype": str(x.dtype), "shape": list(x.shape), "data": x.tobytes()}


def encode_response(leaves: list, fmt: str, binary: bool, meta: dict) -> tuple[bytes, str]:
    """Payload leaves (arrays, or ``(q, scale)`` pairs for int8) and ``meta`` (version,
    layout, rows, timing) -> (body, content type)."""
    if binary:
        put = pack_array
    else:
        def put(x):
            return np.asarray(x, np.float32 if x.dtype == ml_dtypes.bfloat16 else x.dtype).tolist()
    heads = [{"q": put(leaf[0]), "scale": put(leaf[1])} if fmt == "int8" else put(leaf)
             for leaf in leaves]
    doc = {**meta, "format": fmt, "heads": heads}
    if binary:
        return msgpack.packb(doc, use_bin_type=True), MSGPACK
    return json.dumps(doc).encode(), JSON


def _unpack(value: Any, dtype: str) -> np.ndarray:
    if isinstance(value, dict):
        return np.frombuffer(value["data"], _DTYPES[value["dtype"]]).reshape(value["shape"])
    return np.asarray(value, _DTYPES[dtype])


def decode_response(body: bytes, content_type: str | None) -> dict:
    """A response body -> its document with ``heads`` as numpy payload leaves."""
    ctype = (content_type or JSON).split(";")[0].strip().lower()
    doc = msgpack.unpackb(body, raw=False) if ctype in MSGPACK_TYPES else json.loads(body)
    fmt = doc["format"]
    if fmt == "int8":
        doc["heads"] = [(_unpack(h["q"], "int8"), _unpack(h["scale"], "float32"))
                        for h in doc["heads"]]
    else:
        doc["heads"] = [_unpack(h, fmt) for h in doc["heads"]]
    return doc


def to_head(spec, leaves: list, fmt: str) -> Any:
    """Decoded payload leaves -> the head pytree (numpy, leading n) a device swaps in, with
    :func:`duet_jax.delivery.decode`."""
    if fmt == "int8":
        payload = spec.unflatten_leaves([{"q": q, "scale": s} for q, s in leaves])
    else:
        payload = spec.unflatten_leaves(list(leaves))
    head = delivery.decode(spec, payload, fmt)
    return spec.unflatten_leaves([np.asarray(x) for x in spec.treedef.flatten_up_to(head)])
