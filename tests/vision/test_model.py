"""The vision device model against a float64 numpy reference (convolutions included), its
per-example heads, and the generator writing exactly its head template."""

import jax
import jax.numpy as jnp
import numpy as np

import duet_jax.vision  # noqa: F401  (registers "mobilenet")
from duet_jax.generator import ParameterGenerator, generate, init_generator
from duet_jax.models import MODELS, ModelConfig, get_model
from duet_jax.vision.model import VisionConfig, vision_model
from tests import tolerances as tol


def _conv_ref(x, kernel, bias, stride, groups, absolute):
    """NHWC convolution with TF 'SAME' padding, float64 loops (kernel [kh, kw, cin/g, cout])."""
    if absolute:
        x, kernel, bias = np.abs(x), np.abs(kernel), np.abs(bias)
    b, h, w, cin = x.shape
    kh, kw, _, cout = kernel.shape
    oh, ow = -(-h // stride), -(-w // stride)
    ph = max((oh - 1) * stride + kh - h, 0)
    pw = max((ow - 1) * stride + kw - w, 0)
    xp = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    out = np.zeros((b, oh, ow, cout))
    per_in, per_out = cin // groups, cout // groups
    for i in range(oh):
        for j in range(ow):
            patch = xp[:, i * stride:i * stride + kh, j * stride:j * stride + kw]
            for g in range(groups):
                p = patch[..., g * per_in:(g + 1) * per_in]
                k = kernel[..., g * per_out:(g + 1) * per_out]
                out[:, i, j, g * per_out:(g + 1) * per_out] = np.einsum("bhwc,hwco->bo", p, k)
    return out + bias


def _forward_ref(params, images, config, absolute=False):
    """The model in float64; ``absolute``: the same computation on |weights| and |inputs|
    without ReLU (Higham's |A||B|... magnitude, the scale of the float32 error bound)."""
    f = lambda a: np.asarray(a, np.float64)
    act = (lambda v: v) if absolute else (lambda v: np.maximum(v, 0))
    bb, head = params["backbone"], params["head"]
    x = act(_conv_ref(f(images), f(bb["stem"]["kernel"]), f(bb["stem"]["bias"]), 1, 1, absolute))
    for i, (_, stride) in enumerate(config.blocks):
        blk = bb[f"block{i + 1}"]
        x = act(_conv_ref(x, f(blk["depthwise"]["kernel"]), f(blk["depthwise"]["bias"]),
                          stride, x.shape[-1], absolute))
        x = act(_conv_ref(x, f(blk["pointwise"]["kernel"]), f(blk["pointwise"]["bias"]),
                          1, 1, absolute))
    x = x.mean(axis=(1, 2))
    w = (lambda a: np.abs(f(a))) if absolute else f
    x = act(x @ w(head["dense1"]["kernel"]) + w(head["dense1"]["bias"]))
    return x @ w(head["dense2"]["kernel"]) + w(head["dense2"]["bias"])


def _roundings(config: VisionConfig) -> int:
    """Longest input-to-logit path: stem (9 Cin), per block depthwise (9) and pointwise
    (Cin), the mean pool (H W terms), dense1 (F), dense2 (hidden)."""
    fan_ins, cin = [9 * config.channels], config.stem_channels
    for cout, _ in config.blocks:
        fan_ins += [9, cin]
        cin = cout
    return tol.path_roundings(*fan_ins, config.image_size ** 2, config.feature_dim,
                              config.head_hidden)


def _perturbed(params, seed: int):
    # nonzero biases, so a misplaced bias add would show; numpy draws: jax.random's
    # threefry compiles once per leaf shape, ~10 s of a 2-core machine for this model
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x + 0.1 * rng.normal(size=x.shape).astype(np.float32),
                        params)


def test_apply_matches_numpy_reference_8x8_and_odd_size():
    for cfg in (VisionConfig(stem_channels=4, blocks=((6, 1), (8, 2)), head_hidden=5),
                VisionConfig(image_size=7, channels=3, num_classes=4, stem_channels=3,
                             blocks=((5, 2), (6, 2)), head_hidden=4)):
        model = vision_model(cfg)
        params = _perturbed(model.init(jax.random.key(0)), 1)
        images = np.random.default_rng(2).uniform(
            size=(3, cfg.image_size, cfg.image_size, cfg.channels)).astype(np.float32)
        # jitted: one compilation instead of one per eager op (the convolutions' taps)
        got = jax.jit(model.apply)(params["backbone"], params["head"], {"image": images})
        assert got.shape == (3, cfg.num_classes)
        want = _forward_ref(params, images, cfg)
        scale = _forward_ref(params, images, cfg, absolute=True)
        tol.assert_within(got, want, tol.f32_atol(_roundings(cfg), scale), f"apply {cfg}")


def test_per_example_heads_equal_one_head_per_row():
    model = vision_model(VisionConfig(stem_channels=4, blocks=((8, 2),), head_hidden=6))
    params = model.init(jax.random.key(0))
    # 4 different heads: the init's head, perturbed 4 ways (numpy draws, see _perturbed)
    heads = jax.tree.map(lambda *x: np.stack(x), *[_perturbed(params["head"], s)
                                                  for s in range(4)])
    images = np.random.default_rng(2).uniform(size=(4, 8, 8, 1)).astype(np.float32)
    apply = jax.jit(model.apply)
    got = apply(params["backbone"], heads, {"image": images})
    for b in range(4):
        one = jax.tree.map(lambda x, b=b: x[b], heads)
        want = apply(params["backbone"], one, {"image": images[b:b + 1]})[0]
        # the same sums on a batch of 1 vs 4: two float32 orders
        n = _roundings(model.impl.config)
        tol.assert_within(got[b], want, tol.f32_pair_atol(n, tol.MODEL_SCALE), f"row {b}")


def test_registered_and_embeds_sets_with_mask():
    assert "mobilenet" in MODELS
    model = get_model("mobilenet", ModelConfig(num_items=10))
    params = model.init(jax.random.key(0))
    sets = jnp.ones((2, 5, 8, 8, 1))
    feats, mask = model.embed_sequence(params["backbone"], sets)
    assert feats.shape == (2, 5, VisionConfig().feature_dim) and bool(mask.all())
    given = jnp.arange(5) < jnp.array([[2], [5]])
    _, mask = model.embed_sequence(params["backbone"], {"images": sets, "mask": given})
    np.testing.assert_array_equal(mask, given)


def test_generator_writes_exactly_the_vision_head_template():
    model = vision_model()
    template = model.head_template()
    gen = ParameterGenerator.for_head(template, hidden_dim=8, z_dim=4, encoder="set")
    f = model.impl.config.feature_dim
    params = init_generator(gen, jax.random.key(0), seq_len=6, feature_dim=f)
    feats = jax.random.normal(jax.random.key(1), (3, 6, f))
    heads = jax.jit(lambda p, f, m: generate(gen, p, f, m))(params, feats, jnp.ones((3, 6), bool))
    assert jax.tree.structure(heads) == jax.tree.structure(template)
    for got, want in zip(jax.tree.leaves(heads), jax.tree.leaves(template), strict=True):
        assert got.shape == (3, *want.shape) and got.dtype == want.dtype
    logits = jax.vmap(model.head_logits)(heads, jax.random.normal(jax.random.key(3), (3, 2, f)))
    assert logits.shape == (3, 2, 10)
