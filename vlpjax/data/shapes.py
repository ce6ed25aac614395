"""Embedded image-caption data: one coloured shape on a plain background.

Every example is a pure function of (split, index), so any process can build any
split without files or network, and a resumed run sees the same pixels. The data
is easy on purpose: a tiny SigLIP learns it in CPU-minutes, which makes it the
walking skeleton's proof that the whole path (data -> model -> loss) learns.
"""
import functools
import io
import zlib
from typing import Dict, List, Optional

import numpy as np
from PIL import Image, ImageDraw
import tensorflow as tf

from vlpjax.data import records

# Shapes and colours were picked to stay distinguishable at 32 px after JPEG:
# a cross has no diagonal edges and a triangle no vertical ones. Channels stay
# in [25, 230] so jitter (+-15) and noise (+-6) never leave 0..255.
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (230, 200, 25),
    "purple": (140, 40, 170),
}
CLASS_NAMES = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")

# Prompts a zero-shot evaluator may wrap a class name in; captions use the same
# phrasing, so "a red triangle" is in-distribution for the text tower.
CLASS_PROMPT_TEMPLATES = ("a {}", "a picture of a {}", "{}")

SPLIT_SIZES = {"train": 20_000, "validation": 1_000}

# Bump when the rendering changes, so old and new data never share seeds.
_VERSION = 1
_JPEG_QUALITY = 95

# Shape centre as a fraction of the image side.
_CENTRES = {"left": (0.3, 0.5), "right": (0.7, 0.5), "top": (0.5, 0.3),
            "bottom": (0.5, 0.7), "center": (0.5, 0.5)}
# Shape diameter as a fraction of the image side.
_DIAMETERS = {"small": (0.22, 0.3), "large": (0.42, 0.5)}
_POSITION_PHRASES = {
    "left": ("on the left", "at the left"),
    "right": ("on the right", "at the right"),
    "top": ("at the top",),
    "bottom": ("at the bottom",),
    "center": ("in the center", "in the middle"),
}
# Real captions mention some attributes and drop others; the templates do too.
_TEMPLATES = (
    "a {size} {colour} {shape} {position}",
    "a {colour} {shape} {position}",
    "a {size} {colour} {shape}",
    "a {colour} {shape}",
    "{colour} {shape}",
    "a picture of a {colour} {shape}",
    "there is a {size} {colour} {shape} {position}",
    "{size} {colour} {shape} {position}",
)


def _rng(split: str, index: int) -> np.random.Generator:
  # crc32, unlike hash(), is the same in every process and Python version.
  split_key = zlib.crc32(split.encode("utf-8"))
  return np.random.default_rng(np.random.SeedSequence([_VERSION, split_key, index]))


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float):
  """Vertices of a polygonal shape of radius `r` around (cx, cy)."""
  if shape == "square":
    pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    pts = [(x * 0.8, y * 0.8) for x, y in pts]  # Same area feel as the circle.
  elif shape == "triangle":
    pts = [(0, -1), (0.95, 0.7), (-0.95, 0.7)]
  elif shape == "cross":
    a, b = 1.0, 0.33
    pts = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a),
           (-b, a), (-b, b), (-a, b), (-a, -b), (-b, -b)]
  else:
    raise ValueError(f"not a polygon shape: {shape!r}")
  c, s = np.cos(angle), np.sin(angle)
  return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in pts]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float,
               r: float, fill, angle: float = 0.0) -> None:
  """Draws `shape` of radius `r` around (cx, cy); `angle` (radians) turns polygons."""
  if shape == "circle":
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
  else:
    draw.polygon(_polygon(shape, cx, cy, r, angle), fill=fill)


def render_shape(rng: np.random.Generator, image_size: int, shape: str,
                 colour: str, size: str, position: str) -> Image.Image:
  """One shape on a noisy background; every random choice comes from `rng`."""
  background = rng.integers(175, 236) + rng.integers(-12, 13, size=3)
  image = Image.new("RGB", (image_size, image_size), tuple(int(v) for v in background))
  draw = ImageDraw.Draw(image)
  r = image_size * rng.uniform(*_DIAMETERS[size]) / 2
  fx, fy = _CENTRES[position]
  cx = np.clip(image_size * (fx + rng.uniform(-0.05, 0.05)), r, image_size - r)
  cy = np.clip(image_size * (fy + rng.uniform(-0.05, 0.05)), r, image_size - r)
  fill = tuple(int(v) for v in np.array(COLOURS[colour]) + rng.integers(-15, 16, size=3))
  # Circles draw no angle, so `rng` advances exactly as it always has.
  angle = 0.0 if shape == "circle" else np.deg2rad(rng.uniform(-12, 12))
  draw_shape(draw, shape, cx, cy, r, fill, angle)
  # Mild sensor-like noise so the background is not one exact value.
  # No clipping needed: background and fill channels are within [10, 247].
  noise = rng.integers(-6, 7, size=(image_size, image_size, 1), dtype=np.int16)
  return Image.fromarray((np.asarray(image, np.int16) + noise).astype(np.uint8))


def _caption(rng: np.random.Generator, shape: str, colour: str, size: str,
             position: str) -> str:
  template = _TEMPLATES[rng.integers(len(_TEMPLATES))]
  phrases = _POSITION_PHRASES[position]
  return template.format(size=size, colour=colour, shape=shape,
                         position=phrases[rng.integers(len(phrases))])


def generate_example(split: str, index: int, image_size: int = 64) -> Dict:
  """The example `index` of `split`: id, JPEG bytes, caption and class label."""
  rng = _rng(split, index)
  label = int(rng.integers(len(CLASS_NAMES)))
  colour, shape = CLASS_NAMES[label].split(" ")
  size = SIZES[rng.integers(len(SIZES))]
  position = POSITIONS[rng.integers(len(POSITIONS))]
  caption = _caption(rng, shape, colour, size, position)
  image = render_shape(rng, image_size, shape, colour, size, position)
  buffer = io.BytesIO()
  image.save(buffer, format="JPEG", quality=_JPEG_QUALITY)
  return dict(id=f"shapes/{split}/{index}", image=buffer.getvalue(),
              caption=caption, label=label)


def generate_captions(split: str, num_examples: int) -> List[str]:
  """Only the captions of the first `num_examples` (cheap: nothing is drawn)."""
  captions = []
  for index in range(num_examples):
    rng = _rng(split, index)
    label = int(rng.integers(len(CLASS_NAMES)))
    colour, shape = CLASS_NAMES[label].split(" ")
    size = SIZES[rng.integers(len(SIZES))]
    position = POSITIONS[rng.integers(len(POSITIONS))]
    captions.append(_caption(rng, shape, colour, size, position))
  return captions


def split_size(split: str, num_examples: Optional[int] = None) -> int:
  return records.split_size("shapes", SPLIT_SIZES, split, num_examples)


@functools.lru_cache(maxsize=8)
def _columns(split: str, image_size: int, num_examples: int):
  # Rendered once per process: the train split takes a few seconds, after which
  # every epoch is a cheap slice of these arrays.
  examples = [generate_example(split, i, image_size) for i in range(num_examples)]
  return dict(
      id=np.array([e["id"] for e in examples], dtype=object),
      image=np.array([e["image"] for e in examples], dtype=object),
      caption=np.array([e["caption"] for e in examples], dtype=object),
      label=np.array([e["label"] for e in examples], dtype=np.int64))


def make_dataset(split: str, image_size: int = 64,
                 num_examples: Optional[int] = None) -> tf.data.Dataset:
  """Records {id, image (JPEG bytes), caption: tf.string, label: tf.int64}."""
  columns = _columns(split, image_size, split_size(split, num_examples))
  return tf.data.Dataset.from_tensor_slices(
      {k: tf.constant(v) for k, v in columns.items()})


def _bytes_feature(values):
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))


def write_tfrecords(split: str, path: str, image_size: int = 64,
                    num_examples: Optional[int] = None, num_shards: int = 1) -> List[str]:
  """Writes the split as tf.train.Examples (the schema of docs/data.md).

  One shard is written to `path` itself; several to
  `{path}-{shard:05d}-of-{num_shards:05d}`, examples going round-robin over them.
  Returns the file names.
  """
  columns = _columns(split, image_size, split_size(split, num_examples))
  names = ([path] if num_shards == 1 else
           [f"{path}-{i:05d}-of-{num_shards:05d}" for i in range(num_shards)])
  writers = [tf.io.TFRecordWriter(name) for name in names]
  try:
    for i in range(len(columns["id"])):
      example = tf.train.Example(features=tf.train.Features(feature={
          "id": _bytes_feature([columns["id"][i].encode("utf-8")]),
          "image": _bytes_feature([columns["image"][i]]),
          "caption": _bytes_feature([columns["caption"][i].encode("utf-8")]),
          "label": tf.train.Feature(
              int64_list=tf.train.Int64List(value=[int(columns["label"][i])])),
      }))
      writers[i % num_shards].write(example.SerializeToString())
  finally:
    for writer in writers:
      writer.close()
  return names
