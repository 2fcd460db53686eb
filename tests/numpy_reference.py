"""Hand-written float64 numpy references of the device models and the generator.

Written from the method as docs/design.md describes it, with plain loops where that is
clearer, independently of the JAX
code (e.g. SASRec here runs the full transformer over every position and then takes the
last valid one; the JAX model evaluates only that position).
"""

from __future__ import annotations

import numpy as np


def f64(tree):
    if isinstance(tree, dict):
        return {k: f64(v) for k, v in tree.items()}
    return np.asarray(tree, dtype=np.float64)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def dense(p, x):
    return x @ p["kernel"] + p["bias"]


def embed(table, ids):
    out = table[ids].copy()
    out[ids == 0] = 0.0
    return out


def layer_norm(p, x, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def softmax(x):
    """Softmax; entries at -inf get weight 0 and an all -inf row is all zeros."""
    if np.all(np.isneginf(x)):
        return np.zeros_like(x)
    e = np.exp(x - x.max())
    return e / e.sum()


def gru_last(p, x, length):
    """One sequence ``x [L, in]``; PyTorch GRU equations; state after ``length`` steps."""
    hidden = p["kernel_hh"].shape[0]
    h = np.zeros(hidden)
    for t in range(length):
        gx = x[t] @ p["kernel_ih"] + p["bias_ih"]
        gh = h @ p["kernel_hh"] + p["bias_hh"]
        r = sigmoid(gx[:hidden] + gh[:hidden])
        z = sigmoid(gx[hidden : 2 * hidden] + gh[hidden : 2 * hidden])
        n = np.tanh(gx[2 * hidden :] + r * gh[2 * hidden :])
        h = (1 - z) * n + z * h
    return h


def self_attention(p, x, num_heads, valid):
    """Full self-attention over ``x [L, D]``; ``valid [L]`` masks keys (None: no mask)."""
    length, dim = x.shape
    hd = dim // num_heads
    q, k, v = dense(p["query"], x), dense(p["key"], x), dense(p["value"], x)
    out = np.zeros((length, dim))
    for h in range(num_heads):
        cols = slice(h * hd, (h + 1) * hd)
        for i in range(length):
            scores = k[:, cols] @ q[i, cols] / np.sqrt(hd)
            if valid is not None:
                scores = np.where(valid, scores, -np.inf)
            out[i, cols] = softmax(scores) @ v[:, cols]
    return dense(p["out"], out)


def transformer_layer(p, x, num_heads, valid):
    x = layer_norm(p["norm1"], x + self_attention(p["attention"], x, num_heads, valid))
    ffn = dense(p["ffn2"], np.maximum(dense(p["ffn1"], x), 0.0))
    return layer_norm(p["norm2"], x + ffn)


def dot_head(head, s, t):
    return (
        np.tanh(dense(head["dense1"], s)) @ head["dense2"]["kernel"] @ t
        + head["dense2"]["bias"] @ t
    )


def _target_tower(bb, item):
    e_t = embed(bb["item_embedding"], np.array([item]))[0]
    return dense(bb["target_tower"]["dense2"], np.tanh(dense(bb["target_tower"]["dense1"], e_t)))


def sasrec(backbone, head, click_seq, target, num_heads=4, mask_padding=False):
    bb = f64(backbone)
    out = []
    for b in range(len(target)):
        seq = click_seq[b]
        length = int((seq != 0).sum())
        h = np.tanh(
            dense(bb["input_proj"], embed(bb["item_embedding"], seq) + bb["position_embedding"])
        )
        h = transformer_layer(bb["encoder"], h, num_heads, (seq != 0) if mask_padding else None)
        s = h[max(length - 1, 0)]
        out.append(dot_head(_head_for(head, b, len(target)), s, _target_tower(bb, target[b])))
    return np.array(out)


def gru4rec(backbone, head, click_seq, target):
    bb = f64(backbone)
    out = []
    for b in range(len(target)):
        seq = click_seq[b]
        h = np.tanh(dense(bb["input_proj"], embed(bb["item_embedding"], seq)))
        s = gru_last(bb["gru"], h, int((seq != 0).sum()))
        out.append(dot_head(_head_for(head, b, len(target)), s, _target_tower(bb, target[b])))
    return np.array(out)


def din(backbone, head, click_seq, target):
    bb = f64(backbone)
    out = []
    for b in range(len(target)):
        seq = click_seq[b]
        valid = seq != 0
        t = np.tanh(dense(bb["target_proj"], embed(bb["item_embedding"], np.array([target[b]]))[0]))
        h = np.tanh(dense(bb["input_proj"], embed(bb["item_embedding"], seq)))
        att = bb["attention"]
        q, k, v = dense(att["query"], t), dense(att["key"], h), dense(att["value"], h)
        a = softmax(np.where(valid, k @ q / np.sqrt(len(q)), -np.inf)) @ v
        x = np.concatenate([t, a])
        hd = _head_for(head, b, len(target))
        names = sorted(hd, key=lambda n: int(n[len("dense") :]))
        for i, name in enumerate(names):
            x = dense(hd[name], x)
            if i < len(names) - 1:
                x = np.tanh(x)
        out.append(x[0])
    return np.array(out)


def _head_for(head, b, batch):
    """Example ``b``'s head: a shared head as is, or row ``b`` of a per-example head."""
    head = f64(head)
    per_example = head["dense1"]["kernel"].ndim == 3
    if not per_example:
        return head
    return {n: {k: v[b] for k, v in layer.items()} for n, layer in head.items()}


def generator(params, seq_features, length, paths, shapes):
    """The generator for one device: GRU -> Dense(tanh) -> Dense -> z; leaf = z @ W + b."""
    p = f64(params["params"])
    enc = p["encoder"]
    h = gru_last(enc["gru"], np.asarray(seq_features, np.float64), length)
    z = dense(enc["dense2"], np.tanh(dense(enc["dense1"], h)))
    leaves = {}
    for path, shape in zip(paths, shapes, strict=True):
        dec = p["decoder_" + path.replace("/", "__")]
        leaves[path] = (z @ dec["kernel"] + dec["bias"]).reshape(shape)
    return leaves
