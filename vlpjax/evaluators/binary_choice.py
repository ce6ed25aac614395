"""Winoground-style binary choice: for two images and two captions, which goes with which.

Winoground (Thrush et al. 2022) scores pairs of examples whose captions use the same words
in a different order, so a model that reads a caption as a bag of words cannot tell them
apart. For pair n, s[n, i, t] is the match score of image i with caption t (i, t in {0, 1};
image i belongs with caption i):

  text score   per image, the right caption beats the other: s[0,0] > s[0,1] and s[1,1] > s[1,0]
  image score  per caption, the right image beats the other: s[0,0] > s[1,0] and s[1,1] > s[0,1]
  group score  both.

The inequalities are strict: a tie is a wrong answer. Counting ties as right would give 100%
to a model that scores every match the same (all 0, say), the failure of a collapsed or
untrained model. For continuous scores drawn at random the chance levels
are 1/4 for text and image (two fair coin flips) and 1/6 for group: the group is right
exactly when s[0,0] and s[1,1] are the two largest of the four scores, one of the C(4, 2) = 6
equally likely ways of choosing the top two.

The evaluator ("binary_choice") builds such pairs from an image-text eval split, for any
family with `embed_images` / `embed_texts` (two_tower, coca): the score is the dot product of
the L2-normalised embeddings, zimg @ ztxt. Config entry (`config.evals.<name>`):
  type="binary_choice", every_steps, task, split (default "validation"), pp, batch_size,
  pairing    "hardest" (default): every example is paired with the example whose caption
             shares the most tokens with its own while being a different caption (Winoground's
             minimal pairs, approximated); greedily in example order, each example used at
             most once, ties to the lowest index. "consecutive": examples (0, 1), (2, 3), ...,
             for splits stored as pairs already (an odd last example is left out).
  max_pairs  score at most this many pairs, the first ones formed (0 = all)
"""
from typing import Dict, List, Tuple

import numpy as np

from vlpjax.evaluators import EVALUATORS
from vlpjax.evaluators import common

PAIRINGS = ("hardest", "consecutive")
# Chance levels of continuous random scores (module docstring).
CHANCE = {"chance_text": 0.25, "chance_image": 0.25, "chance_group": 1 / 6}


def winoground_scores(scores: np.ndarray) -> Dict[str, float]:
  """Text, image and group scores of [N, 2, 2] pair scores (module docstring).

  Args:
    scores: s[n, i, t], the match score of image i with caption t of pair n.

  Returns:
    {"text_score", "image_score", "group_score"}: the fractions of pairs answered right, the
    chance levels "chance_text", "chance_image", "chance_group", and "num_pairs".
  """
  s = np.asarray(scores, dtype=np.float64)
  if s.ndim != 3 or s.shape[1:] != (2, 2) or not len(s):
    raise ValueError(f"scores must be [num_pairs >= 1, 2 images, 2 captions], got shape "
                     f"{s.shape}.")
  if not np.all(np.isfinite(s)):
    bad = int(np.argwhere(~np.isfinite(s))[0, 0])
    raise ValueError(f"scores of pair {bad} have a NaN or infinite value: {s[bad].tolist()}.")
  text = (s[:, 0, 0] > s[:, 0, 1]) & (s[:, 1, 1] > s[:, 1, 0])
  image = (s[:, 0, 0] > s[:, 1, 0]) & (s[:, 1, 1] > s[:, 0, 1])
  return {"text_score": float(np.mean(text)), "image_score": float(np.mean(image)),
          "group_score": float(np.mean(text & image)), **CHANCE, "num_pairs": float(len(s))}


# -- pairing ---------------------------------------------------------------------------------

def _token_counts(texts: np.ndarray) -> np.ndarray:
  """int32 [N, V']: how often each token that occurs (padding 0 aside) is in each caption."""
  vocab, inverse = np.unique(texts, return_inverse=True)
  counts = np.zeros((len(texts), len(vocab)), np.int32)
  np.add.at(counts, (np.repeat(np.arange(len(texts)), texts.shape[1]), inverse.reshape(-1)), 1)
  return counts[:, vocab != 0]


def hardest_pairs(texts: np.ndarray, max_pairs: int = 0) -> List[Tuple[int, int]]:
  """Pairs (i, j) of examples whose captions share the most tokens (module docstring).

  Shared tokens count with multiplicity (the size of the multiset intersection of the two
  captions' tokens, padding aside). Examples are visited in order; an example not yet paired
  is paired with the unpaired example of the most shared tokens whose caption differs from
  its own, the lowest index on a tie. An example with no such partner stays unpaired.

  Args:
    texts: int32 [N, L] token ids padded with 0.
    max_pairs: stop after this many pairs (0 = no limit).
  """
  texts = _check_texts(texts)
  counts = _token_counts(texts)
  free = np.ones(len(texts), bool)
  pairs = []
  for i in range(len(texts)):
    if not free[i]:
      continue
    free[i] = False
    candidates = free & np.any(texts != texts[i], axis=1)
    if not candidates.any():
      continue
    present = counts[i] > 0
    shared = np.minimum(counts[:, present], counts[i, present]).sum(axis=1)
    j = int(np.argmax(np.where(candidates, shared, -1)))  # argmax: the first of the best.
    free[j] = False
    pairs.append((i, j))
    if len(pairs) == max_pairs:
      break
  return pairs


def consecutive_pairs(num_examples: int, max_pairs: int = 0) -> List[Tuple[int, int]]:
  """(0, 1), (2, 3), ...: at most `max_pairs` of them (0 = all)."""
  pairs = [(i, i + 1) for i in range(0, num_examples - 1, 2)]
  return pairs[:max_pairs] if max_pairs else pairs


def _check_texts(texts) -> np.ndarray:
  texts = np.asarray(texts)
  if texts.ndim != 2 or not np.issubdtype(texts.dtype, np.integer):
    raise ValueError(f"texts must be int token ids [num_examples, length], got shape "
                     f"{texts.shape} of {texts.dtype}.")
  return texts


def pair_scores(zimg: np.ndarray, ztxt: np.ndarray, pairs: List[Tuple[int, int]]
                ) -> np.ndarray:
  """float [len(pairs), 2, 2]: s[n, i, t] = zimg[pairs[n][i]] @ ztxt[pairs[n][t]]."""
  index = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
  return np.einsum("nid,ntd->nit", zimg[index], ztxt[index])


# -- evaluator -------------------------------------------------------------------------------

@EVALUATORS.register("binary_choice")
class BinaryChoice:
  """Winoground text / image / group scores on pairs of an image-text eval split."""

  @staticmethod
  def config_keys():
    return ("every_steps", "task", "split", "pp", "batch_size", "max_pairs", "pairing")

  def __init__(self, name, cfg: Dict, *, config, family, mesh):
    if not (hasattr(family, "embed_images") and hasattr(family, "embed_texts")):
      raise ValueError(f"evals.{name}: family {config.family!r} has no embed_images / "
                       "embed_texts to score image-caption matches with.")
    self.name = name
    self.every_steps = cfg.get("every_steps", 0)
    self.pairing = cfg.get("pairing", "hardest")
    if self.pairing not in PAIRINGS:
      raise ValueError(f"evals.{name}.pairing must be one of {PAIRINGS}, got "
                       f"{self.pairing!r}.")
    self.max_pairs = cfg.get("max_pairs", 0)
    if not isinstance(self.max_pairs, int) or self.max_pairs < 0:
      raise ValueError(f"evals.{name}.max_pairs must be an int >= 0 (0 = all), got "
                       f"{self.max_pairs!r}.")
    self.embedder = common.make_embedder(cfg, config=config, family=family, mesh=mesh)

  def pairs(self, texts: np.ndarray) -> List[Tuple[int, int]]:
    if self.pairing == "hardest":
      return hardest_pairs(texts, self.max_pairs)
    return consecutive_pairs(len(texts), self.max_pairs)

  def run(self, params) -> Dict[str, float]:
    data = self.embedder.embed_dataset(params)
    if "id_hash" in data:
      # Greedy pairing depends on example order, which depends on how many hosts read the
      # split: fix one order so every process layout forms the same pairs.
      order = np.argsort(data["id_hash"], kind="stable")
      data = {k: v[order] for k, v in data.items()}
    pairs = self.pairs(data["texts"])
    if not pairs:
      raise ValueError(f"evals.{self.name}: no pair to score among {len(data['texts'])} "
                       f"examples (pairing {self.pairing!r} needs two with different "
                       "captions).")
    return winoground_scores(pair_scores(data["zimg"], data["ztxt"], pairs))
