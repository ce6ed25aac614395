"""Text transformer encoder for two-tower models (SigLIP style).

Texts are fixed-length, padded token ids with no attention mask: SigLIP trains
that way and pools the last position, so padding is part of the input it learnt.
"""
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from vlpjax.models import layers
from vlpjax.models.vit import resolve_dims
from vlpjax.registry import unknown_name_message

POOL_TYPES = ("last", "first", "gap", "eos")


class TextEncoder(nn.Module):
  """Token ids [B, L] -> (out [B, out_dim], aux).

  `variant` ('B', 'So400m', ... from the ViT table; a '/patch' suffix is
  ignored) gives width/depth/mlp_dim/num_heads unless set explicitly.
  Pooling: 'last' (position -1, HF SigLIP), 'first', 'gap' (mean over
  positions) or 'eos' (first position holding `eos_id`, the last one if none).
  `out_dim=None` leaves out the linear `head`. `aux` holds `tokens` and `pooled`.

  CLIP options (off by default): `causal=True` lets each position attend only to itself and
  earlier ones (CLIP's text transformer; with 'eos' pooling the EOS token then summarises the
  text before it, and padding after it changes nothing); `head_bias=False` drops the bias of
  `head` (CLIP's `text_projection`).

  `scan_layers=True` runs the encoder blocks as one `nn.scan` (params under
  `encoder/scanned` with a leading `layers` axis instead of `encoder/layers_{i}`).
  """
  variant: Optional[str] = None
  vocab_size: int = 32_000
  width: Optional[int] = None
  depth: Optional[int] = None
  mlp_dim: Optional[int] = None
  num_heads: Optional[int] = None
  max_len: int = 64
  pool_type: str = "last"
  eos_id: Optional[int] = None
  out_dim: Optional[int] = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat_policy: str = "none"
  causal: bool = False
  head_bias: bool = True
  scan_layers: bool = False
  attention_impl: str = "auto"
  norm_impl: str = "auto"

  @property
  def dims(self) -> Dict[str, int]:
    return resolve_dims(self.variant, need_patch=False, width=self.width,
                        depth=self.depth, mlp_dim=self.mlp_dim,
                        num_heads=self.num_heads)

  @nn.compact
  def __call__(self, texts: jax.Array) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    if self.pool_type not in POOL_TYPES:
      raise ValueError(unknown_name_message(
          "text pool type", self.pool_type, POOL_TYPES))
    if self.pool_type == "eos" and self.eos_id is None:
      raise ValueError("pool_type='eos' needs eos_id.")
    dims = self.dims
    width = dims["width"]
    length = texts.shape[-1]
    if length > self.max_len:
      raise ValueError(f"Text length {length} exceeds max_len {self.max_len}.")

    x = nn.Embed(
        self.vocab_size, width, dtype=self.dtype, param_dtype=self.param_dtype,
        embedding_init=layers.partitioned(nn.initializers.normal(stddev=0.02),
                                          ("vocab", "embed")),
        name="token_embedding")(texts)
    pos = layers.LearnedPositionEmbedding(
        self.max_len, width, self.param_dtype, name="position_embedding")()
    x = layers.add_position_embedding(x, pos[:length])
    x = layers.constrain(x, layers.ACT_TOKENS)

    # [1, 1, L, L], True where query position q may see key position k <= q.
    mask = jnp.tril(jnp.ones((length, length), bool))[None, None] if self.causal else None
    tokens = layers.Encoder(
        dims["depth"], dims["mlp_dim"], dims["num_heads"], self.dtype,
        self.param_dtype, self.remat_policy, scan_layers=self.scan_layers,
        attention_impl=self.attention_impl, norm_impl=self.norm_impl, name="encoder")(x, mask)

    if self.pool_type == "last":
      pooled = tokens[:, -1]
    elif self.pool_type == "first":
      pooled = tokens[:, 0]
    elif self.pool_type == "gap":
      pooled = jnp.mean(tokens, axis=1)
    else:  # "eos"
      is_eos = texts == self.eos_id
      index = jnp.where(jnp.any(is_eos, axis=-1), jnp.argmax(is_eos, axis=-1),
                        length - 1)
      pooled = jnp.take_along_axis(tokens, index[:, None, None], axis=1)[:, 0]
    aux = {"tokens": tokens, "pooled": pooled}

    out = pooled
    if self.out_dim is not None:
      out = layers.projection(self.out_dim, "head", self.dtype, self.param_dtype,
                              use_bias=self.head_bias)(pooled)
    return out, aux
