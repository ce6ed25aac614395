"""UDOP-style document model: the prefix-LM VLM with 2-D layout embeddings on OCR tokens.

A document row (`vlpjax/data/packing.py`, `docs/data_documents.md`) carries, beside the
packed tokens and the page image, `decoder_boxes` float32 [B, L, 4]: the normalised box
(x0, y0, x1, y1) of the OCR word each input token belongs to, and 0 on every other token
(BOS, image positions, prompt, sentinels, targets, padding). The model adds a learned
embedding of the quantised box to those tokens' embeddings before the decoder, so a word's
identity and its place on the page enter the LM together, as in UDOP's layout-aware
token representation.

A zero box embeds to exactly zero: tokens without layout are embedded as the plain VLM
embeds them, so `DocumentModel` with all-zero boxes is the `VLM` with the same params.
"""
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import linen as nn

from vlpjax.models import layers
from vlpjax.models import vlm as vlm_lib

Array = jax.Array
COORDINATES = ("x0", "y0", "x1", "y1")


class LayoutEmbedding(nn.Module):
  """Boxes [..., 4] in [0, 1] -> [..., features]: summed embeddings of the 4 quantised edges.

  Each coordinate goes to the nearest of `num_bins` bins over [0, 1] (values outside are
  clipped) and has its own table: x0 and x1 (or y0 and y1) must stay distinguishable, or
  a box and its mirror image would embed alike. An all-zero box (no layout) gives exactly 0.
  """
  features: int
  num_bins: int = 128
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, boxes: Array) -> Array:
    if boxes.shape[-1:] != (4,):
      raise ValueError(f"layout boxes must end in 4 coordinates (x0, y0, x1, y1), got shape "
                       f"{boxes.shape}.")
    if self.num_bins < 2:
      raise ValueError(f"LayoutEmbedding num_bins must be >= 2, got {self.num_bins}.")
    boxes = boxes.astype(jnp.float32)
    bins = jnp.clip(jnp.round(boxes * (self.num_bins - 1)), 0, self.num_bins - 1)
    bins = bins.astype(jnp.int32)
    out = 0.0
    for i, name in enumerate(COORDINATES):
      table = self.param(name, layers.partitioned(nn.initializers.normal(0.02),
                                                  ("pos", "embed")),
                         (self.num_bins, self.features), self.param_dtype)
      out = out + jnp.take(table, bins[..., i], axis=0)
    # Bin 0 is also a real left/top edge, so "no box" is told by the box, not the bins.
    has_box = jnp.any(boxes != 0, axis=-1, keepdims=True)
    return jnp.where(has_box, out, 0.0).astype(self.dtype)


class DocumentModel(vlm_lib.VLM):
  """`VLM` (ViT -> projector -> Decoder) whose token embeddings get layout embeddings added.

  Param tree: the VLM's (`img`, `projector`, `llm`) plus `layout` (`LayoutEmbedding` at the
  LM's width), so every VLM method (cached captioning, `embed_tokens`, `run_llm`) runs on
  these params unchanged; they see no layout, which is what an all-zero box means. As in the
  VLM, `scan_layers` scans the LM and `image.scan_layers=True` the ViT's encoder blocks.
  """
  layout_bins: int = 128

  def setup(self):
    super().setup()
    self.layout = LayoutEmbedding(self.llm_module.width, self.layout_bins, self.dtype,
                                  self.param_dtype, name="layout")

  def embed_document(self, tokens: Array, images: Array, boxes: Array) -> Array:
    """`embed_inputs` plus the layout embedding of `boxes` [B, L, 4] -> [B, L, D]."""
    if boxes.shape != tokens.shape + (4,):
      raise ValueError(f"decoder_boxes must be [batch, length, 4] aligned with the tokens "
                       f"{tokens.shape}, got shape {boxes.shape}.")
    x = self.embed_inputs(tokens, images)
    x = x + self.layout(boxes).astype(x.dtype)
    return layers.constrain(x, layers.ACT_TOKENS)

  def prepare_inputs(self, tokens: Array, batch: Mapping[str, Array]):
    """The VLM's inputs plus layout: `batch["decoder_boxes"]` [B, L, 4] aligned with tokens.

    A batch without boxes (e.g. captioning a bare image) is embedded with zero boxes.
    """
    boxes = batch.get("decoder_boxes")
    if boxes is None:
      boxes = jnp.zeros(tokens.shape + (4,), jnp.float32)
    return self.embed_document(tokens, batch["images"], boxes), None

  def __call__(self, batch: Mapping[str, Array]) -> Array:
    """Packed document features (the VLM's plus `decoder_boxes`) -> logits f32 [B, L, V]."""
    if "decoder_boxes" not in batch:
      raise ValueError(f"DocumentModel needs 'decoder_boxes' [batch, length, 4] in the batch "
                       f"(has {sorted(batch)}); document tasks' packed rows carry them.")
    return super().__call__(batch)
