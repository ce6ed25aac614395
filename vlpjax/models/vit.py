"""Vision Transformer: named variants, patch embedding, pooling.

A variant string is `NAME` or `NAME/PATCH` (e.g. `"So400m/14"`); explicit
`width`/`depth`/... fields override the table, so tests can build tiny models.
"""
import re
from typing import Any, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from vlpjax.models import layers
from vlpjax.registry import UnknownNameError, unknown_name_message

# big_vision's table; So400m is the shape-optimised ViT of "Getting ViT in Shape"
# (SigLIP So400m). Values: (width, depth, mlp_dim, num_heads).
VIT_VARIANTS: Dict[str, Tuple[int, int, int, int]] = {
    "mu": (32, 1, 128, 2),
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
}
DIM_NAMES = ("width", "depth", "mlp_dim", "num_heads", "patch_size")
POOL_TYPES = ("map", "gap", "tok", "none")
POSEMB_TYPES = ("learn", "sincos2d")


def parse_variant(variant: str) -> Dict[str, Optional[int]]:
  """`"So400m/14"` -> dict(width, depth, mlp_dim, num_heads, patch_size).

  `patch_size` is None when the string names no patch (`"B"`).
  """
  match = re.fullmatch(r"([^/]+)(?:/(\d+))?", str(variant).strip())
  if match is None:
    raise ValueError(f"Bad ViT variant {variant!r}: expected 'NAME' or "
                     f"'NAME/PATCH' such as 'B/16' or 'So400m/14'.")
  name, patch = match.groups()
  if name not in VIT_VARIANTS:
    raise UnknownNameError(unknown_name_message("ViT variant", name, VIT_VARIANTS))
  width, depth, mlp_dim, num_heads = VIT_VARIANTS[name]
  return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads,
              patch_size=int(patch) if patch else None)


def resolve_dims(variant: Optional[str] = None, need_patch: bool = True,
                 **overrides: Optional[int]) -> Dict[str, int]:
  """Variant table values with the non-None `overrides` on top; all must be set."""
  dims = parse_variant(variant) if variant else dict.fromkeys(DIM_NAMES)
  dims.update({k: v for k, v in overrides.items() if v is not None})
  needed = DIM_NAMES if need_patch else DIM_NAMES[:-1]
  missing = [k for k in needed if dims.get(k) is None]
  if missing:
    raise ValueError(f"Model size needs {', '.join(missing)}: give a variant such "
                     f"as 'B/16' or set them explicitly.")
  return dims


def _check_choice(kind: str, value: str, choices) -> None:
  if value not in choices:
    raise ValueError(unknown_name_message(kind, value, choices))


class ViT(nn.Module):
  """ViT image encoder: images [B, H, W, C] in [-1, 1] -> (out, aux).

  `out` is the pooled [B, D] embedding (after the optional linear `proj` head of
  `head_dim_out` units), or the tokens [B, N, D] for `pool_type='none'`. `aux`
  holds `tokens` (encoder output) and `pooled` (before `proj`).
  """
  variant: Optional[str] = None
  width: Optional[int] = None
  depth: Optional[int] = None
  mlp_dim: Optional[int] = None
  num_heads: Optional[int] = None
  patch_size: Optional[int] = None
  pool_type: str = "map"
  posemb: str = "learn"
  head_dim_out: Optional[int] = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat_policy: str = "none"

  @property
  def dims(self) -> Dict[str, int]:
    return resolve_dims(self.variant, width=self.width, depth=self.depth,
                        mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                        patch_size=self.patch_size)

  @property
  def output_dim(self) -> int:
    """Size of the pooled output (`head_dim_out` if set, else the width)."""
    return self.head_dim_out or self.dims["width"]

  @nn.compact
  def __call__(self, images: jax.Array) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    _check_choice("pool type", self.pool_type, POOL_TYPES)
    _check_choice("position embedding", self.posemb, POSEMB_TYPES)
    dims = self.dims
    width, patch = dims["width"], dims["patch_size"]

    x = nn.Conv(
        width, (patch, patch), strides=(patch, patch), padding="VALID",
        dtype=self.dtype, param_dtype=self.param_dtype,
        # Flax rejects a logical name repeated within one array, so only the
        # first spatial dim is named; patch dims are never worth sharding.
        kernel_init=layers.partitioned(nn.initializers.lecun_normal(),
                                       ("patch", None, "channels", "embed")),
        bias_init=layers.partitioned(nn.initializers.zeros_init(), ("embed",)),
        name="patch_embedding")(images.astype(self.dtype))
    batch, grid_h, grid_w, _ = x.shape
    x = jnp.reshape(x, (batch, grid_h * grid_w, width))

    if self.posemb == "learn":
      pos = layers.LearnedPositionEmbedding(
          grid_h * grid_w, width, self.param_dtype, name="position_embedding")()
    else:
      pos = layers.posemb_sincos_2d(grid_h, grid_w, width)
    x = x + pos[None].astype(self.dtype)

    if self.pool_type == "tok":
      cls = self.param("cls", layers.partitioned(nn.initializers.zeros_init(),
                                                 (None, None, "embed")),
                       (1, 1, width), self.param_dtype)
      x = jnp.concatenate(
          [jnp.broadcast_to(cls.astype(self.dtype), (batch, 1, width)), x], axis=1)
    x = layers.constrain(x, layers.ACT_TOKENS)

    tokens = layers.Encoder(
        dims["depth"], dims["mlp_dim"], dims["num_heads"], self.dtype,
        self.param_dtype, self.remat_policy, name="encoder")(x)
    aux = {"tokens": tokens}
    if self.pool_type == "none":
      return tokens, aux

    if self.pool_type == "map":
      pooled = layers.MAPHead(dims["num_heads"], dims["mlp_dim"], self.dtype,
                              self.param_dtype, name="head")(tokens)
    elif self.pool_type == "gap":
      pooled = jnp.mean(tokens, axis=1)
    else:  # "tok"
      pooled = tokens[:, 0]
    aux["pooled"] = pooled

    out = pooled
    if self.head_dim_out is not None:
      out = layers.projection(self.head_dim_out, "proj", self.dtype,
                              self.param_dtype)(pooled)
    return out, aux
