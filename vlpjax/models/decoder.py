"""Decoder-only transformer language model (Llama / Gemma family) with a KV cache.

Pre-norm blocks of RMSNorm, rotary multi-/grouped-query self-attention, an optional
cross-attention sublayer (CoCa's multimodal decoder) and a gated MLP. The same code serves
training (a full mask over the row, e.g. packed prefix-LM rows from `make_attention_mask`)
and generation: with a cache, the new keys/values are written at `cache_index` and the
queries attend over every cache slot under a caller-built mask, so prefill and one-token
steps are the same call.

Param names follow Hugging Face Llama/Gemma (`embed_tokens`, `layers/layers_{i}/self_attn/
q_proj`, `input_layernorm`, `mlp/gate_proj`, `norm`, `lm_head`), so checkpoint import is a
renaming plus reshapes (`vlpjax.interop.hf_lm`). With `scan_layers` the blocks live in one
module `layers/scanned` whose params carry a leading `layers` axis of size `depth`.

Cache trees: unscanned `{"layers_{i}": {"k", "v"}}` with leaves [B, max_len, kv_heads,
head_dim]; scanned `{"k", "v"}` with leaves [depth, B, max_len, kv_heads, head_dim].
`cache_batch_axis` is the batch axis of every leaf (what beam search repeats and reorders).
"""
import math
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from vlpjax.data import packing
from vlpjax.models import attention
from vlpjax.models import layers
from vlpjax.registry import unknown_name_message

Array = jax.Array
Dtype = Any
Cache = Any

ACT_KV_HEADS = ("act_batch", "act_length", "act_kv_heads", "act_kv")

ACTIVATIONS: Dict[str, Callable[[Array], Array]] = {
    "silu": nn.silu,                                        # Llama `silu`
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),   # Gemma `gelu_pytorch_tanh`
    "gelu": lambda x: nn.gelu(x, approximate=False),
}


def make_attention_mask(segment_ids: Array, causal_attention: Optional[Array] = None
                        ) -> Array:
  """Boolean self-attention mask [B, 1, L, L] for (packed) decoder rows.

  Query i may attend key j iff both are in the same non-padding segment and j <= i, or both
  lie in the bidirectional prefix (`causal_attention`, the packed `decoder_causal_attention`:
  1 on the prefix of a prefix-LM example). None means purely causal.
  """
  segment_ids = jnp.asarray(segment_ids)
  if segment_ids.ndim != 2:
    raise ValueError(f"segment_ids must be [batch, length], got shape {segment_ids.shape}.")
  if causal_attention is None:
    causal_attention = jnp.zeros_like(segment_ids)
  causal_attention = jnp.asarray(causal_attention)
  if causal_attention.shape != segment_ids.shape:
    raise ValueError(f"causal_attention shape {causal_attention.shape} differs from "
                     f"segment_ids shape {segment_ids.shape}.")
  # One definition of the prefix-LM mask for the data and the model (packing.py).
  return packing.attention_mask(segment_ids, causal_attention, xp=jnp)[:, None]


def apply_rope(x: Array, positions: Array, theta: float) -> Array:
  """Rotary embedding, rotate-half convention (HF Llama/Gemma), computed in f32.

  x [B, L, heads, head_dim]; positions [B, L] (packed segments restart at 0). Channel i of
  the first half pairs with channel i of the second half at frequency theta^(-2i/head_dim).
  """
  head_dim = x.shape[-1]
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head_dim, got {head_dim}.")
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, head_dim / 2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  x32 = x.astype(jnp.float32)
  first, second = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-second, first], axis=-1)
  return (x32 * cos + rotated * sin).astype(x.dtype)


class RMSNorm(nn.Module):
  """x / rms(x) * (norm_offset + scale), statistics in f32; returns f32.

  Gemma stores the scale as an offset from 1 (`norm_offset=1`, init zeros); Llama stores it
  directly (`norm_offset=0`, init ones). Either way a fresh norm is the identity scaling.
  """
  eps: float = 1e-6
  norm_offset: float = 0.0
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    init = nn.initializers.zeros_init() if self.norm_offset else nn.initializers.ones_init()
    scale = self.param("scale", layers.partitioned(init, ("embed",)), (x.shape[-1],),
                       self.param_dtype)
    x = x.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return x * (self.norm_offset + scale.astype(jnp.float32))


class LoraDense(nn.Module):
  """Bias-free linear map contracting x's trailing dims, with an optional LoRA adapter.

  `kernel` has shape (*in, *features) and logical names `in_names + out_names`. With
  `lora_rank > 0`, `lora_a` (*in, lora) and `lora_b` (lora, *features) add
  `(x @ a @ b) * lora_alpha / lora_rank`; `lora_b` starts at zero so an adapted model starts
  equal to its base, and the names contain "lora" so a freeze regex can skip them.
  """
  features: Tuple[int, ...]
  in_names: Tuple[str, ...]
  out_names: Tuple[str, ...]
  lora_rank: int = 0
  lora_alpha: float = 16.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    n_in, n_out = len(self.in_names), len(self.features)
    in_shape = tuple(x.shape[-n_in:])
    in_axes = tuple(range(n_in))
    # Fan-in over the grouped input dims: the scale of the equivalent 2-D Dense.
    init = nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=in_axes,
        out_axis=tuple(range(n_in, n_in + n_out)))
    kernel = self.param("kernel", layers.partitioned(init, self.in_names + self.out_names),
                        in_shape + tuple(self.features), self.param_dtype)
    x_cast, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    y = layers.token_matmul(x_cast, kernel, n_in)
    if self.lora_rank > 0:
      a_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=in_axes,
                                                out_axis=(n_in,))
      lora_a = self.param("lora_a", layers.partitioned(a_init, self.in_names + ("lora",)),
                          in_shape + (self.lora_rank,), self.param_dtype)
      lora_b = self.param(
          "lora_b", layers.partitioned(nn.initializers.zeros_init(), ("lora",) + self.out_names),
          (self.lora_rank,) + tuple(self.features), self.param_dtype)
      _, lora_a, lora_b = nn.dtypes.promote_dtype(x, lora_a, lora_b, dtype=self.dtype)
      low = layers.token_matmul(x_cast, lora_a, n_in)
      y = y + layers.token_matmul(low, lora_b, 1) * (self.lora_alpha / self.lora_rank)
    return y


class Attention(nn.Module):
  """Multi-/grouped-query attention with q/k/v/o projections and no biases.

  Kernels: q `(embed, heads, kv)`, k/v `(embed, kv_heads, kv)`, o `(heads, kv, embed)`.
  Self-attention applies RoPE to q and k (and may use a KV cache); cross-attention
  (`inputs_kv` given) uses neither. Logits and softmax in f32; `attention_impl` picks the
  kernel (`vlpjax.models.attention`; activations stay [B, L, heads, kv] for all of them).
  """
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10_000.
  lora_rank: int = 0
  lora_alpha: float = 16.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = "auto"

  def _dense(self, features, in_names, out_names, name):
    return LoraDense(features, in_names, out_names, self.lora_rank, self.lora_alpha,
                     self.dtype, self.param_dtype, name=name)

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array], *, positions: Optional[Array] = None,
               inputs_kv: Optional[Array] = None, cache: Optional[Dict[str, Array]] = None,
               cache_index=None) -> Tuple[Array, Optional[Dict[str, Array]]]:
    width = x.shape[-1]
    cross = inputs_kv is not None
    kv_in = inputs_kv if cross else x
    q = self._dense((self.num_heads, self.head_dim), ("embed",), ("heads", "kv"),
                    "q_proj")(x)
    k = self._dense((self.num_kv_heads, self.head_dim), ("embed",), ("kv_heads", "kv"),
                    "k_proj")(kv_in)
    v = self._dense((self.num_kv_heads, self.head_dim), ("embed",), ("kv_heads", "kv"),
                    "v_proj")(kv_in)
    if not cross:
      q = apply_rope(q, positions, self.rope_theta)
      k = apply_rope(k, positions, self.rope_theta)
    q = layers.constrain(q, layers.ACT_HEADS)
    k = layers.constrain(k, ACT_KV_HEADS)
    v = layers.constrain(v, ACT_KV_HEADS)

    new_cache = None
    if cache is not None:
      index = jnp.asarray(cache_index, jnp.int32)
      zero = jnp.zeros((), jnp.int32)
      start = (zero, index, zero, zero)
      k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start)
      v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)
      new_cache = {"k": k, "v": v}
      k = layers.constrain(k, ACT_KV_HEADS)
      v = layers.constrain(v, ACT_KV_HEADS)

    # Grouped-query k/v go in as they are: each kv head serves num_heads / num_kv_heads
    # consecutive query heads (HF repeat_kv). The scale is on the f32 logits, as in HF.
    attended = attention.attend(q, k, v, mask, impl=self.attention_impl, dtype=self.dtype,
                                heads_first=False, logits_scale=self.head_dim ** -0.5)
    attended = layers.constrain(attended, layers.ACT_HEADS)
    out = self._dense((width,), ("heads", "kv"), ("embed",), "o_proj")(attended)
    return out, new_cache


class GatedMlp(nn.Module):
  """down(act(gate(x)) * up(x)), no biases (Llama/Gemma MLP)."""
  mlp_dim: int
  activation: str = "silu"
  lora_rank: int = 0
  lora_alpha: float = 16.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    width = x.shape[-1]

    def dense(features, in_names, out_names, name):
      return LoraDense(features, in_names, out_names, self.lora_rank, self.lora_alpha,
                       self.dtype, self.param_dtype, name=name)

    gate = dense((self.mlp_dim,), ("embed",), ("mlp",), "gate_proj")(x)
    up = dense((self.mlp_dim,), ("embed",), ("mlp",), "up_proj")(x)
    h = layers.constrain(ACTIVATIONS[self.activation](gate) * up, layers.ACT_MLP)
    return dense((width,), ("mlp",), ("embed",), "down_proj")(h)


class DecoderBlock(nn.Module):
  """x + self_attn(norm(x)) [+ cross_attn(norm(x), encoded)] + mlp(norm(x)), pre-norm.

  Positional-only call signature `(x, cache, positions, mask, cache_index, encoded,
  encoded_mask) -> (x, new_cache)` so that nn.scan / nn.remat can lift it directly.
  """
  mlp_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  activation: str = "silu"
  norm_eps: float = 1e-6
  norm_offset: float = 0.0
  rope_theta: float = 10_000.
  cross_attention: bool = False
  lora_rank: int = 0
  lora_alpha: float = 16.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = "auto"

  def _norm(self, name):
    return RMSNorm(self.norm_eps, self.norm_offset, self.param_dtype, name=name)

  def _attention(self, name):
    return Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.rope_theta,
                     self.lora_rank, self.lora_alpha, self.dtype, self.param_dtype,
                     self.attention_impl, name=name)

  @nn.compact
  def __call__(self, x, cache, positions, mask, cache_index, encoded, encoded_mask):
    x = layers.constrain(x, layers.ACT_TOKENS)
    y = self._norm("input_layernorm")(x).astype(self.dtype)
    y, new_cache = self._attention("self_attn")(
        y, mask, positions=positions, cache=cache, cache_index=cache_index)
    x = layers.constrain(x + y, layers.ACT_TOKENS)
    if self.cross_attention:
      if encoded is None:
        raise ValueError("A decoder with cross_attention=True needs `encoded`.")
      cross_mask = None
      if encoded_mask is not None:
        # [B, M]: the same encoded tokens for every query; [B, L, M]: per query (packed rows,
        # where each segment may read only its own example's encoding).
        cross_mask = encoded_mask.astype(bool)
        cross_mask = (cross_mask[:, None, None, :] if cross_mask.ndim == 2
                      else cross_mask[:, None, :, :])
      y = self._norm("cross_attn_layernorm")(x).astype(self.dtype)
      y, _ = self._attention("cross_attn")(y, cross_mask,
                                           inputs_kv=encoded.astype(self.dtype))
      x = layers.constrain(x + y, layers.ACT_TOKENS)
    y = self._norm("post_attention_layernorm")(x).astype(self.dtype)
    y = GatedMlp(self.mlp_dim, self.activation, self.lora_rank, self.lora_alpha,
                 self.dtype, self.param_dtype, name="mlp")(y)
    return layers.constrain(x + y, layers.ACT_TOKENS), new_cache


class DecoderStack(nn.Module):
  """`depth` pre-norm decoder blocks; no embedding and no final norm (see module doc)."""
  depth: int
  mlp_dim: int
  num_heads: int
  num_kv_heads: Optional[int] = None
  head_dim: Optional[int] = None
  activation: str = "silu"
  norm_eps: float = 1e-6
  norm_offset: float = 0.0
  rope_theta: float = 10_000.
  cross_attention: bool = False
  scan_layers: bool = False
  lora_rank: int = 0
  lora_alpha: float = 16.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat_policy: str = "none"
  attention_impl: str = "auto"

  @nn.nowrap
  def _dims(self, width: int) -> Tuple[int, int]:
    """(num_kv_heads, head_dim) with defaults filled in and checked."""
    num_kv_heads = self.num_kv_heads or self.num_heads
    if self.num_heads % num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={num_kv_heads}.")
    head_dim = self.head_dim
    if head_dim is None:
      if width % self.num_heads:
        raise ValueError(f"Width {width} is not divisible by num_heads={self.num_heads}; "
                         f"set head_dim explicitly.")
      head_dim = width // self.num_heads
    if self.activation not in ACTIVATIONS:
      raise ValueError(unknown_name_message("decoder activation", self.activation,
                                            ACTIVATIONS))
    return num_kv_heads, head_dim

  @property
  def cache_batch_axis(self) -> int:
    return 1 if self.scan_layers else 0

  @nn.nowrap
  def init_cache(self, batch_size: int, max_len: int, width: int) -> Cache:
    """Zero k/v for every layer (see the module docstring for the tree layout)."""
    num_kv_heads, head_dim = self._dims(width)
    shape = (batch_size, max_len, num_kv_heads, head_dim)
    if self.scan_layers:
      shape = (self.depth,) + shape
      return {"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)}
    return {f"layers_{i}": {"k": jnp.zeros(shape, self.dtype),
                            "v": jnp.zeros(shape, self.dtype)}
            for i in range(self.depth)}

  @nn.compact
  def __call__(self, x: Array, *, positions: Array, mask: Array, cache: Optional[Cache] = None,
               cache_index=None, encoded: Optional[Array] = None,
               encoded_mask: Optional[Array] = None) -> Tuple[Array, Optional[Cache]]:
    batch, length, width = x.shape
    num_kv_heads, head_dim = self._dims(width)
    if positions.shape != (batch, length):
      raise ValueError(f"positions shape {positions.shape} != (batch, length) "
                       f"{(batch, length)}.")
    if cache is not None and cache_index is None:
      raise ValueError("A cache needs cache_index (the slot of the first new token).")
    if cache is None:
      key_len = length
    else:
      key_len = (cache["k"] if self.scan_layers else cache["layers_0"]["k"]
                 ).shape[self.cache_batch_axis + 1]
    if mask.ndim != 4 or mask.shape[0] != batch or mask.shape[2:] != (length, key_len):
      raise ValueError(f"mask shape {mask.shape} must be [batch, 1, length, keys] = "
                       f"[{batch}, 1, {length}, {key_len}] (keys = cache max_len when "
                       f"decoding with a cache, else the length).")
    if self.cross_attention and encoded is None:
      raise ValueError("A decoder with cross_attention=True needs `encoded`.")
    if encoded is not None and (encoded.ndim != 3 or encoded.shape[0] != batch):
      raise ValueError(f"encoded must be [batch={batch}, tokens, width], got shape "
                       f"{encoded.shape}.")
    if encoded_mask is not None and (
        encoded is None or encoded_mask.shape not in (
            encoded.shape[:2], (batch, length, encoded.shape[1]))):
      raise ValueError(f"encoded_mask shape {encoded_mask.shape} must be encoded's "
                       f"[batch, tokens] {None if encoded is None else encoded.shape[:2]} or "
                       "[batch, length, tokens] (per query).")

    block_kwargs = dict(
        mlp_dim=self.mlp_dim, num_heads=self.num_heads, num_kv_heads=num_kv_heads,
        head_dim=head_dim, activation=self.activation, norm_eps=self.norm_eps,
        norm_offset=self.norm_offset, rope_theta=self.rope_theta,
        cross_attention=self.cross_attention, lora_rank=self.lora_rank,
        lora_alpha=self.lora_alpha, dtype=self.dtype, param_dtype=self.param_dtype,
        attention_impl=self.attention_impl)
    block_cls = layers.remat_block(DecoderBlock, self.remat_policy)
    x = x.astype(self.dtype)
    broadcast_args = (positions, mask, cache_index, encoded, encoded_mask)

    if self.scan_layers:
      scanned = nn.scan(
          block_cls, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=(0,) + (nn.broadcast,) * len(broadcast_args), length=self.depth,
          metadata_params={nn.PARTITION_NAME: "layers"})
      x, new_cache = scanned(**block_kwargs, name="scanned")(x, cache, *broadcast_args)
      return x, new_cache

    new_cache = None if cache is None else {}
    for i in range(self.depth):
      name = f"layers_{i}"
      layer_cache = None if cache is None else cache[name]
      x, layer_new = block_cls(**block_kwargs, name=name)(x, layer_cache, *broadcast_args)
      if cache is not None:
        new_cache[name] = layer_new
    return x, new_cache


class Decoder(nn.Module):
  """Token embedding + DecoderStack + final RMSNorm + f32 logits (tied or `lm_head`).

  `__call__` takes already-embedded inputs (so callers can merge image tokens into the
  sequence); `embed` turns token ids into them.
  """
  vocab_size: int
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  num_kv_heads: Optional[int] = None
  head_dim: Optional[int] = None
  activation: str = "silu"
  norm_eps: float = 1e-6
  norm_offset: float = 0.0
  rope_theta: float = 10_000.
  cross_attention: bool = False
  scan_layers: bool = False
  lora_rank: int = 0
  lora_alpha: float = 16.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat_policy: str = "none"
  attention_impl: str = "auto"
  embed_scale: bool = False
  tie_embeddings: bool = True

  @nn.nowrap
  def _stack_kwargs(self) -> Dict[str, Any]:
    return dict(
        depth=self.depth, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
        num_kv_heads=self.num_kv_heads, head_dim=self.head_dim, activation=self.activation,
        norm_eps=self.norm_eps, norm_offset=self.norm_offset, rope_theta=self.rope_theta,
        cross_attention=self.cross_attention, scan_layers=self.scan_layers,
        lora_rank=self.lora_rank, lora_alpha=self.lora_alpha, dtype=self.dtype,
        param_dtype=self.param_dtype, remat_policy=self.remat_policy,
        attention_impl=self.attention_impl)

  def setup(self):
    # f32 module dtype: `attend` (tied logits) then runs in f32; `embed` casts its output.
    self.embed_tokens = nn.Embed(
        self.vocab_size, self.width, dtype=jnp.float32, param_dtype=self.param_dtype,
        embedding_init=layers.partitioned(nn.initializers.normal(stddev=0.02),
                                          ("vocab", "embed")))
    self.layers = DecoderStack(**self._stack_kwargs())
    self.norm = RMSNorm(self.norm_eps, self.norm_offset, self.param_dtype)
    if not self.tie_embeddings:
      self.lm_head = layers.Dense(
          self.vocab_size, use_bias=False, dtype=jnp.float32, param_dtype=self.param_dtype,
          kernel_init=layers.partitioned(nn.initializers.lecun_normal(), ("embed", "vocab")))

  @property
  def cache_batch_axis(self) -> int:
    return 1 if self.scan_layers else 0

  @nn.nowrap
  def init_cache(self, batch_size: int, max_len: int) -> Cache:
    return DecoderStack(parent=None, **self._stack_kwargs()).init_cache(
        batch_size, max_len, self.width)

  def embed(self, tokens: Array) -> Array:
    """Token ids [B, L] -> [B, L, width] in `dtype` (times sqrt(width) for Gemma)."""
    x = self.embed_tokens(tokens)
    if self.embed_scale:
      # Gemma rounds the normaliser to the activation dtype before multiplying.
      x = x.astype(self.dtype) * jnp.asarray(math.sqrt(self.width), self.dtype)
    return layers.constrain(x.astype(self.dtype), layers.ACT_TOKENS)

  def hidden_states(self, x: Array, *, positions: Array, mask: Array,
                    cache: Optional[Cache] = None, cache_index=None,
                    encoded: Optional[Array] = None, encoded_mask: Optional[Array] = None
                    ) -> Tuple[Array, Optional[Cache]]:
    """Embedded inputs [B, L, width] -> (final-norm hidden states f32 [B, L, width], cache).

    What `__call__` turns into logits; heads other than the LM's (e.g. a grounding head on
    frame positions) read these.
    """
    if x.ndim != 3 or x.shape[-1] != self.width:
      raise ValueError(f"Decoder input must be embedded [batch, length, {self.width}], got "
                       f"shape {x.shape} (use method=Decoder.embed on token ids).")
    if not self.tie_embeddings and self.is_initializing():
      # Setup-defined submodules are created on first use: make `init` through __call__
      # (which only sees embedded inputs) create the embedding table too.
      self.embed_tokens(jnp.zeros((1, 1), jnp.int32))
    x, new_cache = self.layers(x, positions=positions, mask=mask, cache=cache,
                               cache_index=cache_index, encoded=encoded,
                               encoded_mask=encoded_mask)
    return self.norm(x), new_cache  # f32

  def logits(self, hidden: Array) -> Array:
    """Final hidden states [B, L, width] -> logits f32 [B, L, vocab]."""
    if self.tie_embeddings:
      # Flattened for the reason layers.token_matmul gives.
      flat = self.embed_tokens.attend(hidden.reshape(-1, hidden.shape[-1]))
      return flat.reshape(hidden.shape[:-1] + (-1,)).astype(jnp.float32)
    return self.lm_head(hidden).astype(jnp.float32)

  def __call__(self, x: Array, *, positions: Array, mask: Array,
               cache: Optional[Cache] = None, cache_index=None,
               encoded: Optional[Array] = None, encoded_mask: Optional[Array] = None
               ) -> Tuple[Array, Optional[Cache]]:
    """Embedded inputs [B, L, width] -> (logits f32 [B, L, vocab], new cache or None)."""
    hidden, new_cache = self.hidden_states(
        x, positions=positions, mask=mask, cache=cache, cache_index=cache_index,
        encoded=encoded, encoded_mask=encoded_mask)
    return self.logits(hidden), new_cache
