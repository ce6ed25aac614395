"""Vision Transformer: named variants, patch embedding, pooling, FLIP patch dropping.

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


def num_kept_patches(num_patches: int, ratio: float) -> int:
  """How many of `num_patches` tokens survive FLIP dropping at `ratio` (Python `round`)."""
  if not 0.0 <= ratio < 1.0:
    raise ValueError(f"ViT patch_dropout must be in [0, 1) (the fraction of patch tokens "
                     f"dropped in training), got {ratio!r}.")
  keep = round(num_patches * (1.0 - ratio))
  if keep < 1:
    raise ValueError(f"ViT patch_dropout={ratio} keeps no token of the {num_patches} "
                     f"patches; lower it or use a smaller patch size.")
  return keep


def drop_patches(x: jax.Array, keep: int, rng: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """Keeps a random `keep` of the N tokens of x [B, N, D], independently per example.

  The first `keep` positions of an argsort of uniform noise are a uniformly random subset
  (MAE / FLIP). Sorting them keeps the survivors in raster order: the encoder does not care
  (tokens carry their position embedding), but whoever reads `tokens` sees image order.
  Returns (x [B, keep, D], indices int32 [B, keep]).
  """
  batch, num, _ = x.shape
  noise = jax.random.uniform(rng, (batch, num))
  indices = jnp.sort(jnp.argsort(noise, axis=1)[:, :keep], axis=1).astype(jnp.int32)
  return jnp.take_along_axis(x, indices[:, :, None], axis=1), indices


class PatchEmbedding(nn.Module):
  """images [B, H, W, C] -> [B, H/p, W/p, width]: one linear map per non-overlapping p x p patch.

  The parameters are `nn.Conv(width, (p, p), strides=(p, p), padding="VALID")`'s (`kernel`
  [p, p, C, width], `bias` [width], same initialisers, so the same values from the same rng),
  and so is the function: trailing rows and columns that fill no patch are dropped.
  Why not the conv: a stride-p conv with no overlap is a matmul of the patches, and backends
  run a matmul better than they run this conv. On 2 CPU cores (B/16, batch 32, f32) the
  conv's forward + kernel gradient took 92 ms, the matmul 40 ms; on an H100 the conv ran as
  an sm80 implicit-GEMM kernel at ~35 TFLOP/s plus two channel-padding kernels (~2.3 ms of a
  102 ms step, docs/benchmarks.md), where the matmul goes to cuBLAS with everything else.
  """
  width: int
  patch_size: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    p = self.patch_size
    batch, height, width_px, channels = images.shape
    grid_h, grid_w = height // p, width_px // p
    if not grid_h or not grid_w:
      raise ValueError(f"Images of {height}x{width_px} pixels are smaller than one "
                       f"{p}x{p} patch.")
    kernel = self.param(
        "kernel",
        # Flax rejects a logical name repeated within one array, so only the first
        # spatial dim is named; patch dims are never worth sharding.
        layers.partitioned(nn.initializers.lecun_normal(),
                           ("patch", None, "channels", "embed")),
        (p, p, channels, self.width), self.param_dtype)
    bias = self.param("bias", layers.partitioned(nn.initializers.zeros_init(), ("embed",)),
                      (self.width,), self.param_dtype)
    # Cast first: the transpose below then moves compute-dtype bytes.
    images = images.astype(self.dtype)
    patches = images[:, :grid_h * p, :grid_w * p].reshape(
        batch, grid_h, p, grid_w, p, channels).transpose(0, 1, 3, 2, 4, 5)
    patches, kernel, bias = nn.dtypes.promote_dtype(patches, kernel, bias, dtype=self.dtype)
    # [B, gh, gw, p, p, C] . [p, p, C, width]: the batch dim leads, so a batch-sharded
    # image stays batch-sharded through the flattening in token_matmul.
    return layers.token_matmul(patches, kernel, num_contract=3) + bias


class ViT(nn.Module):
  """ViT image encoder: images [B, H, W, C] in [-1, 1] -> (out, aux).

  `out` is the pooled [B, D] embedding (after the optional linear `proj` head of
  `head_dim_out` units), or the tokens [B, N, D] for `pool_type='none'`. `aux`
  holds `tokens` (encoder output) and `pooled` (before `proj`).

  `patch_dropout` (FLIP, Li et al. 2023): with `train=True` only a random
  round(N * (1 - patch_dropout)) of the N patch tokens enter the encoder, drawn per
  example from the `"dropout"` rng stream after the position embedding is added (so
  every kept token still knows where it came from) and before a `tok` class token is
  prepended (which is always kept). `aux["kept_indices"]` [B, K] then names the patches
  kept. The point is compute: at 0.5 the encoder runs on half the tokens (attention on a
  quarter of the pairs), so the image tower costs about half as much per example.
  `train=False` (evaluation, the default) always sees every patch.

  CLIP options (off by default, so SigLIP-style trees are unchanged): `pre_norm` adds a
  LayerNorm `pre_layernorm` on the tokens (class token included) before the encoder, CLIP's
  `pre_layrnorm`; `proj_bias=False` drops the bias of `proj` (CLIP's `visual_projection`).

  `scan_layers=True` runs the encoder blocks as one `nn.scan` (`layers.Encoder`): their
  params move from `encoder/layers_{i}` to `encoder/scanned`, stacked on a leading `layers`
  axis; the function computed is the same.
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
  patch_dropout: float = 0.0
  pre_norm: bool = False
  proj_bias: bool = True
  scan_layers: bool = False
  attention_impl: str = "auto"
  norm_impl: str = "auto"

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
  def __call__(self, images: jax.Array, train: bool = False
               ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    _check_choice("pool type", self.pool_type, POOL_TYPES)
    _check_choice("position embedding", self.posemb, POSEMB_TYPES)
    dims = self.dims
    width, patch = dims["width"], dims["patch_size"]

    x = PatchEmbedding(width, patch, self.dtype, self.param_dtype,
                       name="patch_embedding")(images)
    batch, grid_h, grid_w, _ = x.shape
    x = jnp.reshape(x, (batch, grid_h * grid_w, width))

    if self.posemb == "learn":
      pos = layers.LearnedPositionEmbedding(
          grid_h * grid_w, width, self.param_dtype, name="position_embedding")()
    else:
      pos = layers.posemb_sincos_2d(grid_h, grid_w, width)
    x = layers.add_position_embedding(x, pos)

    # Checked on every call so a bad config fails at init, not at the first train step.
    keep = num_kept_patches(grid_h * grid_w, self.patch_dropout)
    kept_indices = None
    if train and self.patch_dropout > 0:
      x, kept_indices = drop_patches(x, keep, self.make_rng("dropout"))

    if self.pool_type == "tok":
      cls = self.param("cls", layers.partitioned(nn.initializers.zeros_init(),
                                                 (None, None, "embed")),
                       (1, 1, width), self.param_dtype)
      x = jnp.concatenate(
          [jnp.broadcast_to(cls.astype(self.dtype), (batch, 1, width)), x], axis=1)
    if self.pre_norm:
      x = layers.layer_norm("pre_layernorm", self.param_dtype)(x).astype(self.dtype)
    x = layers.constrain(x, layers.ACT_TOKENS)

    tokens = layers.Encoder(
        dims["depth"], dims["mlp_dim"], dims["num_heads"], self.dtype,
        self.param_dtype, self.remat_policy, scan_layers=self.scan_layers,
        attention_impl=self.attention_impl, norm_impl=self.norm_impl, name="encoder")(x)
    aux = {"tokens": tokens}
    if kept_indices is not None:
      aux["kept_indices"] = kept_indices
    if self.pool_type == "none":
      return tokens, aux

    if self.pool_type == "map":
      pooled = layers.MAPHead(dims["num_heads"], dims["mlp_dim"], self.dtype,
                              self.param_dtype, self.attention_impl, name="head")(tokens)
    elif self.pool_type == "gap":
      pooled = jnp.mean(tokens, axis=1)
    else:  # "tok"
      pooled = tokens[:, 0]
    aux["pooled"] = pooled

    out = pooled
    if self.head_dim_out is not None:
      out = layers.projection(self.head_dim_out, "proj", self.dtype,
                              self.param_dtype, use_bias=self.proj_bias)(pooled)
    return out, aux
