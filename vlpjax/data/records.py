"""Helpers the embedded generators share: split sizes, record caches, TFRecords.

`stories.py`, `videos.py` and `documents.py` each turn generated records (plain
Python dicts) into an in-memory `tf.data.Dataset` and into `tf.train.Example`
files; the pieces that are the same for every kind live here.
"""
import functools
from typing import Callable, Dict, Iterable, List, Mapping, Optional

import tensorflow as tf


def split_size(kind: str, split_sizes: Mapping[str, int], split: str,
               num_examples: Optional[int] = None) -> int:
  """`num_examples` if given, else the default size of `split` for `kind`."""
  if num_examples is not None:
    return num_examples
  if split not in split_sizes:
    raise ValueError(f"Unknown {kind} split {split!r}; known: {sorted(split_sizes)}.")
  return split_sizes[split]


@functools.lru_cache(maxsize=16)
def generated(generate_example: Callable[..., Dict], split: str, num_examples: int,
              *args) -> List[Dict]:
  """[generate_example(split, i, *args) for i < num_examples], once per process.

  Generating is the slow part (rendering and JPEG encoding), so every epoch and
  every dataset built over the same arguments shares one list. `args` must be
  hashable (sizes, frame counts).
  """
  return [generate_example(split, i, *args) for i in range(num_examples)]


def ragged(rows: Iterable[Iterable], dtype: tf.DType) -> tf.RaggedTensor:
  """[num_records, None] from per-record lists; slices to one 1-D tensor each."""
  rows = [list(row) for row in rows]
  flat = [v for row in rows for v in row]
  return tf.RaggedTensor.from_row_lengths(
      tf.constant(flat, dtype=dtype), [len(row) for row in rows])


def bytes_feature(values: Iterable) -> tf.train.Feature:
  """str values are UTF-8 encoded; bytes are kept as they are."""
  return tf.train.Feature(bytes_list=tf.train.BytesList(
      value=[v.encode("utf-8") if isinstance(v, str) else v for v in values]))


def float_feature(values: Iterable[float]) -> tf.train.Feature:
  return tf.train.Feature(float_list=tf.train.FloatList(value=values))


def int64_feature(values: Iterable[int]) -> tf.train.Feature:
  return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))


def feature(values: Iterable, dtype: tf.DType) -> tf.train.Feature:
  """The list feature for `values` of TF type `dtype` (string, int64 or float32)."""
  if dtype == tf.string:
    return bytes_feature(values)
  if dtype == tf.int64:
    return int64_feature(values)
  return float_feature(values)


def write_tfrecords(records: Iterable[Dict], path: str,
                    to_example: Callable[[Dict], tf.train.Example],
                    num_shards: int = 1) -> List[str]:
  """Writes `to_example(record)` for every record, round robin over the shards.

  One shard is the file `path`; more are `path-00000-of-0000N`, ..., as in
  `shapes.write_tfrecords`. Returns the file names.
  """
  names = ([path] if num_shards == 1 else
           [f"{path}-{i:05d}-of-{num_shards:05d}" for i in range(num_shards)])
  writers = [tf.io.TFRecordWriter(name) for name in names]
  try:
    for i, record in enumerate(records):
      writers[i % num_shards].write(to_example(record).SerializeToString())
  finally:
    for writer in writers:
      writer.close()
  return names
