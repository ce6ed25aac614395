"""Decoder LM: masks against loop-built references, cached decoding against the uncached
forward, scan / remat / LoRA / packing invariances, logical axis names."""
import functools
import re

import flax
from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlpjax.models import decoder as decoder_lib
from vlpjax.models.decoder import Decoder, make_attention_mask

VOCAB, WIDTH = 40, 32


def tiny(**overrides):
  kwargs = dict(vocab_size=VOCAB, width=WIDTH, depth=2, mlp_dim=64, num_heads=4)
  kwargs.update(overrides)
  return Decoder(**kwargs)


def init(model, batch=2, length=6, encoded=None):
  """Real (boxed) init variables. Jitted, but still seconds: use `random_params` when the
  values of a fresh init do not matter."""
  x = jnp.zeros((batch, length, model.width))
  positions = jnp.zeros((batch, length), jnp.int32)
  mask = make_attention_mask(jnp.ones((batch, length), jnp.int32))
  return jax.jit(lambda: model.init(jax.random.PRNGKey(0), x, positions=positions,
                                    mask=mask, encoded=encoded))()


def random_params(model, seed=1, encoded=None):
  """Random params in the model's tree (norm scales near their identity, nothing zero)."""
  shapes = nn.unbox(jax.eval_shape(lambda: init(model, encoded=encoded)))["params"]
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    identity = 1.0 if path[-1].key == "scale" and not model.norm_offset else 0.0
    return jnp.asarray(identity + 0.2 * rng.standard_normal(leaf.shape), jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.partial(jax.jit, static_argnums=0)
def _forward(model, variables, tokens, positions, mask, kwargs):
  x = model.apply(variables, tokens, method=Decoder.embed)
  return model.apply(variables, x, positions=positions, mask=mask, **kwargs)[0]


def forward(model, variables, tokens, positions, mask, **kwargs):
  """Logits of the uncached forward (jitted, compiled once per model and shapes)."""
  return _forward(model, variables, tokens, positions, mask, kwargs)


def reference_mask(segment_ids, causal_attention=None):
  segment_ids = np.asarray(segment_ids)
  batch, length = segment_ids.shape
  mask = np.zeros((batch, 1, length, length), bool)
  for b in range(batch):
    for i in range(length):
      for j in range(length):
        seg_i, seg_j = segment_ids[b, i], segment_ids[b, j]
        if seg_i == 0 or seg_i != seg_j:
          continue
        bidirectional = (causal_attention is not None and causal_attention[b, i]
                         and causal_attention[b, j])
        mask[b, 0, i, j] = j <= i or bool(bidirectional)
  return mask


def test_mask_causal():
  segment_ids = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
  got = np.asarray(make_attention_mask(segment_ids))
  np.testing.assert_array_equal(got, reference_mask(segment_ids))
  # The first row is the plain lower triangle.
  np.testing.assert_array_equal(got[0, 0], np.tril(np.ones((5, 5), bool)))


def test_mask_prefix_lm():
  segment_ids = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
  causal_attention = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
  got = np.asarray(make_attention_mask(segment_ids, causal_attention))
  np.testing.assert_array_equal(got, reference_mask(segment_ids, causal_attention))
  assert got[0, 0, 0, 2] and not got[0, 0, 3, 4]  # Prefix sees ahead; suffix does not.


def test_mask_packed_segments_and_padding():
  segment_ids = np.array([[1, 1, 1, 2, 2, 2, 2, 3, 3, 0, 0],
                          [1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 0]])
  causal_attention = np.array([[1, 1, 0, 1, 1, 0, 0, 1, 0, 0, 0],
                               [1, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0]])
  got = np.asarray(make_attention_mask(segment_ids, causal_attention))
  np.testing.assert_array_equal(got, reference_mask(segment_ids, causal_attention))
  assert not got[0, 0, 9:].any()  # Padding attends nothing.
  got_causal = np.asarray(make_attention_mask(segment_ids))
  np.testing.assert_array_equal(got_causal, reference_mask(segment_ids))


def test_mask_rejects_bad_shapes():
  with pytest.raises(ValueError, match="segment_ids"):
    make_attention_mask(np.ones((4,)))
  with pytest.raises(ValueError, match="causal_attention"):
    make_attention_mask(np.ones((2, 4)), np.ones((2, 3)))


def test_rope_attention_depends_only_on_relative_position():
  """<rope(q, m), rope(k, n)> is a function of m - n (what makes restarted positions work)."""
  q, k = jax.random.normal(jax.random.PRNGKey(0), (2, 1, 1, 1, 16))
  rope = lambda x, p: decoder_lib.apply_rope(x, jnp.array([[p]]), 10_000.)
  dot = lambda m, n: float(jnp.sum(rope(q, m) * rope(k, n)))
  assert dot(7, 3) == pytest.approx(dot(4, 0), abs=1e-5)
  assert dot(7, 3) != pytest.approx(dot(7, 4), abs=1e-3)
  # Position 0 is the identity; rotation keeps norms.
  np.testing.assert_allclose(rope(q, 0), q, atol=1e-6)
  np.testing.assert_allclose(jnp.linalg.norm(rope(q, 5)), jnp.linalg.norm(q), rtol=1e-5)


@pytest.mark.parametrize("scan_layers,num_kv_heads", [
    (False, None), (True, None), (False, 1), (True, 2)])
def test_cached_decoding_matches_uncached(scan_layers, num_kv_heads):
  """Prefill a prefix-LM prompt into the cache, then one token at a time."""
  model = tiny(scan_layers=scan_layers, num_kv_heads=num_kv_heads)
  variables = {"params": random_params(model)}
  batch, length, prompt_len, max_len = 2, 7, 3, 9
  tokens = jax.random.randint(jax.random.PRNGKey(3), (batch, length), 2, VOCAB)
  positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
  causal_attention = jnp.array([[1, 1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0]])
  mask = make_attention_mask(jnp.ones((batch, length), jnp.int32), causal_attention)
  expected = forward(model, variables, tokens, positions, mask)

  @jax.jit
  def step(cache, token_ids, pos, key_mask, index):
    x = model.apply(variables, token_ids, method=Decoder.embed)
    return model.apply(variables, x, positions=pos, mask=key_mask, cache=cache,
                       cache_index=index)

  cache = model.init_cache(batch, max_len)
  assert all(leaf.shape[model.cache_batch_axis] == batch
             for leaf in jax.tree_util.tree_leaves(cache))
  # Prompt: the prefix-LM mask, padded with invisible slots up to max_len.
  prefill_mask = jnp.zeros((batch, 1, prompt_len, max_len), bool)
  prefill_mask = prefill_mask.at[..., :prompt_len].set(mask[..., :prompt_len, :prompt_len])
  logits, cache = step(cache, tokens[:, :prompt_len], positions[:, :prompt_len],
                       prefill_mask, 0)
  got = [logits]
  for t in range(prompt_len, length):
    key_mask = jnp.broadcast_to(jnp.arange(max_len) <= t, (batch, 1, 1, max_len))
    logits, cache = step(cache, tokens[:, t:t + 1], positions[:, t:t + 1], key_mask, t)
    got.append(logits)
  np.testing.assert_allclose(jnp.concatenate(got, axis=1), expected, atol=1e-5)


def restack(params, depth):
  """Unscanned `layers/layers_{i}` params -> scanned `layers/scanned` (leading depth axis)."""
  per_layer = [params["layers"][f"layers_{i}"] for i in range(depth)]
  stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *per_layer)
  return {**params, "layers": {"scanned": stacked}}


def test_scan_layers_matches_unscanned():
  plain, scanned = tiny(cross_attention=True), tiny(cross_attention=True, scan_layers=True)
  encoded = jax.random.normal(jax.random.PRNGKey(4), (2, 3, 24))
  params = random_params(plain, encoded=encoded)
  scanned_params = restack(params, plain.depth)
  # Same tree as a scanned model's own init.
  own = nn.unbox(jax.eval_shape(lambda: init(scanned, encoded=encoded)))["params"]
  assert (jax.tree_util.tree_map(jnp.shape, own)
          == jax.tree_util.tree_map(jnp.shape, scanned_params))
  tokens = jax.random.randint(jax.random.PRNGKey(5), (2, 6), 2, VOCAB)
  positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
  mask = make_attention_mask(jnp.ones((2, 6), jnp.int32))
  encoded_mask = jnp.array([[1, 1, 0], [1, 1, 1]], bool)
  kwargs = dict(encoded=encoded, encoded_mask=encoded_mask)
  want = forward(plain, {"params": params}, tokens, positions, mask, **kwargs)
  got = forward(scanned, {"params": scanned_params}, tokens, positions, mask, **kwargs)
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_cross_attention_ignores_masked_encoder_tokens():
  model = tiny(cross_attention=True, depth=1)
  encoded = jax.random.normal(jax.random.PRNGKey(4), (2, 3, 24))
  variables = {"params": random_params(model, encoded=encoded)}
  tokens = jax.random.randint(jax.random.PRNGKey(5), (2, 4), 2, VOCAB)
  positions = jnp.broadcast_to(jnp.arange(4), (2, 4))
  mask = make_attention_mask(jnp.ones((2, 4), jnp.int32))
  encoded_mask = jnp.array([[1, 1, 0], [1, 1, 0]], bool)
  run = lambda enc: forward(model, variables, tokens, positions, mask, encoded=enc,
                            encoded_mask=encoded_mask)
  changed = encoded.at[:, 2].set(100.)
  np.testing.assert_allclose(run(changed), run(encoded), atol=1e-5)
  changed_visible = encoded.at[:, 1].set(100.)
  assert np.abs(run(changed_visible) - run(encoded)).max() > 1e-3


def test_packed_row_equals_segments_run_alone():
  model = tiny(num_kv_heads=2)
  variables = {"params": random_params(model)}
  segment_ids = jnp.array([[1, 1, 1, 2, 2, 2, 2, 3, 3, 0, 0]])
  causal_attention = jnp.array([[1, 1, 0, 1, 1, 0, 0, 1, 0, 0, 0]])
  positions = jnp.array([[0, 1, 2, 0, 1, 2, 3, 0, 1, 0, 0]])
  tokens = jax.random.randint(jax.random.PRNGKey(6), segment_ids.shape, 2, VOCAB)
  tokens = jnp.where(segment_ids > 0, tokens, 0)
  packed = forward(model, variables, tokens, positions,
                   make_attention_mask(segment_ids, causal_attention))
  assert np.isfinite(np.asarray(packed)).all()  # Padding rows attend nothing, yet no NaN.
  # Each segment alone in its own row (left-aligned, padded to the longest: one compile).
  segments = [np.flatnonzero(np.asarray(segment_ids[0]) == s) for s in (1, 2, 3)]
  alone_len = max(map(len, segments))
  alone_tokens = np.zeros((3, alone_len), np.int32)
  alone_segments = np.zeros((3, alone_len), np.int32)
  alone_causal = np.zeros((3, alone_len), np.int32)
  for row, where in enumerate(segments):
    alone_tokens[row, :len(where)] = tokens[0, where]
    alone_segments[row, :len(where)] = 1
    alone_causal[row, :len(where)] = causal_attention[0, where]
  alone = forward(model, variables, alone_tokens,
                  jnp.broadcast_to(jnp.arange(alone_len), (3, alone_len)),
                  make_attention_mask(alone_segments, alone_causal))
  for row, where in enumerate(segments):
    np.testing.assert_allclose(packed[0, where], alone[row, :len(where)], atol=1e-5)


@pytest.mark.parametrize("scan_layers,policy", [(False, "full"), (True, "dots_saveable")])
def test_remat_keeps_values_and_grads(scan_layers, policy):
  tokens = jax.random.randint(jax.random.PRNGKey(7), (2, 5), 2, VOCAB)
  positions = jnp.broadcast_to(jnp.arange(5), (2, 5))
  mask = make_attention_mask(jnp.ones((2, 5), jnp.int32))
  params = random_params(tiny(scan_layers=scan_layers, depth=1))

  def loss_and_grad(policy):
    model = tiny(scan_layers=scan_layers, depth=1, remat_policy=policy)
    loss = lambda p: jnp.mean(forward(model, {"params": p}, tokens, positions, mask) ** 2)
    return jax.jit(jax.value_and_grad(loss))(params)

  base_loss, base_grad = loss_and_grad("none")
  loss, grad = loss_and_grad(policy)
  np.testing.assert_allclose(loss, base_loss, rtol=1e-6)
  # Recomputation may reassociate float sums: equal up to f32 rounding.
  jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), grad, base_grad)


def test_lora_starts_at_base_model_and_is_wired():
  base, adapted = tiny(num_kv_heads=2, depth=1), tiny(num_kv_heads=2, depth=1, lora_rank=4)
  lora_params = nn.unbox(init(adapted))["params"]
  flat = flax.traverse_util.flatten_dict(lora_params, sep="/")
  lora_names = [k for k in flat if "lora" in k]
  # Every q/k/v/o and gate/up/down kernel has an (a, b) pair.
  assert len(lora_names) == 7 * 2
  for name in ("self_attn/q_proj", "self_attn/o_proj", "mlp/gate_proj", "mlp/down_proj"):
    assert f"layers/layers_0/{name}/lora_a" in flat
    assert f"layers/layers_0/{name}/lora_b" in flat
  assert flat["layers/layers_0/self_attn/q_proj/lora_a"].shape == (WIDTH, 4)
  assert flat["layers/layers_0/self_attn/o_proj/lora_b"].shape == (4, WIDTH)
  # A base-freezing regex (as an optimizer's freeze rule would use) keeps exactly the LoRA.
  frozen = re.compile(r"llm/(?!.*lora).*")
  assert {k for k in flat if not frozen.fullmatch("llm/" + k)} == set(lora_names)

  base_params = flax.traverse_util.unflatten_dict(
      {k: v for k, v in flat.items() if "lora" not in k}, sep="/")
  assert (jax.tree_util.tree_structure(base_params)
          == jax.tree_util.tree_structure(nn.unbox(jax.eval_shape(lambda: init(base)))["params"]))
  tokens = jax.random.randint(jax.random.PRNGKey(8), (2, 5), 2, VOCAB)
  positions = jnp.broadcast_to(jnp.arange(5), (2, 5))
  mask = make_attention_mask(jnp.ones((2, 5), jnp.int32))
  want = forward(base, {"params": base_params}, tokens, positions, mask)
  got = forward(adapted, {"params": lora_params}, tokens, positions, mask)
  np.testing.assert_allclose(got, want, atol=1e-6)
  # Non-zero `lora_b` must change the output (the adapter is on the computation path).
  trained = dict(flat)
  trained["layers/layers_0/mlp/down_proj/lora_b"] = jnp.full((4, WIDTH), 0.1)
  moved = forward(adapted, {"params": flax.traverse_util.unflatten_dict(trained, sep="/")},
                  tokens, positions, mask)
  assert np.abs(moved - want).max() > 1e-3


def test_lora_matches_merged_kernel():
  """The adapter adds (x @ a @ b) * alpha / rank: merging it into the kernel is equivalent."""
  dense = decoder_lib.LoraDense((3, 4), ("embed",), ("heads", "kv"), lora_rank=2,
                                lora_alpha=8.0)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 6))
  rng = np.random.default_rng(0)
  shapes = nn.unbox(jax.eval_shape(dense.init, jax.random.PRNGKey(1), x))["params"]
  params = jax.tree_util.tree_map(lambda p: jnp.asarray(rng.standard_normal(p.shape)), shapes)
  merged = params["kernel"] + 4.0 * jnp.einsum("ir,rhd->ihd", params["lora_a"],
                                                params["lora_b"])
  want = jnp.einsum("bli,ihd->blhd", x, merged)
  np.testing.assert_allclose(dense.apply({"params": params}, x), want, atol=1e-5)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_every_param_has_logical_names(scan_layers):
  model = tiny(scan_layers=scan_layers, num_kv_heads=2, lora_rank=2, cross_attention=True,
               tie_embeddings=False)
  encoded = jnp.zeros((2, 3, 24))
  boxed = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((2, 4, WIDTH)),
      positions=jnp.zeros((2, 4), jnp.int32),
      mask=make_attention_mask(jnp.ones((2, 4), jnp.int32)), encoded=encoded))
  specs = flax.traverse_util.flatten_dict(nn.get_partition_spec(boxed)["params"], sep="/")
  shapes = flax.traverse_util.flatten_dict(nn.unbox(boxed)["params"], sep="/")
  assert specs.keys() == shapes.keys()
  for name, spec in specs.items():
    assert spec is not None and len(spec) == len(shapes[name].shape), name
    assert all(axis is not None for axis in spec), (name, spec)
    assert len(set(spec)) == len(spec), (name, spec)  # No name used twice in one kernel.
    if scan_layers and name.startswith("layers/"):
      assert spec[0] == "layers", (name, spec)
  assert tuple(specs["lm_head/kernel"]) == ("embed", "vocab")
  assert tuple(specs["embed_tokens/embedding"]) == ("vocab", "embed")


def test_norm_offset_and_embed_scale():
  """Gemma style: scale stored as an offset from 1 (init zeros), embeddings times sqrt(width)."""
  model = tiny(norm_offset=1.0, embed_scale=True)
  params = random_params(model)
  tokens = jnp.array([[3, 5]])
  got = model.apply({"params": params}, tokens, method=Decoder.embed)
  want = params["embed_tokens"]["embedding"][tokens] * np.sqrt(WIDTH)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # A fresh norm (either convention) is x / rms(x).
  for offset in (0.0, 1.0):
    norm = decoder_lib.RMSNorm(eps=1e-6, norm_offset=offset)
    x = jax.random.normal(jax.random.PRNGKey(0), (3, WIDTH))
    norm_params = nn.unbox(norm.init(jax.random.PRNGKey(0), x))
    np.testing.assert_array_equal(norm_params["params"]["scale"], np.full(WIDTH, 1 - offset))
    out = norm.apply(norm_params, x)
    want = x / np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(out, want, rtol=1e-5)


def test_bad_inputs_raise_clear_errors():
  model = tiny()
  variables = {"params": random_params(model)}
  x = jnp.zeros((2, 4, WIDTH))
  positions = jnp.zeros((2, 4), jnp.int32)
  with pytest.raises(ValueError, match="mask shape"):
    model.apply(variables, x, positions=positions,
                mask=make_attention_mask(jnp.ones((2, 5), jnp.int32)))
  with pytest.raises(ValueError, match="cache_index"):
    model.apply(variables, x, positions=positions, mask=jnp.ones((2, 1, 4, 8), bool),
                cache=model.init_cache(2, 8))
  with pytest.raises(ValueError, match="num_kv_heads"):
    tiny(num_kv_heads=3).init_cache(1, 4)
  with pytest.raises(ValueError, match="activation"):
    tiny(activation="relu6").init_cache(1, 4)
  with pytest.raises(ValueError, match="encoded"):
    init(tiny(cross_attention=True))
  with pytest.raises(ValueError, match="encoded must be"):
    init(tiny(cross_attention=True), batch=2, encoded=jnp.zeros((3, 4, 8)))
  with pytest.raises(ValueError, match="encoded_mask"):
    jax.eval_shape(lambda: tiny(cross_attention=True).init(
        jax.random.PRNGKey(0), x, positions=positions,
        mask=make_attention_mask(jnp.ones((2, 4), jnp.int32)),
        encoded=jnp.zeros((2, 3, 8)), encoded_mask=jnp.ones((2, 4), bool)))


def test_sharded_forward_matches_unsharded():
  """Under the fsdp_tensor rules on 8 devices the logical constraints are valid (every name
  is in the rules) and change nothing numerically, cached path included."""
  from vlpjax import sharding
  model = tiny(num_kv_heads=2, scan_layers=True, lora_rank=2, cross_attention=True)
  encoded = jax.random.normal(jax.random.PRNGKey(4), (4, 3, 24))
  params = random_params(model, encoded=encoded[:2])
  tokens = jax.random.randint(jax.random.PRNGKey(9), (4, 6), 2, VOCAB)
  positions = jnp.broadcast_to(jnp.arange(6), (4, 6))
  mask = make_attention_mask(jnp.ones((4, 6), jnp.int32))
  want = forward(model, {"params": params}, tokens, positions, mask, encoded=encoded)

  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = sharding.rules_preset("fsdp_tensor")
  boxed = jax.eval_shape(lambda: init(model, encoded=encoded[:2]))
  sharded = jax.device_put(params, sharding.param_shardings(boxed["params"], mesh, rules))
  with sharding.logical_context(mesh, rules):

    @jax.jit
    def prefill(params):
      variables = {"params": params}
      x = model.apply(variables, tokens, method=Decoder.embed)
      key_mask = jnp.zeros((4, 1, 6, 8), bool).at[..., :6].set(mask)
      return model.apply(variables, x, positions=positions, mask=key_mask,
                         cache=model.init_cache(4, 8), cache_index=0, encoded=encoded)[0]

    got = prefill(sharded)
  np.testing.assert_allclose(got, want, atol=1e-5)
