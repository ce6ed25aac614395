"""Resampling a learned ViT position embedding to another patch grid (a new image size).

A learned table is a smooth-ish field over the 2-D patch grid, so a model trained at one
resolution starts at another from the same field resampled: bilinear on the grid (half-pixel
centres, like image resizing), with the kernel widened by the shrink factor when the grid
gets smaller (antialiasing: every old row contributes, instead of a subsample of them).
Plain numpy, so it runs on the host that assembles the params.
"""
import math

import numpy as np


def _grid_side(num_tokens: int, what: str) -> int:
  side = math.isqrt(num_tokens) if num_tokens > 0 else 0
  if side * side != num_tokens or side == 0:
    raise ValueError(f"{what} {num_tokens} is not a square patch grid (side^2 tokens; "
                     f"a class token's row must be removed first).")
  return side


def _linear_weights(size_in: int, size_out: int) -> np.ndarray:
  """[size_out, size_in] weights of 1-D linear resampling (triangle kernel), rows sum to 1.

  Output sample i sits at input coordinate (i + 0.5) * size_in / size_out - 0.5. Shrinking
  widens the triangle by size_in / size_out; input samples the kernel would need beyond the
  edges are dropped and the remaining weights renormalised (for upsampling this is the same
  as clamping to the edge).
  """
  scale = size_out / size_in
  support = max(1.0, 1.0 / scale)
  centres = (np.arange(size_out) + 0.5) / scale - 0.5
  distance = (np.arange(size_in)[None, :] - centres[:, None]) / support
  weights = np.maximum(0.0, 1.0 - np.abs(distance))
  return weights / weights.sum(axis=1, keepdims=True)


def resample_posemb(posemb: np.ndarray, new_num_tokens: int) -> np.ndarray:
  """Learned posemb [N, D] on a square grid (raster order) -> [new_num_tokens, D].

  Both N and `new_num_tokens` must be squares (ValueError otherwise). Same dtype as the
  input; the input itself when the size is unchanged.
  """
  posemb = np.asarray(posemb)
  if posemb.ndim != 2:
    raise ValueError(f"posemb must be [num_tokens, width], got shape {posemb.shape}.")
  old = _grid_side(posemb.shape[0], "posemb rows")
  new = _grid_side(int(new_num_tokens), "new_num_tokens")
  if new == old:
    return posemb
  weights = _linear_weights(old, new)
  grid = posemb.astype(np.float64).reshape(old, old, -1)
  resized = np.einsum("yh,xw,hwd->yxd", weights, weights, grid)
  return resized.reshape(new * new, -1).astype(posemb.dtype)
