"""One module per data kind: its seqio preprocessors, output features and sources.

Every generative kind yields prefix-LM examples in one format (see `docs/data.md`):
  inputs   int32 [n_in]   prompt tokens; one `<image>` id per image, at its place in the stream
  targets  int32 [n_tgt]  tokens to predict, ending in EOS
  images   uint8 [n_img, S, S, 3]  decoded and resized to the task's image size
so that `vlpjax.data.packing` can pack any mixture of kinds into rows that carry their images.
Kinds with more structure add optional features (video `frames`, document `input_boxes`).

All kinds declare the same `output_features` (the optional ones `required=False`):
a seqio Mixture refuses tasks whose output features differ, and a mixture across
kinds is the point of the framework.
"""
from typing import Dict, Optional

import seqio
import tensorflow as tf

from vlpjax.data import vocab


def output_features(vocabulary: Optional[seqio.Vocabulary] = None) -> Dict[str, seqio.Feature]:
  """The prefix-LM contract's features, shared by every generative kind.

  `targets` are declared `add_eos=True` because they end in EOS; the kinds'
  preprocessors append it themselves (after truncation), so no seqio `append_eos`.
  The vocabulary must have the structure tokens (`vocab.MultimodalVocabulary`).
  """
  vocabulary = vocabulary or vocab.multimodal_vocabulary()
  optional = dict(required=False)
  return {
      "inputs": seqio.Feature(vocabulary, add_eos=False),
      "targets": seqio.Feature(vocabulary, add_eos=True),
      # seqio checks only dtype and rank: images are [n, S, S, 3].
      "images": seqio.ContinuousFeature(dtype=tf.uint8, rank=4),
      "image_mask": seqio.ContinuousFeature(dtype=tf.bool, rank=1, **optional),
      # Documents: the normalised box of each input token.
      "input_boxes": seqio.ContinuousFeature(dtype=tf.float32, rank=2, **optional),
      # Videos: sampled frames (or precomputed features) with their times.
      "frame_times": seqio.ContinuousFeature(dtype=tf.float32, rank=1, **optional),
      "frame_mask": seqio.ContinuousFeature(dtype=tf.bool, rank=1, **optional),
      "frames": seqio.ContinuousFeature(dtype=tf.uint8, rank=4, **optional),
      "frame_features": seqio.ContinuousFeature(dtype=tf.float32, rank=2, **optional),
  }
