"""Winoground-style binary choice: scores by hand, chance levels, pairing, a real tiny run."""
import os

from flax import linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_mixtures import shapes as shapes_tasks
from vlpjax import config as config_lib
from vlpjax import families
from vlpjax import sharding
from vlpjax.evaluators import binary_choice as bc
from vlpjax.evaluators import build_evaluators
from vlpjax.evaluators import common

# -- scores ----------------------------------------------------------------------------------

# s[i, t]: image i with caption t; image i belongs with caption i.
PERFECT = [[1.0, 0.0], [0.0, 1.0]]
TEXT_ONLY = [[0.5, 0.1], [0.9, 0.95]]    # rows: 0.5 > 0.1, 0.95 > 0.9; column 0: 0.5 < 0.9
IMAGE_ONLY = [[0.5, 0.9], [0.1, 0.95]]   # columns: 0.5 > 0.1, 0.95 > 0.9; row 0: 0.5 < 0.9
NEITHER = [[0.0, 1.0], [1.0, 0.0]]       # swapped
ONE_TIE = [[0.5, 0.5], [0.0, 1.0]]       # image 0 cannot choose: text wrong; image right


@pytest.mark.parametrize("pair,text,image", [
    (PERFECT, 1, 1), (TEXT_ONLY, 1, 0), (IMAGE_ONLY, 0, 1), (NEITHER, 0, 0), (ONE_TIE, 0, 1),
    ([[0.0, 0.0], [0.0, 0.0]], 0, 0),    # all ties: all wrong (non-strict would give 1, 1)
])
def test_single_pair_by_hand(pair, text, image):
  scores = bc.winoground_scores(np.array([pair]))
  assert scores == {"text_score": text, "image_score": image, "group_score": text * image,
                    "chance_text": 0.25, "chance_image": 0.25, "chance_group": 1 / 6,
                    "num_pairs": 1.0}


def test_scores_average_over_pairs():
  scores = bc.winoground_scores(np.array([PERFECT, TEXT_ONLY, IMAGE_ONLY, NEITHER, ONE_TIE]))
  # text: perfect, text-only; image: perfect, image-only, one-tie; group: perfect.
  assert scores["text_score"] == 2 / 5 and scores["image_score"] == 3 / 5
  assert scores["group_score"] == 1 / 5 and scores["num_pairs"] == 5
  # An all-zero model (e.g. collapsed embeddings) scores 0, not 100%.
  zeros = bc.winoground_scores(np.zeros((7, 2, 2)))
  assert zeros["text_score"] == zeros["image_score"] == zeros["group_score"] == 0.0


def test_chance_levels_match_random_scores():
  # 200k pairs of iid normal scores: standard error about 0.001.
  scores = bc.winoground_scores(np.random.default_rng(0).normal(size=(200_000, 2, 2)))
  for key in ("text", "image", "group"):
    assert scores[f"{key}_score"] == pytest.approx(scores[f"chance_{key}"], abs=0.005), key


def test_bad_scores():
  with pytest.raises(ValueError, match=r"\[num_pairs >= 1, 2 images, 2 captions\]"):
    bc.winoground_scores(np.zeros((3, 2)))
  with pytest.raises(ValueError, match=r"\[num_pairs >= 1"):
    bc.winoground_scores(np.zeros((0, 2, 2)))
  with pytest.raises(ValueError, match="pair 1 have a NaN"):
    bc.winoground_scores(np.array([PERFECT, [[np.nan, 0], [0, 1]]]))


def test_pair_scores_index_images_and_captions():
  zimg = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
  ztxt = np.array([[0.0, 1.0], [1.0, 0.0], [0.8, 0.6]])
  got = bc.pair_scores(zimg, ztxt, [(2, 0), (1, 2)])
  for n, pair in enumerate([(2, 0), (1, 2)]):
    for i in range(2):
      for t in range(2):
        assert got[n, i, t] == pytest.approx(zimg[pair[i]] @ ztxt[pair[t]])


# -- pairing ---------------------------------------------------------------------------------

CAPTIONS = np.array([
    [5, 6, 7, 0],   # 0
    [8, 9, 0, 0],   # 1
    [7, 6, 5, 0],   # 2: the words of 0 in another order: shares 3 with 0
    [5, 6, 7, 0],   # 3: the same caption as 0: never its partner
    [8, 9, 9, 0],   # 4: shares 2 with 1 (9 counts once: 1 has one 9)
    [9, 8, 0, 0],   # 5: shares 2 with 1 too: the tie goes to 4
], np.int32)


def test_hardest_pairs_by_hand():
  # 0 -> 2 (3 shared; 3 is identical). 1 -> 4 (2 shared, tie with 5: lowest index).
  # 3 -> 5, the only example left (nothing shared).
  assert bc.hardest_pairs(CAPTIONS) == [(0, 2), (1, 4), (3, 5)]
  assert bc.hardest_pairs(CAPTIONS, max_pairs=2) == [(0, 2), (1, 4)]
  # Shared tokens count with multiplicity: [9 9 8] shares 2 with [9 9 9], [9 7 7] only 1.
  assert bc.hardest_pairs(np.array([[9, 9, 9], [9, 7, 7], [9, 9, 8]])) == [(0, 2)]
  # Identical captions cannot be told apart: no pair; padding is not a shared token.
  assert bc.hardest_pairs(np.array([[5, 0, 0], [5, 0, 0]])) == []
  assert bc.hardest_pairs(np.array([[5, 0, 0], [6, 0, 0], [6, 7, 0]])) == [(0, 1)]
  with pytest.raises(ValueError, match="int token ids"):
    bc.hardest_pairs(np.zeros((2, 3), np.float32))


def test_consecutive_pairs():
  assert bc.consecutive_pairs(5) == [(0, 1), (2, 3)]
  assert bc.consecutive_pairs(6, max_pairs=1) == [(0, 1)]
  assert bc.consecutive_pairs(1) == []


# -- the evaluator on a real tiny two-tower model ----------------------------------------------

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "experiments", "siglip_shapes.py")
TASK = "binary_choice_test_shapes"
PP = "resize(16)|value_range(-1, 1)"
shapes_tasks.register_shapes_task(TASK, image_size=16, split_sizes={"train": 8,
                                                                     "validation": 20})


def tiny_config(evals):
  config = config_lib.load(f"{DEMO}:steps=1,batch=16,size=16,eval_every=0")
  config.model.image.update(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8)
  config.model.text.update(width=32, depth=1, mlp_dim=64, num_heads=2, max_len=16)
  config.model.embed_dim = 32
  config.evals = evals
  return config_lib.finalize(config)


def test_evaluator_scores_the_family_embeddings():
  entry = dict(task=TASK, split="validation", pp=PP, batch_size=16)  # 20 rows: 2 batches
  config = tiny_config({"hard": dict(type="binary_choice", **entry),
                        "next": dict(type="binary_choice", pairing="consecutive",
                                     max_pairs=3, **entry)})
  family = families.get_family(config)
  specs = family.input_specs(1)
  params = jax.device_get(jax.jit(lambda rng: nn.unbox(family.init(
      rng, {k: jnp.zeros(s.shape, s.dtype) for k, s in specs.items()})))(jax.random.key(0)))
  mesh = sharding.make_mesh(config.mesh)
  evaluators = build_evaluators(config, family, mesh)
  got = {name: evaluator.run(params) for name, evaluator in evaluators.items()}

  # The same examples, embedded by the family itself on one device, without the mesh.
  # Pairs are formed in id-hash order (the same for any number of hosts).
  images, texts, ids = [], [], []
  for batch in common.EvalData(TASK, "validation", PP, 16).batches(config):
    images.append(batch["image"][batch["mask"]])
    texts.append(batch["texts"][batch["mask"]])
    ids.append(batch["id_hash"][batch["mask"]])
  order = np.argsort(np.concatenate(ids), kind="stable")
  images, texts = np.concatenate(images)[order], np.concatenate(texts)[order]
  assert len(images) == 20
  zimg = np.asarray(jax.jit(family.embed_images)(params, images))
  ztxt = np.asarray(jax.jit(family.embed_texts)(params, texts))
  for name, pairs in (("hard", bc.hardest_pairs(texts)), ("next", [(0, 1), (2, 3), (4, 5)])):
    scores = bc.pair_scores(zimg, ztxt, pairs)
    assert got[name] == bc.winoground_scores(scores), name
    # No score is within float32 noise of the one it is compared with.
    assert np.min(np.abs(scores[:, 0, :] - scores[:, 1, :])) > 1e-5
    assert np.min(np.abs(scores[:, :, 0] - scores[:, :, 1])) > 1e-5
  assert got["hard"]["num_pairs"] == len(bc.hardest_pairs(texts)) >= 5
  assert got["next"]["num_pairs"] == 3


def test_evaluator_config_errors():
  config = tiny_config({})
  family = families.get_family(config)
  mesh = sharding.make_mesh(config.mesh)

  def build(family, **entry):
    entry = dict(dict(type="binary_choice", task=TASK, batch_size=16), **entry)
    return build_evaluators(tiny_config({"e": entry}), family, mesh)["e"]

  with pytest.raises(ValueError, match="has no embed_images / embed_texts"):
    build(object())
  with pytest.raises(ValueError, match="pairing must be one of"):
    build(family, pairing="hard")
  with pytest.raises(ValueError, match="max_pairs must be an int >= 0"):
    build(family, max_pairs=-1)
  with pytest.raises(config_lib.ConfigError, match="max_pair"):
    build(family, max_pair=3)
