"""Decoding against references: python-loop greedy, exhaustive search, sampling statistics."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vlpjax import decoding
from vlpjax.decoding import DecodeConfig

EOS = 1
# Compiled whole: cheaper than the many small eager ops (test_jit_decode_matches_eager checks
# that both agree).
jit_decode = jax.jit(decoding.decode, static_argnums=0, static_argnames="config")


def log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


class Toy:
  """A deterministic 'language model' whose logits depend on the whole prefix.

  logits(prefix) = table[hash(prefix)] + bias[example, len(prefix)]. The hash is order-aware,
  so a beam reordered wrongly (a cache row from the wrong parent) changes later logits, and
  the per-example, per-step bias catches rows mixed across examples and steers EOS.
  """
  states = 16

  def __init__(self, seed, batch, vocab, max_len, eos_bias=0.0, scale=2.0):
    r = np.random.default_rng(seed)
    self.vocab = vocab
    self.table = (r.normal(size=(self.states, vocab)) * scale).astype(np.float32)
    self.bias = r.normal(size=(batch, max_len + 1, vocab)).astype(np.float32)
    self.bias[:, :, EOS] += eos_bias
    self.h0 = r.integers(0, self.states, size=batch).astype(np.int32)

  def next_state(self, h, token):
    return (h * 5 + token + 1) % self.states

  def logits_np(self, b, prefix):
    h = self.h0[b]
    for token in prefix:
      h = self.next_state(h, token)
    return self.table[h] + self.bias[b, len(prefix)]

  def start(self):
    first = self.table[self.h0] + self.bias[:, 0]
    return jnp.asarray(first), {"h": jnp.asarray(self.h0), "bias": jnp.asarray(self.bias)}

  def step(self, tokens, cache, t):
    h = self.next_state(cache["h"], tokens)
    logits = jnp.asarray(self.table)[h] + cache["bias"][:, t + 1]
    return logits, {"h": h, "bias": cache["bias"]}

  def decode(self, config, **kwargs):
    first, cache = self.start()
    out = jit_decode(self.step, first, cache, config=config, **kwargs)
    return {k: np.asarray(v) for k, v in out.items()}


def greedy_np(toy, b, max_len):
  prefix, score = [], 0.0
  for _ in range(max_len):
    logprobs = log_softmax(toy.logits_np(b, prefix))
    token = int(np.argmax(logprobs))
    prefix.append(token)
    score += logprobs[token]
    if token == EOS:
      break
  return prefix, score


def exhaustive_np(toy, b, max_len, alpha):
  """The best complete sequence (ends in EOS, or reaches max_len) under the beam score."""
  best = [-np.inf, None]

  def visit(prefix, logp):
    logprobs = log_softmax(toy.logits_np(b, prefix))
    for token in range(toy.vocab):
      seq, total = prefix + [token], logp + logprobs[token]
      if token == EOS or len(seq) == max_len:
        score = total / ((5 + len(seq)) / 6) ** alpha
        if score > best[0]:
          best[:] = [score, seq]
      else:
        visit(seq, total)

  visit([], 0.0)
  return best[1], best[0]


def padded(seq, max_len):
  return np.array(list(seq) + [0] * (max_len - len(seq)), np.int32)


def cut_after_eos(seq):
  seq = list(seq)
  return seq[:seq.index(EOS) + 1] if EOS in seq else seq


def count_steps(step_fn, calls):
  """step_fn that records every call, also from inside a compiled while_loop."""
  def counted(tokens, cache, t):
    jax.debug.callback(lambda t: calls.append(int(t)), t)
    return step_fn(tokens, cache, t)
  return counted


# -- config ----------------------------------------------------------------------------------


def test_config_from_dict_and_validation():
  config = DecodeConfig.from_dict({"method": "beam", "beam_size": 2, "length_penalty": 1})
  assert config == DecodeConfig(method="beam", beam_size=2, length_penalty=1.0)
  assert hash(config) == hash(DecodeConfig(method="beam", beam_size=2, length_penalty=1.0))
  with pytest.raises(ValueError, match="beam_szie.*did you mean 'beam_size'"):
    DecodeConfig.from_dict({"beam_szie": 2})
  with pytest.raises(ValueError, match="did you mean 'beam'"):
    DecodeConfig(method="beem")
  for bad in (dict(beam_size=0), dict(top_p=0.0), dict(top_p=1.5), dict(temperature=0.0),
              dict(top_k=-1), dict(max_decode_len=0), dict(max_decode_len=2.0),
              dict(eos_id=-1), dict(temperature="hot")):
    field = next(iter(bad))
    with pytest.raises(ValueError, match=field):
      DecodeConfig(**bad)


def test_bad_inputs_are_named():
  toy = Toy(0, batch=2, vocab=5, max_len=3)
  first, cache = toy.start()
  decode = functools.partial(decoding.decode, toy.step, first, cache)
  with pytest.raises(ValueError, match="needs an rng"):
    decode(config=DecodeConfig(method="sample", max_decode_len=3))
  with pytest.raises(ValueError, match="eos_id 7"):
    decode(config=DecodeConfig(max_decode_len=3, eos_id=7))
  beam = DecodeConfig(method="beam", max_decode_len=3)
  with pytest.raises(ValueError, match=r"\['bias'\] of shape \(2, 4, 5\) has no batch axis 1"):
    decode(config=beam, cache_batch_axes=1)
  with pytest.raises(ValueError, match="prefix of the cache"):
    decode(config=beam, cache_batch_axes={"x": 0})
  with pytest.raises(ValueError, match="keep shapes and dtypes"):
    decoding.decode(lambda tok, c, t: (toy.step(tok, c, t)[0], dict(c, h=c["h"][:1])),
                    first, cache, config=DecodeConfig(max_decode_len=3))


# -- greedy ----------------------------------------------------------------------------------


def _steered_toy(max_len):
  """Row 0 ends with its third token, row 1 never emits EOS, row 2 as it comes."""
  toy = Toy(1, batch=3, vocab=6, max_len=max_len)
  toy.bias[:2, :, EOS] -= 30.0
  toy.bias[0, 2, EOS] += 60.0
  return toy


def test_greedy_matches_python_loop():
  max_len = 7
  toy = _steered_toy(max_len)
  out = toy.decode(DecodeConfig(max_decode_len=max_len))
  lengths = []
  for b in range(3):
    seq, score = greedy_np(toy, b, max_len)
    np.testing.assert_array_equal(out["tokens"][b], padded(seq, max_len))
    assert out["lengths"][b] == len(seq)
    np.testing.assert_allclose(out["scores"][b], score, rtol=1e-5, atol=1e-5)
    lengths.append(len(seq))
  assert lengths[0] == 3 and lengths[1] == max_len


def test_eos_stops_rows_and_the_loop():
  max_len = 8
  toy = Toy(2, batch=3, vocab=5, max_len=max_len)
  toy.bias[:, :, EOS] -= 30.0
  for b, end in enumerate((2, 5, 3)):  # row b emits EOS as token number `end` (0-based)
    toy.bias[b, end, EOS] += 60.0
  calls = []
  first, cache = toy.start()
  out = jit_decode(count_steps(toy.step, calls), first, cache,
                        config=DecodeConfig(max_decode_len=max_len))
  tokens, lengths = np.asarray(out["tokens"]), np.asarray(out["lengths"])
  np.testing.assert_array_equal(lengths, [3, 6, 4])
  for b, length in enumerate(lengths):
    assert tokens[b, length - 1] == EOS
    assert np.all(tokens[b, :length - 1] != EOS) and np.all(tokens[b, length:] == 0)
  # The last row finishes with token 5: steps t = 0..4 were needed, none after.
  assert sorted(calls) == [0, 1, 2, 3, 4]

  calls.clear()
  toy.bias[:, :, EOS] -= 100.0  # nobody stops: every step runs, the last token's never does
  first, cache = toy.start()
  out = jit_decode(count_steps(toy.step, calls), first, cache,
                        config=DecodeConfig(max_decode_len=max_len))
  np.testing.assert_array_equal(out["lengths"], [max_len] * 3)
  assert sorted(calls) == list(range(max_len - 1))


# -- beam search -----------------------------------------------------------------------------


def test_beam_size_one_equals_greedy():
  max_len = 7
  toy = _steered_toy(max_len)
  greedy = toy.decode(DecodeConfig(max_decode_len=max_len))
  beam = toy.decode(DecodeConfig(method="beam", beam_size=1, max_decode_len=max_len))
  np.testing.assert_array_equal(beam["tokens"], greedy["tokens"])
  np.testing.assert_array_equal(beam["lengths"], greedy["lengths"])
  penalty = ((5 + greedy["lengths"]) / 6) ** 0.6
  np.testing.assert_allclose(beam["scores"], greedy["scores"] / penalty, rtol=1e-5)


@pytest.mark.parametrize("alpha", [0.6, 2.0])
def test_wide_beam_equals_exhaustive_search(alpha):
  # V=4, 4 tokens: at most 3**3 = 27 alive prefixes, so 32 beams lose nothing.
  batch, vocab, max_len = 4, 4, 4
  toy = Toy(11, batch=batch, vocab=vocab, max_len=max_len, scale=1.5)
  out = toy.decode(DecodeConfig(method="beam", beam_size=32, max_decode_len=max_len,
                                length_penalty=alpha))
  greedy = toy.decode(DecodeConfig(max_decode_len=max_len))
  differs_from_greedy, lengths = False, set()
  for b in range(batch):
    seq, score = exhaustive_np(toy, b, max_len, alpha)
    np.testing.assert_array_equal(out["tokens"][b], padded(seq, max_len))
    assert out["lengths"][b] == len(seq)
    np.testing.assert_allclose(out["scores"][b], score, rtol=1e-5, atol=1e-5)
    differs_from_greedy |= not np.array_equal(greedy["tokens"][b], padded(seq, max_len))
    lengths.add(len(seq))
  # The case has teeth: search beats greedy somewhere, and both kinds of ending occur.
  assert differs_from_greedy
  assert max_len in lengths and min(lengths) < max_len


def test_beam_stops_early_once_nothing_can_win():
  max_len = 8
  toy = Toy(4, batch=2, vocab=6, max_len=max_len)
  toy.bias[:, :, EOS] -= 30.0
  toy.bias[:, 2, EOS] += 70.0  # every beam of every example ends with its third token
  calls = []
  first, cache = toy.start()
  out = jit_decode(count_steps(toy.step, calls), first, cache,
                        config=DecodeConfig(method="beam", beam_size=3,
                                            max_decode_len=max_len))
  np.testing.assert_array_equal(out["lengths"], [3, 3])
  assert np.all(np.asarray(out["tokens"])[:, 3:] == 0)
  assert sorted(calls) == [0, 1]


def test_cache_batch_axes_prefix_reorders_every_leaf():
  """Beam state with batch axis 1 and a shared leaf decodes exactly like the axis-0 layout."""
  max_len = 6
  toy = Toy(5, batch=3, vocab=6, max_len=max_len, eos_bias=-1.0)
  config = DecodeConfig(method="beam", beam_size=3, max_decode_len=max_len)
  reference = toy.decode(config)

  def step_axis1(tokens, cache, t):
    base = {"h": cache["h"][0], "bias": jnp.moveaxis(cache["bias"], 1, 0)}
    logits, new = toy.step(tokens, base, t)
    logits = logits + cache["shared"][None]
    return logits, {"h": new["h"][None], "bias": jnp.moveaxis(new["bias"], 0, 1),
                    "shared": cache["shared"]}

  first, cache = toy.start()
  cache = {"h": cache["h"][None], "bias": jnp.moveaxis(cache["bias"], 0, 1),
           "shared": jnp.zeros((toy.vocab,))}  # no batch axis: must not be repeated
  axes = {"h": 1, "bias": 1, "shared": None}  # a dict is no static argument: close over it
  out = jax.jit(functools.partial(decoding.decode, step_axis1, config=config,
                                  cache_batch_axes=axes))(first, cache)
  for key in ("tokens", "lengths"):
    np.testing.assert_array_equal(out[key], reference[key])
  np.testing.assert_allclose(out["scores"], reference["scores"], rtol=1e-6)


# -- sampling --------------------------------------------------------------------------------


def _sampling_toy(max_len, batch=16):
  return Toy(6, batch=batch, vocab=8, max_len=max_len, eos_bias=-1.0, scale=1.0)


def _replayed_logits(toy, tokens, lengths):
  """(row, step, logits, token) for every generated token, replayed in numpy."""
  for b, length in enumerate(lengths):
    for i in range(length):
      yield b, i, toy.logits_np(b, list(tokens[b, :i])), tokens[b, i]


def test_sampling_limits_equal_greedy():
  max_len = 6
  toy = _sampling_toy(max_len)
  greedy = toy.decode(DecodeConfig(max_decode_len=max_len))["tokens"]
  rng = jax.random.key(0)
  for limit in (dict(temperature=1e-4), dict(top_k=1), dict(top_p=1e-3)):
    out = toy.decode(DecodeConfig(method="sample", max_decode_len=max_len, **limit), rng=rng)
    np.testing.assert_array_equal(out["tokens"], greedy, err_msg=str(limit))


def test_sampling_filters_and_rngs():
  max_len, k, p = 6, 3, 0.6
  toy = _sampling_toy(max_len)
  greedy = toy.decode(DecodeConfig(max_decode_len=max_len))["tokens"]
  top_k = DecodeConfig(method="sample", max_decode_len=max_len, top_k=k)
  a = toy.decode(top_k, rng=jax.random.key(1))
  np.testing.assert_array_equal(toy.decode(top_k, rng=jax.random.key(1))["tokens"],
                                a["tokens"])
  assert not np.array_equal(toy.decode(top_k, rng=jax.random.key(2))["tokens"], a["tokens"])
  assert not np.array_equal(a["tokens"], greedy)
  not_argmax = 0
  for b, _, logits, token in _replayed_logits(toy, a["tokens"], a["lengths"]):
    assert logits[token] >= np.sort(logits)[-k]
    not_argmax += token != np.argmax(logits)
  assert not_argmax > 0
  scores = [sum(log_softmax(logits)[token]
                for r, _, logits, token in _replayed_logits(toy, a["tokens"], a["lengths"])
                if r == b) for b in range(len(a["lengths"]))]
  np.testing.assert_allclose(a["scores"], scores, rtol=1e-4, atol=1e-4)

  nucleus = toy.decode(DecodeConfig(method="sample", max_decode_len=max_len, top_p=p),
                       rng=jax.random.key(3))
  for _, _, logits, token in _replayed_logits(toy, nucleus["tokens"], nucleus["lengths"]):
    assert filtered_probs_np(logits, top_p=p)[token] > 0


def filtered_probs_np(logits, temperature=1.0, top_k=0, top_p=1.0):
  """The sampling distribution: temperature, then top-k, then the top-p nucleus."""
  logits = np.asarray(logits, np.float64) / temperature
  if top_k:
    logits = np.where(logits >= np.sort(logits)[-top_k], logits, -np.inf)
  probs = np.exp(log_softmax(logits))
  order = np.argsort(-probs)
  mass_before = np.cumsum(probs[order]) - probs[order]
  keep = np.zeros_like(probs, bool)
  keep[order[mass_before < top_p]] = True
  probs = np.where(keep, probs, 0.0)
  return probs / probs.sum()


@pytest.mark.parametrize("filters", [
    {},
    # .16 .49 .09 .26 -> (temperature) .21 .37 .16 .27 -> (top-k) .25 .43 0 .32 -> (top-p)
    # 0 .58 0 .42. Leaving out a filter, or applying them in another order, differs.
    dict(temperature=2.0, top_k=3, top_p=0.7),
])
def test_sampled_token_distribution(filters):
  logits = np.log(np.array([0.16, 0.49, 0.09, 0.26]))
  n = 20_000
  first = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, 4))
  calls = []
  no_step = count_steps(lambda tokens, cache, t: (jnp.zeros((n, 4)), cache), calls)
  config = DecodeConfig(method="sample", max_decode_len=1, eos_id=3, **filters)
  out = jit_decode(no_step, first, {}, config=config, rng=jax.random.key(7))
  frequencies = np.bincount(np.asarray(out["tokens"])[:, 0], minlength=4) / n
  assert not calls  # one token needs no step
  np.testing.assert_allclose(frequencies, filtered_probs_np(logits, **filters), atol=0.015)


# -- jit -------------------------------------------------------------------------------------


def test_jit_decode_matches_eager():
  max_len = 5
  toy = _steered_toy(max_len)
  config = DecodeConfig(method="greedy", max_decode_len=max_len)
  rng = jax.random.key(0)
  first, cache = toy.start()
  jitted = jax.jit(decoding.decode, static_argnums=0, static_argnames="config")
  compiled = jitted(toy.step, first, cache, config=config, rng=rng)
  eager = decoding.decode(toy.step, first, cache, config=config, rng=rng)
  for key in ("tokens", "lengths", "scores"):
    np.testing.assert_allclose(compiled[key], eager[key], rtol=1e-6)


# -- prefix-LM decoding with the KV-cached Decoder -------------------------------------------


def _random_decoder(scan_layers, cross_attention=False, vocab=50, width=32):
  """A tiny Decoder and random variables (numpy: no initialiser to compile)."""
  from vlpjax.models import decoder as decoder_lib  # pylint: disable=g-import-not-at-top

  model = decoder_lib.Decoder(vocab_size=vocab, width=width, depth=2, mlp_dim=64,
                              num_heads=4, num_kv_heads=2, scan_layers=scan_layers,
                              cross_attention=cross_attention, tie_embeddings=False)
  encoded = jnp.zeros((1, 2, width)) if cross_attention else None
  shapes = jax.eval_shape(functools.partial(
      model.init, positions=jnp.zeros((1, 1), jnp.int32), mask=jnp.ones((1, 1, 1, 1), bool),
      encoded=encoded), jax.random.key(0), jnp.zeros((1, 1, width)))
  r = np.random.default_rng(0)

  def random_param(path, leaf):
    # Logits of std ~3 put argmax margins far above float noise, so cached and uncached
    # paths must agree token for token; an untied head keeps the model from merely repeating
    # its input.
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return jnp.ones(leaf.shape, leaf.dtype)
    std = 1.0 if "embed_tokens" in name else 0.5 if "lm_head" in name else 0.2
    return jnp.asarray(r.normal(size=leaf.shape) * std, leaf.dtype)

  return model, jax.tree_util.tree_map_with_path(random_param, shapes)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_cached_decoder_greedy_equals_uncached(scan_layers):
  """prefix_lm_step_fn + decode == re-running the whole uncached model for every token."""
  from vlpjax.models import decoder as decoder_lib  # pylint: disable=g-import-not-at-top

  batch, prompt_len, steps = 3, 5, 8
  model, variables = _random_decoder(scan_layers)
  # (Seed 4: one row meets EOS mid-way without a cache and at once with a scanned one.)
  prompt = np.random.default_rng(4).integers(2, 50, size=(batch, prompt_len))

  def embed(tokens):
    return model.apply(variables, tokens, method=decoder_lib.Decoder.embed)

  def apply(x, positions, mask, cache, cache_index):
    return model.apply(variables, x, positions=positions, mask=mask, cache=cache,
                       cache_index=cache_index)

  @jax.jit
  def cached(prompt):
    lm = decoding.prefix_lm_step_fn(
        apply, embed, embed(prompt), jnp.ones(prompt.shape, bool),
        init_cache=model.init_cache, max_decode_len=steps,
        cache_batch_axis=model.cache_batch_axis)
    return decoding.decode(lm.step_fn, lm.first_logits, lm.cache,
                           config=DecodeConfig(max_decode_len=steps),
                           cache_batch_axes=lm.cache_batch_axes)["tokens"]

  @jax.jit
  def logits_at(tokens, index):
    # The whole row every time. Slots after `index` hold zeros, which causal attention keeps
    # from every position up to `index`: one shape, one compilation.
    prefix = jnp.arange(tokens.shape[1]) < prompt_len
    mask = decoder_lib.make_attention_mask(jnp.ones_like(tokens),
                                           jnp.broadcast_to(prefix, tokens.shape))
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    logits, _ = model.apply(variables, embed(tokens), positions=positions, mask=mask)
    return logits[:, index]

  tokens = np.concatenate([prompt, np.zeros((batch, steps), np.int32)], axis=1)
  for i in range(steps):  # rows are independent: run all on, then cut each after its EOS
    tokens[:, prompt_len + i] = np.argmax(logits_at(tokens, prompt_len + i - 1), axis=-1)
  reference = np.stack([padded(cut_after_eos(row), steps) for row in tokens[:, prompt_len:]])
  np.testing.assert_array_equal(cached(prompt), reference)
  assert len(set(map(tuple, reference))) == batch  # the prompts lead to different continuations


def test_cached_decoder_beam_with_padding_and_context():
  """Beam search over the KV cache == over a cache-free step function (whole-row re-runs).

  Cross-attention inputs ride in `context`; prompts are full, right-padded and left-padded
  (that one with a causal tail); the scanned cache has its batch on axis 1.
  """
  from vlpjax.models import decoder as decoder_lib  # pylint: disable=g-import-not-at-top

  batch, prompt_len, steps, width = 3, 5, 6, 32
  model, variables = _random_decoder(scan_layers=True, cross_attention=True)
  r = np.random.default_rng(2)
  lengths, num_bidirectional = np.array([5, 3, 4]), np.array([5, 3, 2])
  packed = r.integers(2, 50, size=(batch, prompt_len)).astype(np.int32)
  packed *= np.arange(prompt_len)[None] < lengths[:, None]
  # The cached path sees row 2 left-padded: its tokens shifted to the end.
  shift = np.array([0, 0, prompt_len - lengths[2]])
  prompt = np.stack([np.roll(packed[b], shift[b]) for b in range(batch)])
  prompt_mask = np.stack([np.roll(np.arange(prompt_len) < lengths[b], shift[b])
                          for b in range(batch)])
  prefix = np.stack([np.roll(np.arange(prompt_len) < num_bidirectional[b], shift[b])
                     for b in range(batch)])
  context = {"encoded": jnp.asarray(r.normal(size=(batch, 4, width)), jnp.float32),
             "mask": jnp.asarray([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 1, 1]], bool)}
  config = DecodeConfig(method="beam", beam_size=3, max_decode_len=steps)

  def embed(tokens):
    return model.apply(variables, tokens, method=decoder_lib.Decoder.embed)

  def run(x, positions, mask, ctx, cache=None, cache_index=None):
    logits, cache = model.apply(variables, x, positions=positions, mask=mask, cache=cache,
                                cache_index=cache_index, encoded=ctx["encoded"],
                                encoded_mask=ctx["mask"])
    return logits.at[..., EOS].add(3.0), cache  # make EOS a real contender

  @jax.jit
  def cached(prompt, prompt_mask, prefix, context):
    lm = decoding.prefix_lm_step_fn(
        lambda x, p, m, c, i, context: run(x, p, m, context, c, i), embed, embed(prompt),
        prompt_mask, init_cache=model.init_cache, max_decode_len=steps,
        cache_batch_axis=model.cache_batch_axis, causal_attention=prefix, context=context)
    return decoding.decode(lm.step_fn, lm.first_logits, lm.cache, config=config,
                           cache_batch_axes=lm.cache_batch_axes)

  @jax.jit
  def uncached(packed, lengths, num_bidirectional, context):
    row_len = prompt_len + steps
    slots = jnp.arange(row_len)

    def logits_at(state, index):  # the whole packed row [0, index] through the model
      segment_ids = (slots[None] <= index[:, None]).astype(jnp.int32)
      mask = decoder_lib.make_attention_mask(
          segment_ids, slots[None] < state["num_bidirectional"][:, None])
      positions = jnp.broadcast_to(slots, segment_ids.shape).astype(jnp.int32)
      logits, _ = run(embed(state["tokens"]), positions, mask, state["context"])
      return jnp.take_along_axis(logits, index[:, None, None], axis=1)[:, 0]

    def step_fn(tokens, state, t):
      index = state["lengths"] + t
      state = dict(state, tokens=state["tokens"].at[jnp.arange(tokens.shape[0]), index].set(
          tokens))
      return logits_at(state, index), state

    state = {"tokens": jnp.pad(packed, ((0, 0), (0, steps))), "lengths": lengths,
             "num_bidirectional": num_bidirectional, "context": context}
    return decoding.decode(step_fn, logits_at(state, lengths - 1), state, config=config)

  out = cached(prompt, prompt_mask, prefix, context)
  reference = uncached(packed, lengths, num_bidirectional, context)
  for key in ("tokens", "lengths"):
    np.testing.assert_array_equal(out[key], reference[key])
  np.testing.assert_allclose(out["scores"], reference["scores"], rtol=1e-4)
  assert min(reference["lengths"]) < steps  # EOS did end some hypotheses
