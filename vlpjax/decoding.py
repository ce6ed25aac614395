"""Autoregressive decoding (greedy, beam search, sampling) over a model's step function.

The model side is one function, so any cached decoder plugs in:

  step_fn(tokens int32 [N], cache, t int32 scalar) -> (logits f32 [N, V], cache)

feeds the t-th generated token of every row (t = 0 for the token chosen from `first_logits`,
the logits the caller's prefill returned) and gives the logits for token t + 1. `decode` calls
it for t = 0 .. max_decode_len - 2 at most, never for the last token. N is the batch size B
(greedy, sample) or B * beam_size (beam). `cache` is any pytree; per-example data the step
needs (prompt lengths, image encodings for cross-attention) must live IN it, not in a closure,
so that beam search repeats and reorders it with the keys and values. `cache_batch_axes` says
where each leaf's batch axis is: an int for every leaf, or a pytree prefix of the cache (as
vmap's in_axes), None marking a leaf that is the same for every row.

Methods (`DecodeConfig.method`):
  greedy  the argmax token at every step.
  sample  a token drawn from softmax(logits / temperature) after keeping only the top_k
          tokens (0 = all) and then the smallest set of best tokens whose probability reaches
          top_p (nucleus; 1.0 = all). The argmax token always survives both filters. Step t
          draws with fold_in(rng, t), so one rng gives one sample, under jit or not.
  beam    beam search keeping `beam_size` alive hypotheses and the `beam_size` best finished
          ones per example. Every step extends each alive beam by every token, keeps the
          2 * beam_size best extensions, moves those ending in EOS to the finished set (scored
          logprob / ((5 + length) / 6) ** length_penalty, length counting EOS; the best
          beam_size finished survive) and keeps the best beam_size others alive. Finished
          hypotheses are never extended. An example is done once no alive beam can still beat
          its worst finished hypothesis (log-probabilities only fall, so an alive beam's best
          reachable score is its log-probability over the largest penalty it can still get).
          Alive beams that reach max_decode_len without EOS are complete too and compete with
          the finished ones on the same score: the result is the best complete hypothesis.
          The cache is repeated beam_size times along each batch axis (jnp.repeat: rows
          b * beam_size .. b * beam_size + beam_size - 1 belong to example b) and gathered by
          parent beam before every step.

Every method stops at EOS: the EOS token is kept, later tokens are 0, `lengths` count the EOS.
Everything is jittable with the config static (a frozen, hashable dataclass): the loops are
lax.while_loops that exit as soon as every row is finished (beam: every example is done).

`prefix_lm_step_fn` builds the prefill and the step function for a decoder-only LM with a KV
cache (`vlpjax.models.decoder.Decoder` or a family's wrapper around one) whose prompt is a
bidirectional prefix (PaLI / PaliGemma style; a BOS-only prompt is plain causal decoding).
"""
import dataclasses
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from vlpjax.registry import nearest

Array = jax.Array
StepFn = Callable[[Array, Any, Array], Tuple[Array, Any]]

METHODS = ("greedy", "beam", "sample")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
  """How to decode; frozen and hashable so it can be a static argument of jit."""
  method: str = "greedy"          # greedy | beam | sample
  max_decode_len: int = 32        # generated tokens, EOS included
  beam_size: int = 4              # beam
  length_penalty: float = 0.6     # beam: score = logprob / ((5 + len) / 6) ** length_penalty
  temperature: float = 1.0        # sample
  top_k: int = 0                  # sample: keep the k most likely tokens; 0 = off
  top_p: float = 1.0              # sample: nucleus probability mass; 1.0 = off
  eos_id: int = 1

  def __post_init__(self):
    if self.method not in METHODS:
      near = nearest(self.method, METHODS)
      hint = f" (did you mean {near[0]!r}?)" if near else ""
      raise ValueError(f"DecodeConfig.method must be one of {', '.join(METHODS)}; got "
                       f"{self.method!r}{hint}.")
    for name in ("max_decode_len", "beam_size", "top_k", "eos_id"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"DecodeConfig.{name} must be an int, got {value!r}.")
    for name in ("length_penalty", "temperature", "top_p"):
      value = getattr(self, name)
      if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"DecodeConfig.{name} must be a number, got {value!r}.")
      object.__setattr__(self, name, float(value))  # 1 and 1.0 hash alike under jit anyway
    checks = (
        ("max_decode_len", self.max_decode_len >= 1, ">= 1"),
        ("beam_size", self.beam_size >= 1, ">= 1"),
        ("temperature", self.temperature > 0, "> 0 (use method='greedy' for argmax)"),
        ("top_k", self.top_k >= 0, ">= 0 (0 = off)"),
        ("top_p", 0 < self.top_p <= 1, "in (0, 1] (1 = off)"),
        ("eos_id", self.eos_id >= 0, ">= 0"),
    )
    for name, ok, requirement in checks:
      if not ok:
        raise ValueError(f"DecodeConfig.{name} must be {requirement}, got "
                         f"{getattr(self, name)!r}.")

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "DecodeConfig":
    """A config from a mapping; an unknown key fails naming the nearest field names."""
    fields = [f.name for f in dataclasses.fields(cls)]
    for key in d:
      if key not in fields:
        near = nearest(key, fields)
        hint = f" (did you mean {' or '.join(repr(n) for n in near)}?)" if near else ""
        raise ValueError(f"Unknown decode option {key!r}{hint}. Known: {', '.join(fields)}.")
    return cls(**d)


def decode(step_fn: StepFn, first_logits: Array, cache: Any, *, config: DecodeConfig,
           rng: Optional[Array] = None, cache_batch_axes: Any = 0) -> Dict[str, Array]:
  """Decodes up to `config.max_decode_len` tokens per example (see the module docstring).

  Args:
    step_fn: (tokens int32 [N], cache, t) -> (logits [N, V], cache), same cache structure.
    first_logits: [B, V] logits of the first generated token (the prefill's last position).
    cache: the step function's state for B rows (the prefill's cache and per-example data).
    config: a DecodeConfig (or a mapping of its fields).
    rng: a PRNG key; required for method="sample", unused otherwise.
    cache_batch_axes: each cache leaf's batch axis: an int, or a pytree prefix of `cache`
      (None = a leaf shared by every row). Only beam search reads it.

  Returns:
    {"tokens": int32 [B, max_decode_len] (EOS kept, 0 after it), "lengths": int32 [B]
    (EOS included), "scores": f32 [B]}. Greedy and sample scores are the model's summed
    log-probabilities (before temperature and filtering) of the returned tokens; beam scores
    are the length-penalised scores the search ranked by.
  """
  if isinstance(config, Mapping):
    config = DecodeConfig.from_dict(config)
  if not isinstance(config, DecodeConfig):
    raise ValueError(f"config must be a DecodeConfig, got {type(config).__name__}.")
  first_logits = jnp.asarray(first_logits).astype(jnp.float32)
  if first_logits.ndim != 2:
    raise ValueError(f"first_logits must be [batch, vocab], got shape {first_logits.shape}.")
  vocab_size = first_logits.shape[1]
  if config.eos_id >= vocab_size:
    raise ValueError(f"eos_id {config.eos_id} is outside the vocabulary of {vocab_size} "
                     f"logits.")
  if config.method == "beam":
    return _beam_search(step_fn, first_logits, cache, config, cache_batch_axes)
  if config.method == "sample" and rng is None:
    raise ValueError("method='sample' needs an rng.")
  return _one_path(step_fn, first_logits, cache, config, rng)


# -- shared pieces ----------------------------------------------------------------------------


def _call_step(step_fn: StepFn, tokens: Array, cache: Any, t: Array,
               vocab: int) -> Tuple[Array, Any]:
  """step_fn with its outputs checked at trace time (while_loop's own errors are cryptic)."""
  logits, new_cache = step_fn(tokens, cache, t)
  rows = tokens.shape[0]
  if jnp.shape(logits) != (rows, vocab):
    raise ValueError(f"step_fn must return logits [{rows}, {vocab}] for {rows} tokens (vocab "
                     f"as in first_logits), got shape {jnp.shape(logits)}.")
  old, new = jax.tree.structure(cache), jax.tree.structure(new_cache)
  if old != new:
    raise ValueError(f"step_fn changed the cache tree structure from {old} to {new}.")
  for (path, before), after in zip(jax.tree_util.tree_leaves_with_path(cache),
                                   jax.tree.leaves(new_cache)):
    if (jnp.shape(before), jnp.result_type(before)) != (jnp.shape(after),
                                                        jnp.result_type(after)):
      raise ValueError(
          f"step_fn changed cache leaf {jax.tree_util.keystr(path)} from "
          f"{jnp.result_type(before)}{list(jnp.shape(before))} to "
          f"{jnp.result_type(after)}{list(jnp.shape(after))}; it must keep shapes and dtypes.")
  return logits.astype(jnp.float32), new_cache


def _token_logprob(logits: Array, tokens: Array) -> Array:
  """log softmax(logits)[tokens] for logits [..., V] and tokens [...]."""
  logprobs = jax.nn.log_softmax(logits, axis=-1)
  return jnp.take_along_axis(logprobs, tokens[..., None], axis=-1)[..., 0]


# -- greedy and sampling ----------------------------------------------------------------------


def filter_logits(logits: Array, *, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> Array:
  """Sampling logits [B, V]: / temperature, then top-k, then top-p; dropped tokens -> -inf.

  Tokens tied with the k-th best (or with the last token inside the nucleus) are kept too.
  The argmax token is never dropped.
  """
  logits = logits.astype(jnp.float32) / temperature
  neg_inf = jnp.array(-jnp.inf, logits.dtype)
  if 0 < top_k < logits.shape[-1]:
    kth_best = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits >= kth_best, logits, neg_inf)
  if top_p < 1.0:
    ordered = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # The i-th best token is in the nucleus while the better ones hold less than top_p.
    in_nucleus = mass_before < top_p
    threshold = jnp.min(jnp.where(in_nucleus, ordered, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits >= threshold, logits, neg_inf)
  return logits


def _one_path(step_fn, first_logits, cache, config: DecodeConfig, rng) -> Dict[str, Array]:
  """Greedy or sampled decoding: one hypothesis per row."""
  batch = first_logits.shape[0]
  max_len, eos = config.max_decode_len, config.eos_id

  def choose(logits, t):
    if config.method == "greedy":
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits, temperature=config.temperature, top_k=config.top_k,
                             top_p=config.top_p)
    return jax.random.categorical(jax.random.fold_in(rng, t), filtered).astype(jnp.int32)

  def append(state, logits):
    """Chooses token t (= state["t"]) for every unfinished row."""
    t = state["t"]
    running = ~state["done"]
    token = jnp.where(running, choose(logits, t), 0)
    logprob = jnp.where(running, _token_logprob(logits, token), 0.0)
    return dict(state, t=t + 1, tokens=state["tokens"].at[:, t].set(token),
                done=state["done"] | (token == eos),
                lengths=state["lengths"] + running.astype(jnp.int32),
                scores=state["scores"] + logprob)

  def keep_going(state):
    return (state["t"] < max_len) & ~jnp.all(state["done"])

  def step(state):
    t = state["t"] - 1  # the last chosen token, fed to get the next one's logits
    logits, new_cache = _call_step(step_fn, state["tokens"][:, t], state["cache"], t,
                                   first_logits.shape[1])
    return append(dict(state, cache=new_cache), logits)

  state = dict(t=jnp.zeros((), jnp.int32), tokens=jnp.zeros((batch, max_len), jnp.int32),
               done=jnp.zeros((batch,), bool), lengths=jnp.zeros((batch,), jnp.int32),
               scores=jnp.zeros((batch,), jnp.float32), cache=cache)
  state = jax.lax.while_loop(keep_going, step, append(state, first_logits))
  return {k: state[k] for k in ("tokens", "lengths", "scores")}


# -- beam search ------------------------------------------------------------------------------


def _map_batch_axes(fn: Callable[[Array, int, str], Array], cache: Any, axes: Any) -> Any:
  """fn(leaf, batch_axis, path) on every cache leaf whose axis (from the prefix) is not None."""

  def per_prefix(prefix_path, axis, subtree):
    if axis is None:
      return subtree
    if not isinstance(axis, int) or isinstance(axis, bool):
      raise ValueError(f"cache_batch_axes entries must be ints or None, got {axis!r} at "
                       f"{jax.tree_util.keystr(prefix_path) or 'the root'}.")
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: fn(leaf, axis, jax.tree_util.keystr(prefix_path + path)), subtree)

  try:  # Structure first, so that only a real mismatch is reported as one.
    jax.tree.map(lambda *_: None, axes, cache, is_leaf=lambda x: x is None)
  except ValueError as e:
    raise ValueError(f"cache_batch_axes must be an int or a pytree prefix of the cache: "
                     f"{e}") from e
  return jax.tree_util.tree_map_with_path(per_prefix, axes, cache,
                                          is_leaf=lambda x: x is None)


def _repeat_beams(cache: Any, axes: Any, batch: int, beams: int) -> Any:
  def repeat(leaf, axis, path):
    shape = jnp.shape(leaf)
    if not -len(shape) <= axis < len(shape) or shape[axis] != batch:
      raise ValueError(f"cache leaf {path or '(root)'} of shape {shape} has no batch axis "
                       f"{axis} of size {batch} (check cache_batch_axes).")
    return jnp.repeat(leaf, beams, axis=axis)
  return _map_batch_axes(repeat, cache, axes)


def _gather_beams(cache: Any, axes: Any, rows: Array) -> Any:
  return _map_batch_axes(lambda leaf, axis, _: jnp.take(leaf, rows, axis=axis), cache, axes)


def _length_penalty(length, alpha: float) -> Array:
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def _beam_search(step_fn, first_logits, cache, config: DecodeConfig,
                 cache_batch_axes) -> Dict[str, Array]:
  batch, vocab = first_logits.shape
  beams, max_len, alpha = config.beam_size, config.max_decode_len, config.length_penalty
  eos = config.eos_id
  num_candidates = min(2 * beams, beams * vocab)
  neg_inf = jnp.array(-jnp.inf, jnp.float32)

  def take(x, index):
    """x [batch, n, ...] gathered along axis 1 by index [batch, m]."""
    index = index.reshape(index.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)

  def expand(state, logits):
    """Extends every alive beam by token t (= state["t"]); logits [batch, beams, vocab]."""
    t = state["t"]
    logprobs = state["alive_logp"][..., None] + jax.nn.log_softmax(logits, axis=-1)
    cand_logp, cand_index = jax.lax.top_k(logprobs.reshape(batch, beams * vocab),
                                          num_candidates)
    cand_parent, cand_token = cand_index // vocab, cand_index % vocab
    cand_seqs = take(state["alive_seqs"], cand_parent).at[:, :, t].set(cand_token)
    ends = cand_token == eos

    # At most `beams` candidates end in EOS (one per parent), so `beams` others remain.
    alive_logp, pick = jax.lax.top_k(jnp.where(ends, neg_inf, cand_logp), beams)
    alive_seqs, parents = take(cand_seqs, pick), take(cand_parent, pick)

    finishing = ends & (cand_logp > neg_inf)  # a -inf beam is a placeholder, not a hypothesis
    cand_score = jnp.where(finishing, cand_logp / _length_penalty(t + 1, alpha), neg_inf)
    all_scores = jnp.concatenate([state["fin_scores"], cand_score], axis=1)
    fin_scores, pick = jax.lax.top_k(all_scores, beams)
    fin_flags = take(jnp.concatenate([state["fin_flags"], finishing], axis=1), pick)
    fin_seqs = take(jnp.concatenate([state["fin_seqs"], cand_seqs], axis=1), pick)
    fin_lengths = take(jnp.concatenate(
        [state["fin_lengths"], jnp.full(cand_score.shape, t + 1, jnp.int32)], axis=1), pick)

    # The best score an alive beam can still reach: its log-probability can only fall, so
    # over the largest penalty of the lengths it may end at (t + 2 .. max_len).
    best_penalty = jnp.maximum(_length_penalty(jnp.minimum(t + 2, max_len), alpha),
                               _length_penalty(max_len, alpha))
    best_reachable = alive_logp[:, 0] / best_penalty
    worst_finished = jnp.where(jnp.all(fin_flags, axis=1), fin_scores[:, -1], neg_inf)
    return dict(state, t=t + 1, alive_seqs=alive_seqs, alive_logp=alive_logp, parents=parents,
                fin_seqs=fin_seqs, fin_scores=fin_scores, fin_flags=fin_flags,
                fin_lengths=fin_lengths, done=best_reachable <= worst_finished)

  def keep_going(state):
    return (state["t"] < max_len) & ~jnp.all(state["done"])

  def step(state):
    t = state["t"] - 1
    rows = (jnp.arange(batch)[:, None] * beams + state["parents"]).reshape(-1)
    beam_cache = _gather_beams(state["cache"], cache_batch_axes, rows)
    tokens = state["alive_seqs"][:, :, t].reshape(-1)
    logits, beam_cache = _call_step(step_fn, tokens, beam_cache, t, vocab)
    return expand(dict(state, cache=beam_cache), logits.reshape(batch, beams, vocab))

  # Only beam 0 starts alive: otherwise the first step would pick the same token `beams` times.
  alive_logp = jnp.where(jnp.arange(beams) == 0, 0.0, neg_inf)
  state = dict(
      t=jnp.zeros((), jnp.int32),
      alive_seqs=jnp.zeros((batch, beams, max_len), jnp.int32),
      alive_logp=jnp.broadcast_to(alive_logp, (batch, beams)).astype(jnp.float32),
      parents=jnp.zeros((batch, beams), jnp.int32),
      fin_seqs=jnp.zeros((batch, beams, max_len), jnp.int32),
      fin_scores=jnp.full((batch, beams), neg_inf),
      fin_flags=jnp.zeros((batch, beams), bool),
      fin_lengths=jnp.zeros((batch, beams), jnp.int32),
      done=jnp.zeros((batch,), bool),
      cache=_repeat_beams(cache, cache_batch_axes, batch, beams))
  first = jnp.broadcast_to(first_logits[:, None, :], (batch, beams, vocab))
  state = jax.lax.while_loop(keep_going, step, expand(state, first))

  # Alive beams that reached max_len are complete; they compete with the finished ones.
  # (After an early exit they are not, and cannot beat the finished ones anyway.) Alive beams
  # come first so an example with no complete hypothesis at all falls back to its best one.
  complete = (state["t"] == max_len) & (state["alive_logp"] > neg_inf)
  alive_scores = state["alive_logp"] / _length_penalty(max_len, alpha)
  scores = jnp.concatenate([jnp.where(complete, alive_scores, neg_inf),
                            jnp.where(state["fin_flags"], state["fin_scores"], neg_inf)], axis=1)
  seqs = jnp.concatenate([state["alive_seqs"], state["fin_seqs"]], axis=1)
  lengths = jnp.concatenate([jnp.full((batch, beams), max_len, jnp.int32),
                             state["fin_lengths"]], axis=1)
  best = jnp.argmax(scores, axis=1)[:, None]
  best_scores = take(scores, best)[:, 0]
  return {"tokens": take(seqs, best)[:, 0], "lengths": take(lengths, best)[:, 0],
          "scores": jnp.where(jnp.isfinite(best_scores), best_scores, alive_scores[:, 0])}


# -- decoder-only LMs with a bidirectional prompt ---------------------------------------------


class PrefixLM(NamedTuple):
  """What `decode` needs for a prompted decoder: pass all four on."""
  first_logits: Array    # f32 [B, V]: logits for the first generated token
  cache: Any             # {"decoder": KV cache, "prompt_mask": bool [B, P] (, "context": ...)}
  step_fn: StepFn        # feeds generated token t at cache slot P + t
  cache_batch_axes: Any  # {"decoder": the decoder's cache batch axis, the rest: 0}


def prefix_lm_step_fn(decoder_apply: Callable[..., Tuple[Array, Any]],
                      embed_fn: Callable[[Array], Array], prompt_embeddings: Array,
                      prompt_mask: Array, *, init_cache: Callable[[int, int], Any],
                      max_decode_len: int, cache_batch_axis: Any = 0,
                      causal_attention: Optional[Array] = None,
                      context: Any = None) -> PrefixLM:
  """Prefills a decoder's KV cache with a prompt and returns the step function for `decode`.

  The prompt is a prefix-LM prefix: its valid tokens attend to each other both ways (unless
  `causal_attention` says otherwise); generated tokens attend to the valid prompt slots and
  causally to the generated ones. Prompts may be padded on either side: a generated token's
  position is (the example's prompt length) + t, its cache slot P + t, so the RoPE positions
  stay contiguous whatever the padding. Usage:

    lm = prefix_lm_step_fn(apply, embed, prompt_x, prompt_mask, init_cache=init,
                           max_decode_len=cfg.max_decode_len, cache_batch_axis=axis)
    out = decode(lm.step_fn, lm.first_logits, lm.cache, config=cfg, rng=rng,
                 cache_batch_axes=lm.cache_batch_axes)

  Args:
    decoder_apply: (x [N, L, D], positions int32 [N, L], mask bool [N, 1, L, S], cache,
      cache_index int32 scalar) -> (logits [N, L, V], cache): the decoder with bound
      parameters writing the L new keys/values at slots cache_index.. of a cache of S slots
      (e.g. `lambda x, p, m, c, i: model.apply(variables, x, positions=p, mask=m, cache=c,
      cache_index=i)` for a `Decoder`). With `context`, it is also given `context=` (the
      rows' slice of it) as a keyword argument.
    embed_fn: tokens int32 [N, 1] -> embeddings [N, 1, D] (e.g. `Decoder.embed`).
    prompt_embeddings: [B, P, D] the embedded prompt (image tokens already merged in).
    prompt_mask: bool [B, P], True on the valid prompt tokens (at least one per row).
    init_cache: (batch_size, max_len) -> an empty decoder cache (e.g. `Decoder.init_cache`);
      called with max_len = P + max_decode_len - 1 (the last generated token is never fed).
    max_decode_len: the `DecodeConfig.max_decode_len` the result will be decoded with.
    cache_batch_axis: the batch axis of the decoder cache leaves (`Decoder.cache_batch_axis`),
      or a pytree prefix of that cache when they differ (as `decode`'s cache_batch_axes).
    causal_attention: optional bool [B, P] in the packed `decoder_causal_attention` sense:
      True on the bidirectional part of the prompt, the rest causal. None = all of it
      bidirectional.
    context: optional per-example pytree (batch axis 0 on every leaf), e.g. encoder outputs
      for cross-attention. It rides in the cache so beam search repeats and reorders it; a
      closure over it would keep the unrepeated batch and break beam search.

  Returns:
    PrefixLM(first_logits, cache, step_fn, cache_batch_axes) for `decode`.
  """
  prompt_embeddings = jnp.asarray(prompt_embeddings)
  if prompt_embeddings.ndim != 3:
    raise ValueError(f"prompt_embeddings must be [batch, prompt_len, width], got shape "
                     f"{prompt_embeddings.shape}.")
  batch, prompt_len, _ = prompt_embeddings.shape
  prompt_mask = jnp.asarray(prompt_mask).astype(bool)
  if prompt_mask.shape != (batch, prompt_len):
    raise ValueError(f"prompt_mask shape {prompt_mask.shape} must be (batch, prompt_len) = "
                     f"{(batch, prompt_len)}.")
  if causal_attention is None:
    bidirectional = prompt_mask
  else:
    bidirectional = jnp.asarray(causal_attention).astype(bool)
    if bidirectional.shape != (batch, prompt_len):
      raise ValueError(f"causal_attention shape {bidirectional.shape} must be (batch, "
                       f"prompt_len) = {(batch, prompt_len)}.")
  if not isinstance(max_decode_len, int) or max_decode_len < 1:
    raise ValueError(f"max_decode_len must be an int >= 1, got {max_decode_len!r}.")
  num_slots = prompt_len + max_decode_len - 1

  def run(x, positions, mask, cache, index, ctx):
    if ctx is None:
      return decoder_apply(x, positions, mask, cache, index)
    return decoder_apply(x, positions, mask, cache, index, context=ctx)

  # Prefill. Valid prompt tokens keep their order, so positions count valid tokens before.
  positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1, dtype=jnp.int32) - 1, 0)
  index = jnp.arange(prompt_len)
  causal = index[None, :, None] >= index[None, None, :]
  both_bidirectional = bidirectional[:, :, None] & bidirectional[:, None, :]
  prompt_attention = (prompt_mask[:, :, None] & prompt_mask[:, None, :]
                      & (causal | both_bidirectional))
  mask = jnp.zeros((batch, 1, prompt_len, num_slots), bool)
  mask = mask.at[:, 0, :, :prompt_len].set(prompt_attention)
  logits, decoder_cache = run(prompt_embeddings, positions, mask,
                              init_cache(batch, num_slots), jnp.int32(0), context)
  last_valid = jnp.argmax(jnp.where(prompt_mask, index[None, :], -1), axis=1)
  first_logits = jnp.take_along_axis(logits, last_valid[:, None, None], axis=1)[:, 0]

  def step_fn(tokens, cache, t):
    valid_prompt = cache["prompt_mask"]
    slot = prompt_len + t
    x = embed_fn(tokens[:, None])
    positions = jnp.sum(valid_prompt, axis=1, dtype=jnp.int32)[:, None] + t
    slots = jnp.arange(num_slots)
    generated_visible = (slots >= prompt_len) & (slots <= slot)
    visible = jnp.pad(valid_prompt, ((0, 0), (0, num_slots - prompt_len))) | generated_visible
    logits, new_decoder_cache = run(x, positions, visible[:, None, None, :], cache["decoder"],
                                    slot, cache.get("context"))
    return logits[:, 0].astype(jnp.float32), dict(cache, decoder=new_decoder_cache)

  cache = {"decoder": decoder_cache, "prompt_mask": prompt_mask}
  axes = {"decoder": cache_batch_axis, "prompt_mask": 0}
  if context is not None:
    cache["context"], axes["context"] = context, 0
  return PrefixLM(first_logits.astype(jnp.float32), cache, step_fn, axes)
