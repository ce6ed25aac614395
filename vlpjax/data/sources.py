"""seqio data sources for image-caption records (schema in docs/data.md).

A record has `image` (encoded bytes), `caption` (one or several strings) and,
optionally, `id` (string, named in error messages) and `label` (int64 class).
"""
from typing import Dict, Iterable, Mapping, Optional, Union

import seqio
import tensorflow as tf

NO_LABEL = -1


def image_caption_feature_description() -> Dict[str, object]:
  """How an image-caption tf.train.Example is parsed."""
  return {
      # Defaults instead of parse errors: a record without an image or caption
      # becomes a bad record ("missing image" / "empty caption") with its id.
      "image": tf.io.FixedLenFeature([], tf.string, default_value=""),
      # Ragged, not VarLen: gives a RaggedTensor that tf.data and seqio pass
      # through cleanly; `choose_caption` picks one per example.
      "caption": tf.io.RaggedFeature(tf.string),
      "id": tf.io.FixedLenFeature([], tf.string, default_value=""),
      "label": tf.io.FixedLenFeature([], tf.int64, default_value=NO_LABEL),
  }


def tfexample_source(file_pattern: Mapping[str, Union[str, Iterable[str]]],
                     feature_description: Mapping[str, object],
                     num_input_examples: Optional[Mapping[str, int]] = None
                     ) -> seqio.TFExampleDataSource:
  """TFRecord files of tf.train.Examples parsed with `feature_description`.

  Args:
    file_pattern: split name -> glob (or list of globs) of TFRecord files.
    feature_description: how one Example is parsed (each kind's `feature_description()`).
    num_input_examples: optional split -> record count, which lets the pipeline
      size evaluation without a counting pass.
  """
  return seqio.TFExampleDataSource(
      split_to_filepattern=dict(file_pattern),
      feature_description=dict(feature_description),
      num_input_examples=num_input_examples)


def tfds_source(name: str, tfds_data_dir: Optional[str] = None,
                splits: Optional[Iterable[str]] = None) -> seqio.TfdsDataSource:
  """A prepared TFDS dataset, e.g. "coco_captions:1.0.0"; nothing is downloaded.

  TFDS datasets use their own feature names, so a task over this source starts
  with `seqio.preprocessors.rekey` (or a small map for nested features) giving
  the record names of its data kind.
  """
  return seqio.TfdsDataSource(tfds_name=name, tfds_data_dir=tfds_data_dir, splits=splits)


def image_caption_tfexample_source(
    file_pattern: Mapping[str, Union[str, Iterable[str]]],
    num_input_examples: Optional[Mapping[str, int]] = None,
) -> seqio.TFExampleDataSource:
  """TFRecord files of image-caption tf.train.Examples (split -> glob or globs)."""
  return tfexample_source(file_pattern, image_caption_feature_description(),
                          num_input_examples)


# TFDS needs nothing kind-specific; the name is kept for symmetry with the other kinds.
image_caption_tfds_source = tfds_source
