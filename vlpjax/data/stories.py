"""Embedded interleaved image-text data: short stories about one shape.

An OBELICS-style document is a sequence of positions, each holding either a
text or an image. Here a story has 2 to 5 steps; each step changes one thing
about a shape (colour, place, size or kind) and is told by a sentence and shown
by an image:

  "first there is a red circle." [image] "then it turns blue." [image] ...

Every story is a pure function of (split, index), like `shapes.py`, whose
renderer draws the images, so a model that learns the shapes data can read the
stories too.

Record (also the `tf.train.Example` layout; lists are parsed with
`tf.io.RaggedFeature`, as captions are in `sources.py`, so each parses to a
1-D tensor of the record's own length):

  id            string           "stories/{split}/{index}"
  texts         string [n]       the text of a text position, "" at images
  images        string [n]       JPEG bytes at an image position, b"" at texts
  image_labels  int64  [n]       `shapes.CLASS_NAMES` index at images, -1 at texts

Exactly one of `texts[i]` and `images[i]` is non-empty (`validate_record`).
"""
import io
import zlib
from typing import Dict, List, Optional, Sequence

import numpy as np
import tensorflow as tf

from vlpjax.data import records
from vlpjax.data import shapes

SPLIT_SIZES = {"train": 5_000, "validation": 500}
NO_LABEL = -1

# Bump when the stories change, so old and new data never share seeds.
_VERSION = 1
_JPEG_QUALITY = 95
_MIN_STEPS, _MAX_STEPS = 2, 5

_OPENINGS = ("first there is a {desc}.", "here is a {desc}.",
             "once upon a time there was a {desc}.", "we start with a {desc}.")
_THENS = ("then", "next", "after that", "now")
_PLACES = {"left": "to the left", "right": "to the right", "top": "to the top",
           "bottom": "to the bottom", "center": "to the middle"}
_CHANGES = ("colour", "position", "size", "shape")


def _rng(split: str, index: int) -> np.random.Generator:
  # crc32, unlike hash(), is the same in every process and Python version.
  split_key = zlib.crc32(split.encode("utf-8"))
  return np.random.default_rng(np.random.SeedSequence([_VERSION, split_key, index]))


def _other(rng: np.random.Generator, options: Sequence[str], current: str) -> str:
  choices = [o for o in options if o != current]
  return choices[rng.integers(len(choices))]


def _change(rng: np.random.Generator, state: Dict[str, str]) -> str:
  """Changes one attribute of `state` in place; returns the sentence telling it."""
  kind = _CHANGES[rng.integers(len(_CHANGES))]
  then = _THENS[rng.integers(len(_THENS))]
  if kind == "colour":
    state["colour"] = _other(rng, tuple(shapes.COLOURS), state["colour"])
    verb = ("turns", "becomes")[rng.integers(2)]
    return f"{then} it {verb} {state['colour']}."
  if kind == "position":
    state["position"] = _other(rng, shapes.POSITIONS, state["position"])
    verb = ("moves", "goes")[rng.integers(2)]
    return f"{then} it {verb} {_PLACES[state['position']]}."
  if kind == "size":
    state["size"] = _other(rng, shapes.SIZES, state["size"])
    return f"{then} it {'grows' if state['size'] == 'large' else 'shrinks'}."
  state["shape"] = _other(rng, shapes.SHAPES, state["shape"])
  return f"{then} it changes into a {state['shape']}."


def _encode(image) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format="JPEG", quality=_JPEG_QUALITY)
  return buffer.getvalue()


def generate_example(split: str, index: int, image_size: int = 64) -> Dict:
  """Story `index` of `split` as a record (see the module docstring)."""
  rng = _rng(split, index)
  state = dict(shape=shapes.SHAPES[rng.integers(len(shapes.SHAPES))],
               colour=tuple(shapes.COLOURS)[rng.integers(len(shapes.COLOURS))],
               size=shapes.SIZES[rng.integers(len(shapes.SIZES))],
               position=shapes.POSITIONS[rng.integers(len(shapes.POSITIONS))])
  num_steps = int(rng.integers(_MIN_STEPS, _MAX_STEPS + 1))
  # Interleaving varies as in web documents: a sentence may introduce its image
  # or caption it.
  text_first = bool(rng.integers(2))
  # Every image of a story re-seeds the renderer with the same scene seed, so
  # background, jitter and noise stay put and only the told change is visible.
  scene_seed = int(rng.integers(2**32))
  texts, images, labels = [], [], []
  for step in range(num_steps):
    if step == 0:
      desc = f"{state['colour']} {state['shape']}"
      if rng.integers(2):
        desc = f"{state['size']} {desc}"
      text = _OPENINGS[rng.integers(len(_OPENINGS))].format(desc=desc)
    else:
      text = _change(rng, state)
    image = _encode(shapes.render_shape(
        np.random.default_rng(scene_seed), image_size, state["shape"],
        state["colour"], state["size"], state["position"]))
    label = shapes.CLASS_NAMES.index(f"{state['colour']} {state['shape']}")
    order = [(text, b"", NO_LABEL), ("", image, label)]
    for t, im, lab in (order if text_first else order[::-1]):
      texts.append(t)
      images.append(im)
      labels.append(lab)
  if rng.integers(4) == 0:
    texts.append("the end.")
    images.append(b"")
    labels.append(NO_LABEL)
  return dict(id=f"stories/{split}/{index}", texts=texts, images=images,
              image_labels=labels)


def _is_empty(value) -> bool:
  return value is None or len(value) == 0


def _record_id(record) -> str:
  value = record.get("id", "")
  return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def validate_record(record) -> None:
  """Raises ValueError, naming the record id, if the record breaks the schema."""
  rid = _record_id(record)
  texts, images = list(record["texts"]), list(record["images"])
  labels = list(record.get("image_labels", [NO_LABEL if _is_empty(i) else 0
                                            for i in images]))
  if not len(texts) == len(images) == len(labels):
    raise ValueError(f"story record {rid!r}: texts, images and image_labels have "
                     f"lengths {len(texts)}, {len(images)}, {len(labels)}; "
                     "they must be equal.")
  if not texts:
    raise ValueError(f"story record {rid!r}: has no positions.")
  for i, (text, image, label) in enumerate(zip(texts, images, labels)):
    if _is_empty(text) == _is_empty(image):
      what = "neither text nor image" if _is_empty(text) else "both text and image"
      raise ValueError(f"story record {rid!r}: position {i} has {what}; "
                       "exactly one must be non-empty.")
    if _is_empty(image) and int(label) != NO_LABEL:
      raise ValueError(f"story record {rid!r}: text position {i} has image label "
                       f"{int(label)}; it must be {NO_LABEL}.")


def split_size(split: str, num_examples: Optional[int] = None) -> int:
  return records.split_size("stories", SPLIT_SIZES, split, num_examples)


def _records(split: str, image_size: int, num_examples: int) -> List[Dict]:
  # Built once per process; epochs after the first are cheap.
  return records.generated(generate_example, split, num_examples, image_size)


def make_dataset(split: str, image_size: int = 64,
                 num_examples: Optional[int] = None) -> tf.data.Dataset:
  """Records {id: string, texts/images: string [n], image_labels: int64 [n]}."""
  rows = _records(split, image_size, split_size(split, num_examples))
  return tf.data.Dataset.from_tensor_slices(dict(
      id=tf.constant([r["id"] for r in rows]),
      texts=records.ragged([r["texts"] for r in rows], tf.string),
      images=records.ragged([r["images"] for r in rows], tf.string),
      image_labels=records.ragged([r["image_labels"] for r in rows], tf.int64)))


def feature_description() -> Dict[str, object]:
  """How a story tf.train.Example is parsed: lists come back at their own length."""
  return {
      "id": tf.io.FixedLenFeature([], tf.string, default_value=""),
      "texts": tf.io.RaggedFeature(tf.string),
      "images": tf.io.RaggedFeature(tf.string),
      "image_labels": tf.io.RaggedFeature(tf.int64),
  }


def to_tf_example(record: Dict) -> tf.train.Example:
  return tf.train.Example(features=tf.train.Features(feature={
      "id": records.bytes_feature([record["id"]]),
      "texts": records.bytes_feature(record["texts"]),
      "images": records.bytes_feature(record["images"]),
      "image_labels": records.int64_feature(record["image_labels"]),
  }))


def write_tfrecords(split: str, path: str, image_size: int = 64,
                    num_examples: Optional[int] = None, num_shards: int = 1) -> List[str]:
  """Writes the split as tf.train.Examples; file naming as in `shapes.write_tfrecords`."""
  return records.write_tfrecords(
      _records(split, image_size, split_size(split, num_examples)), path,
      to_tf_example, num_shards)
