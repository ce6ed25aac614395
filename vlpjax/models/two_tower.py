"""Two-tower image/text model for contrastive pretraining (SigLIP, CLIP).

Param tree: `img` (ViT), `txt` (TextEncoder), `logit_scale` (log temperature,
shape ()), `logit_bias` (shape (), only when `bias_init` is not None).
"""
import math
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from vlpjax.models import layers
from vlpjax.models.text import TextEncoder
from vlpjax.models.vit import ViT


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / |x| along the last axis, in f32 (eps keeps a zero vector finite)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


class TwoTower(nn.Module):
  """Image tower `img` and text tower `txt` embedding into one space.

  `image` / `text` are ViT / TextEncoder kwargs. `dtype`, `param_dtype`, `remat_policy`,
  `scan_layers` (run each tower's encoder blocks as one `nn.scan`), `attention_impl`
  (`vlpjax.models.attention`) and `norm_impl` (`vlpjax.models.layer_norm`) reach both towers
  unless a tower's kwargs set them itself.
  The text head outputs `embed_dim` (default: the image width); the image tower
  gets a linear projection only when its width differs from `embed_dim`
  (SigLIP has none).
  """
  image: Optional[Mapping[str, Any]] = None
  text: Optional[Mapping[str, Any]] = None
  embed_dim: Optional[int] = None
  temperature_init: float = math.log(10.)
  bias_init: Optional[float] = -10.
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat_policy: str = "none"
  scan_layers: bool = False
  attention_impl: str = "auto"
  norm_impl: str = "auto"

  def _tower_kwargs(self, kwargs: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    shared = dict(dtype=self.dtype, param_dtype=self.param_dtype,
                  remat_policy=self.remat_policy, scan_layers=self.scan_layers,
                  attention_impl=self.attention_impl, norm_impl=self.norm_impl)
    return {**shared, **dict(kwargs or {})}

  def setup(self):
    image_kwargs = self._tower_kwargs(self.image)
    # parent=None: a detached instance, only asked for its size.
    image_width = ViT(parent=None, **image_kwargs).dims["width"]
    embed_dim = self.embed_dim or image_width
    if image_kwargs.get("pool_type") == "none":
      raise ValueError("The image tower must pool (pool_type 'none' gives tokens).")
    if image_width != embed_dim:
      image_kwargs.setdefault("head_dim_out", embed_dim)
    text_kwargs = self._tower_kwargs(self.text)
    text_kwargs.setdefault("out_dim", embed_dim)

    self.img = ViT(**image_kwargs)
    self.txt = TextEncoder(**text_kwargs)
    self.logit_scale = self.param(
        "logit_scale",
        layers.partitioned(nn.initializers.constant(self.temperature_init), ()),
        (), jnp.float32)
    if self.bias_init is None:
      self.logit_bias = None
    else:
      self.logit_bias = self.param(
          "logit_bias",
          layers.partitioned(nn.initializers.constant(self.bias_init), ()),
          (), jnp.float32)

  def embed_images(self, images: jax.Array) -> jax.Array:
    """Images [B, H, W, C] in [-1, 1] -> L2-normalised f32 [B, embed_dim]."""
    return self._embed_images(images)[0]

  def embed_texts(self, texts: jax.Array) -> jax.Array:
    """Token ids [B, L] -> L2-normalised f32 [B, embed_dim]."""
    return self._embed_texts(texts)[0]

  def _embed_images(self, images, train: bool = False):
    out, aux = self.img(images, train=train)
    return l2_normalize(out), aux

  def _embed_texts(self, texts):
    out, aux = self.txt(texts)
    return l2_normalize(out), aux

  def __call__(self, images: Optional[jax.Array] = None,
               texts: Optional[jax.Array] = None, train: bool = False
               ) -> Tuple[Optional[jax.Array], Optional[jax.Array], Dict[str, Any]]:
    """-> (zimg, ztxt, out); a side given as None comes back as None.

    `out` has `logit_scale` (the raw log-scale param), `logit_bias` (or None),
    and `img` / `txt`: the towers' intermediates (`tokens`, `pooled`).
    `train=True` lets the image tower drop patches (its `patch_dropout`, FLIP), which
    needs a `"dropout"` rng; the text tower has no train-time behaviour.
    """
    zimg = ztxt = None
    out = {"logit_scale": self.logit_scale, "logit_bias": self.logit_bias}
    if images is not None:
      zimg, out["img"] = self._embed_images(images, train=train)
    if texts is not None:
      ztxt, out["txt"] = self._embed_texts(texts)
    return zimg, ztxt, out
