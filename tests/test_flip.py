"""FLIP patch dropping: which tokens the ViT keeps, train vs eval, and a two-tower train step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_trainer import DEMO, TINY_ARG, one_step, random_batch, tiny_model
from vlpjax import config as config_lib
from vlpjax import families
from vlpjax.models.vit import ViT

# 16 px images, patch 4: N = 16 patch tokens.
TINY_VIT = dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=4)
NUM_PATCHES = 16


def _images(batch=4, seed=0):
  return jax.random.uniform(jax.random.PRNGKey(seed), (batch, 16, 16, 3),
                            minval=-1., maxval=1.)


def _init(**kwargs):
  return ViT(**TINY_VIT, **kwargs).init(jax.random.PRNGKey(1), _images())


def _apply(params, images, *, train, seed=0, **kwargs):
  return ViT(**TINY_VIT, **kwargs).apply(
      params, images, train=train, rngs={"dropout": jax.random.PRNGKey(seed)})


def test_ratio_zero_in_training_is_the_unmasked_forward():
  params = _init()
  images = _images()
  out_eval, aux_eval = _apply(params, images, train=False)
  out_train, aux_train = _apply(params, images, train=True, patch_dropout=0.0)
  np.testing.assert_array_equal(out_train, out_eval)
  np.testing.assert_array_equal(aux_train["tokens"], aux_eval["tokens"])
  assert "kept_indices" not in aux_train


@pytest.mark.parametrize("pool_type", ["map", "tok"])
def test_training_keeps_a_quarter_of_the_tokens_per_rng(pool_type):
  params = _init(pool_type=pool_type)
  images = _images()
  kw = dict(train=True, patch_dropout=0.75, pool_type=pool_type)
  out_a, aux_a = _apply(params, images, seed=0, **kw)
  out_a2, aux_a2 = _apply(params, images, seed=0, **kw)
  out_b, aux_b = _apply(params, images, seed=1, **kw)
  num_cls = int(pool_type == "tok")
  assert aux_a["tokens"].shape == (4, NUM_PATCHES // 4 + num_cls, 32)
  assert aux_a["kept_indices"].shape == (4, NUM_PATCHES // 4)
  # Same rng, same subset (the GradCache re-run relies on this); another rng, another one.
  np.testing.assert_array_equal(aux_a2["kept_indices"], aux_a["kept_indices"])
  np.testing.assert_array_equal(out_a2, out_a)
  assert not np.array_equal(aux_b["kept_indices"], aux_a["kept_indices"])
  assert not np.allclose(out_b, out_a)


def test_eval_ignores_the_ratio():
  params = _init()
  images = _images()
  out_full, aux_full = _apply(params, images, train=False)
  out_eval, aux_eval = _apply(params, images, train=False, patch_dropout=0.75)
  np.testing.assert_array_equal(out_eval, out_full)
  np.testing.assert_array_equal(aux_eval["tokens"], aux_full["tokens"])


@pytest.mark.parametrize("pool_type", ["none", "tok"])
def test_kept_tokens_are_the_unmasked_rows(pool_type):
  # Depth 0: the encoder is only its final LayerNorm, which acts on each token alone, so the
  # masked tokens must be exactly the unmasked tokens at the kept indices (patch embedding and
  # position embedding included: a posemb taken from the wrong row would show).
  kw = dict(depth=0, pool_type=pool_type)
  params = ViT(**{**TINY_VIT, **kw}).init(jax.random.PRNGKey(1), _images())
  # Identical images in every row: only per-example noise can make the subsets differ.
  images = jnp.broadcast_to(_images(batch=1), (6, 16, 16, 3))
  model = ViT(**{**TINY_VIT, **kw, "patch_dropout": 0.5})
  _, full = model.apply(params, images, train=False)
  _, masked = model.apply(params, images, train=True, rngs={"dropout": jax.random.PRNGKey(3)})
  idx = np.asarray(masked["kept_indices"])
  assert idx.shape == (6, 8)
  assert np.all(np.diff(idx, axis=1) > 0)  # sorted and distinct: raster order kept
  assert idx.min() >= 0 and idx.max() < NUM_PATCHES
  assert len({tuple(row) for row in idx}) > 1  # independent per example
  full_tokens, masked_tokens = np.asarray(full["tokens"]), np.asarray(masked["tokens"])
  if pool_type == "tok":  # The class token is prepended after dropping and always kept.
    np.testing.assert_array_equal(masked_tokens[:, 0], full_tokens[:, 0])
    full_tokens, masked_tokens = full_tokens[:, 1:], masked_tokens[:, 1:]
  want = np.take_along_axis(full_tokens, idx[:, :, None], axis=1)
  np.testing.assert_array_equal(masked_tokens, want)


@pytest.mark.parametrize("ratio", [1.0, -0.1, 0.99])
def test_bad_ratio_raises(ratio):
  # 0.99 is a legal fraction but keeps round(0.16) = 0 of the 16 patches.
  with pytest.raises(ValueError, match="patch_dropout"):
    ViT(**TINY_VIT, patch_dropout=ratio).init(jax.random.PRNGKey(0), _images())


def _two_tower_config(patch_dropout):
  """tests/test_trainer.py's tiny SigLIP config (16 px, patch 8: 4 patches per image)."""
  config = tiny_model(config_lib.load(f"{DEMO}:{TINY_ARG}"))
  config.evals = {}
  config.model.image.patch_dropout = patch_dropout
  return config_lib.finalize(config)


def test_two_tower_train_step_with_patch_dropout():
  config = _two_tower_config(0.5)
  batch = random_batch(config)
  params, metrics = one_step(config, batch)  # On the 8 test devices, batch-sharded.
  assert np.isfinite(metrics["loss"])

  # The family masks in `features` (train) and not in `embed_images` (eval).
  flip = families.get_family(config)
  base = families.get_family(_two_tower_config(0.0))
  images, rng = batch["image"], jax.random.PRNGKey(0)
  flip_zimg = jax.jit(lambda p, b, r: flip.features(p, b, r)["zimg"])
  base_zimg = jax.jit(lambda p, b, r: base.features(p, b, r)["zimg"])
  unmasked = jax.jit(base.embed_images)(params, images)
  np.testing.assert_array_equal(jax.jit(flip.embed_images)(params, images), unmasked)
  np.testing.assert_array_equal(base_zimg(params, batch, rng), unmasked)
  masked = flip_zimg(params, batch, rng)
  assert not np.allclose(masked, unmasked)
  np.testing.assert_array_equal(flip_zimg(params, batch, rng), masked)
