"""Pure layers over explicit parameter dicts: init functions and apply functions.

Conventions shared by every device model (they follow the authors' PyTorch code):
- weights are xavier-uniform, biases zero;
- item id 0 is padding; sequences are right-padded, so valid items form a prefix;
- a dense kernel is stored ``[in, out]`` and applied as ``x @ kernel + bias``.

``dense`` also accepts *per-example* parameters: a kernel ``[B, in, out]`` and bias
``[B, out]`` apply example ``b``'s own weights to ``x[b]``. That is how a generated head
(one head per sample, leading batch axis) runs through the same model code as a static head.
A kernel need not be an array: any :class:`KernelOperator` (an object that applies itself,
e.g. a factored kernel written by the generator) works wherever a kernel does.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp

Array = jax.Array
Params = dict


@runtime_checkable
class KernelOperator(Protocol):
    """A dense kernel held in some form other than one array, which applies itself.

    ``matmul(x)`` is ``x @ kernel`` with :func:`dense`'s conventions: a shared kernel maps
    ``x [..., in]`` -> ``[..., out]``; a per-example one (leading ``B``) maps
    ``x [B, ..., in]`` -> ``[B, ..., out]``. (:class:`duet_jax.lowrank.LowRankKernel` is one.)
    """

    def matmul(self, x: Array) -> Array: ...


def xavier_uniform(rng: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
    """Glorot-uniform over the last two dims (fan_in = shape[-2], fan_out = shape[-1])."""
    fan_in, fan_out = shape[-2], shape[-1]
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return jax.random.uniform(rng, shape, dtype, minval=-bound, maxval=bound)


# ----------------------------------------------------------------------------- dense


def dense_init(rng: Array, in_dim: int, out_dim: int) -> Params:
    """{"kernel": [in, out] xavier, "bias": [out] zeros}."""
    return {
        "kernel": xavier_uniform(rng, (in_dim, out_dim)),
        "bias": jnp.zeros((out_dim,), jnp.float32),
    }


def matmul(x: Array, kernel) -> Array:
    """``x @ kernel``: kernel ``[in, out]`` (shared, ``x [..., in]``), ``[B, in, out]`` (per
    example, ``x [B, ..., in]``) or a :class:`KernelOperator`, which applies itself."""
    if isinstance(kernel, KernelOperator):
        return kernel.matmul(x)
    if kernel.ndim == 2:
        return x @ kernel
    if kernel.ndim == 3:
        return jnp.einsum("b...i,bio->b...o", x, kernel)
    raise ValueError(f"dense kernel must be [in, out] or [batch, in, out], got {kernel.shape}")


def dense(params: Params, x: Array) -> Array:
    """``x @ kernel + bias``.

    Shared weights: kernel ``[in, out]``, bias ``[out]``, x ``[..., in]``.
    Per-example weights: kernel ``[B, in, out]``, bias ``[B, out]``, x ``[B, ..., in]``.
    The kernel may also be a :class:`KernelOperator` (shared or per example, as its bias).

    >>> params = {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros((2,))}
    >>> dense(params, jnp.ones((4, 3))).shape
    (4, 2)
    """
    y = matmul(x, params["kernel"])
    bias = params["bias"]
    if bias.ndim == 1:
        return y + bias
    # per example: bias [B, out] broadcast over x's middle axes
    return y + bias.reshape(bias.shape[0], *([1] * (y.ndim - 2)), bias.shape[-1])


def mlp_init(rng: Array, dims: tuple[int, ...]) -> Params:
    """Dense layers ``dims[0] -> dims[1] -> ...`` named ``dense1``, ``dense2``, ..."""
    keys = jax.random.split(rng, len(dims) - 1)
    return {f"dense{i + 1}": dense_init(k, dims[i], dims[i + 1]) for i, k in enumerate(keys)}


def mlp(params: Params, x: Array, activations: tuple) -> Array:
    """Apply ``dense1, dense2, ...`` with ``activations[i]`` (None = identity) after layer i."""
    for i, act in enumerate(activations):
        x = dense(params[f"dense{i + 1}"], x)
        if act is not None:
            x = act(x)
    return x


# ------------------------------------------------------------------- embeddings, masks


def embedding_init(rng: Array, num_rows: int, dim: int) -> Array:
    """Table ``[num_rows, dim]``, xavier-uniform, with row 0 (padding) zero."""
    table = xavier_uniform(rng, (num_rows, dim))
    return table.at[0].set(0.0)


def embed(table: Array, ids: Array) -> Array:
    """``table[ids]`` with id 0 mapped to a zero vector (and no gradient into row 0)."""
    return table[ids] * (ids != 0)[..., None].astype(table.dtype)


def sequence_mask(seq: Array) -> Array:
    """``[B, L]`` bool, True at valid (non-padding) positions."""
    return seq != 0


def last_valid(x: Array, mask: Array) -> Array:
    """``x[b, len_b - 1]`` for ``x [B, L, D]``, right-padded ``mask [B, L]``.

    An empty sequence yields position 0 (whatever the layer put there), as the authors'
    gather with ``len - 1`` clamped at 0 does.
    """
    lengths = mask.sum(axis=-1)
    index = jnp.maximum(lengths - 1, 0)
    return jnp.take_along_axis(x, index[:, None, None], axis=1)[:, 0]


# ----------------------------------------------------------------------------- GRU


def gru_init(rng: Array, in_dim: int, hidden: int) -> Params:
    """PyTorch GRU layout, transposed for ``x @ W``; gate order (reset, update, new)."""
    k_ih, k_hh = jax.random.split(rng)
    # Xavier per gate block, as xavier over PyTorch's stacked [3H, in] would mix fan sizes.
    ih = jnp.concatenate(
        [xavier_uniform(k, (in_dim, hidden)) for k in jax.random.split(k_ih, 3)], axis=1
    )
    hh = jnp.concatenate(
        [xavier_uniform(k, (hidden, hidden)) for k in jax.random.split(k_hh, 3)], axis=1
    )
    return {
        "kernel_ih": ih,
        "kernel_hh": hh,
        "bias_ih": jnp.zeros((3 * hidden,), jnp.float32),
        "bias_hh": jnp.zeros((3 * hidden,), jnp.float32),
    }


def sigmoid(x: Array) -> Array:
    """``σ(x)`` as ``0.5 * tanh(x / 2) + 0.5``: the same function (an identity), but XLA-CPU
    evaluates ``tanh`` with one rational approximation where ``jax.nn.sigmoid`` costs an
    ``exp`` and a division. In a GRU-only measurement (B = 256 and 1024, 30 steps, 2 shared
    CPU cores) the GRU ran 1.1-1.3x faster; in whole head generation the gain was within
    the machine's noise. Float32 results differ from ``jax.nn.sigmoid`` by a few ulp."""
    return 0.5 * jnp.tanh(0.5 * x) + 0.5


GruGates = tuple[Array, Array, Array]  # input projections of the r, z and n gates


def _gru_gate(params: Params, name: str, i: int) -> tuple[Array, Array]:
    hidden = params["kernel_hh"].shape[0]
    cols = slice(i * hidden, (i + 1) * hidden)
    return params[f"kernel_{name}"][:, cols], params[f"bias_{name}"][cols]


def gru_input_gates(params: Params, x: Array) -> GruGates:
    """The GRU's input projections of rows ``x [..., in]``: ``(x_r, x_z, x_n)``, each
    ``[..., H]``, with the biases that do not depend on the state folded in (``b_ir + b_hr``,
    ``b_iz + b_hz``, ``b_in``).

    They depend on each row alone, so they may be computed for all steps at once (as
    :func:`gru` does) or once per *token* of a vocabulary and gathered
    (:meth:`duet_jax.duet.Duet.prepare`). One array per gate: on XLA-CPU slicing a stacked
    ``[B, 3H]`` inside the loop ran about 3x slower (as did a fused ``h @ W_hh [H, 3H]``
    plus slices per step: 3.5x slower than three ``[H, H]`` products, and a feature-major
    ``[3H, B]`` layout).
    """
    extra = (_gru_gate(params, "hh", 0)[1], _gru_gate(params, "hh", 1)[1], 0.0)
    return tuple(x @ w + (b + e) for (w, b), e in zip(
        (_gru_gate(params, "ih", i) for i in range(3)), extra, strict=True))  # type: ignore[return-value]


def gru_recurrence(params: Params, gates: GruGates, mask: Array, unroll: int = 1) -> Array:
    """The GRU's recurrent part over time-major input projections ``gates`` (each
    ``[L, *batch, H]``, :func:`gru_input_gates`) and ``mask [L, *batch]``: the state after
    the last valid step ``[*batch, H]``, held fixed at padded steps (zeros when empty).
    ``unroll``: steps per loop iteration of the ``lax.scan`` (the same result)."""
    hidden = params["kernel_hh"].shape[0]
    w_r, w_z, w_n = (_gru_gate(params, "hh", i)[0] for i in range(3))
    b_hn = _gru_gate(params, "hh", 2)[1]  # stays in the step, inside r * (...)

    # Rematerialised: recomputing a step in the backward pass is about 2x faster on XLA-CPU
    # than storing and reloading its residuals.
    @jax.checkpoint
    def step(h, inputs):
        x_r, x_z, x_n, m = inputs
        r = sigmoid(x_r + h @ w_r)
        z = sigmoid(x_z + h @ w_z)
        n = jnp.tanh(x_n + r * (h @ w_n + b_hn))
        # (1 - z) n + z h, one multiply fewer
        return jnp.where(m[..., None], n + z * (h - n), h), None

    h0 = jnp.zeros((*gates[0].shape[1:-1], hidden), gates[0].dtype)
    last, _ = jax.lax.scan(step, h0, (*gates, mask), unroll=unroll)
    return last


def gru(params: Params, x: Array, mask: Array, unroll: int = 1) -> Array:
    """Run a GRU over ``x [*batch, L, in]``; return the state after the last valid step
    ``[*batch, H]`` (``batch`` may be empty: one sequence, as the generator's vmap uses it).

    The state is held fixed at padded steps (zeros for an empty sequence). PyTorch equations:
    ``r = σ(x W_ir + b_ir + h W_hr + b_hr)``, ``z = σ(...)``,
    ``n = tanh(x W_in + b_in + r ⊙ (h W_hn + b_hn))``, ``h' = (1 - z) ⊙ n + z ⊙ h``.
    ``unroll``: steps per loop iteration of the ``lax.scan`` (the same result).
    """
    # input projections for all steps at once, time-major
    gates = gru_input_gates(params, jnp.moveaxis(x, -2, 0))
    return gru_recurrence(params, gates, jnp.moveaxis(mask, -1, 0), unroll)


# ----------------------------------------------------------------------- attention


def layer_norm_init(dim: int) -> Params:
    return {"scale": jnp.ones((dim,), jnp.float32), "bias": jnp.zeros((dim,), jnp.float32)}


def layer_norm(params: Params, x: Array, eps: float = 1e-5) -> Array:
    """LayerNorm over the last axis (PyTorch default eps)."""
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * params["scale"] + params["bias"]


def masked_softmax(scores: Array, mask: Array | None) -> Array:
    """Softmax over the last axis; masked entries get weight 0; an all-masked row is all 0."""
    if mask is None:
        return jax.nn.softmax(scores, axis=-1)
    scores = jnp.where(mask, scores, -jnp.inf)
    max_ = jnp.max(scores, axis=-1, keepdims=True)
    max_ = jnp.where(jnp.isfinite(max_), max_, 0.0)
    weights = jnp.where(mask, jnp.exp(scores - max_), 0.0)
    total = weights.sum(axis=-1, keepdims=True)
    return weights / jnp.where(total > 0, total, 1.0)


def attention_init(rng: Array, dim: int) -> Params:
    """Query/key/value/output projections, each ``[dim, dim]`` with bias."""
    kq, kk, kv, ko = jax.random.split(rng, 4)
    return {
        "query": dense_init(kq, dim, dim),
        "key": dense_init(kk, dim, dim),
        "value": dense_init(kv, dim, dim),
        "out": dense_init(ko, dim, dim),
    }


def multi_head_attention(
    params: Params, queries: Array, inputs: Array, num_heads: int, key_mask: Array | None
) -> Array:
    """Multi-head scaled dot-product attention of ``queries [B, Q, D]`` over ``inputs [B, L, D]``.

    ``key_mask [B, L]`` (True = may be attended to) or None for no masking (authors' code).
    Self-attention is ``queries = inputs``. -> ``[B, Q, D]``.
    """
    batch, num_q, dim = queries.shape
    head_dim = dim // num_heads

    def split(t):
        return t.reshape(t.shape[0], t.shape[1], num_heads, head_dim)

    q = split(dense(params["query"], queries))
    k = split(dense(params["key"], inputs))
    v = split(dense(params["value"], inputs))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    weights = masked_softmax(scores, mask)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, num_q, dim)
    return dense(params["out"], out)


def transformer_layer_init(rng: Array, dim: int, ffn_dim: int) -> Params:
    ka, k1, k2 = jax.random.split(rng, 3)
    return {
        "attention": attention_init(ka, dim),
        "norm1": layer_norm_init(dim),
        "ffn1": dense_init(k1, dim, ffn_dim),
        "ffn2": dense_init(k2, ffn_dim, dim),
        "norm2": layer_norm_init(dim),
    }


def transformer_layer(
    params: Params, queries: Array, inputs: Array, num_heads: int, key_mask: Array | None
) -> Array:
    """Post-LN encoder layer (PyTorch ``TransformerEncoderLayer``, ReLU FFN, no dropout),
    evaluated at the positions ``queries [B, Q, D]`` of ``inputs [B, L, D]``.

    Every output position depends on the inputs only through its own query, so passing
    ``queries = inputs`` gives the usual layer and passing a subset of rows gives exactly
    those rows of it, for a fraction of the cost. -> ``[B, Q, D]``.
    """
    attended = multi_head_attention(params["attention"], queries, inputs, num_heads, key_mask)
    x = layer_norm(params["norm1"], queries + attended)
    ffn = dense(params["ffn2"], jax.nn.relu(dense(params["ffn1"], x)))
    return layer_norm(params["norm2"], x + ffn)


def target_attention(params: Params, query: Array, keys: Array, mask: Array) -> Array:
    """DIN target attention: ``q = Wq t``, ``K = Wk H``, ``V = Wv H``, scaled dot, padding masked.

    ``query [B, D]``, ``keys [B, L, D]``, ``mask [B, L]`` -> ``[B, D]`` (zeros if no valid key).
    """
    q = dense(params["query"], query)
    k = dense(params["key"], keys)
    v = dense(params["value"], keys)
    scores = jnp.einsum("bd,bld->bl", q, k) / math.sqrt(q.shape[-1])
    weights = masked_softmax(scores, mask)
    return jnp.einsum("bl,bld->bd", weights, v)


def target_attention_init(rng: Array, dim: int) -> Params:
    kq, kk, kv = jax.random.split(rng, 3)
    return {
        "query": dense_init(kq, dim, dim),
        "key": dense_init(kk, dim, dim),
        "value": dense_init(kv, dim, dim),
    }
