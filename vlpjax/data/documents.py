"""Embedded document data: small rendered pages with words, boxes and a question.

A UDOP-style record is a page image, its OCR (words with boxes) and, for
document question answering, a question with its answer. The pages here look
like tiny forms: a title, fields such as "total 42" or "date 12/03/24", a few
loose words and sometimes a coloured shape from `shapes.py`. Every page is a
pure function of (split, index), so the OCR is exact by construction: each box
is PIL's `textbbox` of the word as drawn.

Text uses PIL's built-in bitmap font (6 px a character, 11 px a line): it is
legible at 128 px and, unlike a FreeType font, draws the same pixels with every
Pillow build. Pages are PNG, not JPEG, so glyph edges stay crisp.

Record (also the `tf.train.Example` layout; lists are parsed with
`tf.io.RaggedFeature`, so each parses to a 1-D tensor of its own length):

  id        string          "documents/{split}/{index}"
  image     string          PNG bytes, `height` x `width` RGB, white background
  width, height  int64      page size in pixels
  words     string [N]      in reading order (top to bottom, left to right)
  boxes     float32 [4 * N] flat; word i is boxes[4i:4i+4] = (x0, y0, x1, y1) in
                            pixels, half-open like PIL: columns x0 .. x1 - 1
  question  string          e.g. "what is the total?"
  answer    string          e.g. "42"

Flat boxes keep the Example a plain FloatList; `tf.reshape(boxes, [-1, 4])`
gives one row per word.
"""
import functools
import io
import zlib
from typing import Dict, List, Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFont
import tensorflow as tf

from vlpjax.data import records
from vlpjax.data import shapes

SPLIT_SIZES = {"train": 5_000, "validation": 500}
BACKGROUND = (255, 255, 255)

# Bump when the pages change, so old and new data never share seeds.
_VERSION = 1
_MARGIN = 6
_LINE_PITCH = 14  # The bitmap font's boxes are 11 px high; 3 px apart at least.

_TITLES = ("invoice", "receipt", "order", "form", "report")
_NAMES = ("ann", "bob", "kim", "lee", "max", "eva", "sam", "zoe")
_LOOSE = tuple(shapes.COLOURS) + shapes.SHAPES + ("paid", "page", "thank", "you",
                                                  "note", "signed")
# Field label -> how its value is drawn.
_FIELDS = {
    "name": lambda rng: _NAMES[rng.integers(len(_NAMES))],
    "date": lambda rng: (f"{rng.integers(1, 29):02d}/{rng.integers(1, 13):02d}/"
                         f"{rng.integers(0, 100):02d}"),
    "total": lambda rng: str(rng.integers(1, 1000)),
    "qty": lambda rng: str(rng.integers(1, 21)),
    "item": lambda rng: shapes.SHAPES[rng.integers(len(shapes.SHAPES))],
    # No "colour" field: it would blur "what colour is the shape?".
    "no.": lambda rng: str(rng.integers(100, 10000)),
}


@functools.lru_cache(maxsize=1)
def _font():
  # `load_default()` became a FreeType font in Pillow 10.1; ask for the bitmap
  # one explicitly where that exists so the pixels do not depend on FreeType.
  if hasattr(ImageFont, "load_default_imagefont"):
    return ImageFont.load_default_imagefont()
  return ImageFont.load_default()


def _rng(split: str, index: int) -> np.random.Generator:
  # crc32, unlike hash(), is the same in every process and Python version.
  split_key = zlib.crc32(split.encode("utf-8"))
  return np.random.default_rng(np.random.SeedSequence([_VERSION, split_key, index]))


def _units(rng: np.random.Generator):
  """Groups of words that share a line: a title, label-value fields, loose words."""
  units = []
  if rng.uniform() < 0.7:
    units.append([_TITLES[rng.integers(len(_TITLES))]])
  labels = list(_FIELDS)
  for i in rng.permutation(len(labels))[:rng.integers(2, 5)]:
    units.append([labels[i], _FIELDS[labels[i]](rng)])
  for _ in range(rng.integers(0, 3)):
    units.append([_LOOSE[rng.integers(len(_LOOSE))]])
  return units


def _overlaps(a, b) -> bool:
  return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _questions(words, shape):
  """All (question, answer) pairs the page can answer."""
  pairs = [("what is the first word on the page?", words[0])]
  for i, word in enumerate(words[:-1]):
    if word in ("total", "date", "name", "qty"):
      pairs.append((f"what is the {word}?", words[i + 1]))
  if shape is not None:
    pairs.append(("what colour is the shape?", shape[0]))
    pairs.append(("what shape is on the page?", shape[1]))
  return pairs


def generate_example(split: str, index: int, page_size: int = 128) -> Dict:
  """Page `index` of `split` as a record (see the module docstring)."""
  if page_size < 96:
    # The widest line ("date 12/03/24") is 84 px plus margins.
    raise ValueError(f"page_size must be at least 96 pixels; got {page_size}.")
  rng = _rng(split, index)
  font = _font()
  image = Image.new("RGB", (page_size, page_size), BACKGROUND)
  draw = ImageDraw.Draw(image)
  ink = tuple(int(v) for v in rng.integers(0, 70, size=3))
  num_lines = (page_size - 2 * _MARGIN) // _LINE_PITCH
  units = _units(rng)[:num_lines]
  lines = sorted(rng.permutation(num_lines)[:len(units)])
  placed = []  # (line, x0, word, box)
  for line, unit in zip(lines, units):
    y = _MARGIN + line * _LINE_PITCH + int(rng.integers(0, 3))
    gaps = [int(rng.integers(6, 13)) for _ in unit[1:]]
    width = sum(int(draw.textlength(w, font=font)) for w in unit) + sum(gaps)
    x = int(rng.integers(_MARGIN, max(_MARGIN, page_size - _MARGIN - width) + 1))
    for i, word in enumerate(unit):
      box = draw.textbbox((x, y), word, font=font)
      draw.text((x, y), word, fill=ink, font=font)
      placed.append((line, x, word, box))
      x = box[2] + (gaps[i] if i < len(gaps) else 0)
  placed.sort(key=lambda p: (p[0], p[1]))  # Reading order.
  words = [p[2] for p in placed]
  boxes = [p[3] for p in placed]
  # The shape goes where no word is; a crowded page simply has none.
  shape = None
  if rng.uniform() < 0.6:
    for _ in range(20):
      r = float(rng.uniform(7, 13))
      # Triangles reach 1.2 r from the centre; keep 2 px clear of words too.
      reach = 1.2 * r + 2
      cx, cy = rng.uniform(reach, page_size - reach, size=2)
      if not any(_overlaps((cx - reach, cy - reach, cx + reach, cy + reach), b)
                 for b in boxes):
        colour = tuple(shapes.COLOURS)[rng.integers(len(shapes.COLOURS))]
        kind = shapes.SHAPES[rng.integers(len(shapes.SHAPES))]
        fill = tuple(int(v) for v in np.array(shapes.COLOURS[colour])
                     + rng.integers(-15, 16, size=3))
        shapes.draw_shape(draw, kind, cx, cy, r, fill,
                          np.deg2rad(rng.uniform(-12, 12)))
        shape = (colour, kind)
        break
  pairs = _questions(words, shape)
  question, answer = pairs[rng.integers(len(pairs))]
  buffer = io.BytesIO()
  image.save(buffer, format="PNG")
  return dict(id=f"documents/{split}/{index}", image=buffer.getvalue(),
              width=page_size, height=page_size, words=words,
              boxes=[float(v) for box in boxes for v in box],
              question=question, answer=answer)


def _record_id(record) -> str:
  value = record.get("id", "")
  return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def validate_record(record) -> None:
  """Raises ValueError, naming the record id, if the record breaks the schema."""
  rid = _record_id(record)
  words, boxes = list(record["words"]), [float(v) for v in record["boxes"]]
  width, height = int(record["width"]), int(record["height"])
  if width <= 0 or height <= 0:
    raise ValueError(f"document record {rid!r}: page size {width}x{height} is empty.")
  if len(boxes) != 4 * len(words):
    raise ValueError(f"document record {rid!r}: {len(words)} words need "
                     f"{4 * len(words)} box values (x0, y0, x1, y1 each); "
                     f"got {len(boxes)}.")
  for i in range(len(words)):
    x0, y0, x1, y1 = boxes[4 * i:4 * i + 4]
    if x1 < x0 or y1 < y0:
      raise ValueError(f"document record {rid!r}: box {i} {(x0, y0, x1, y1)} has "
                       "x1 < x0 or y1 < y0.")
    if not (0 <= x0 and 0 <= y0 and x1 <= width and y1 <= height):
      raise ValueError(f"document record {rid!r}: box {i} {(x0, y0, x1, y1)} is "
                       f"outside the {width}x{height} page.")
  if (len(record.get("question", "")) == 0) != (len(record.get("answer", "")) == 0):
    raise ValueError(f"document record {rid!r}: a question needs an answer and "
                     "an answer a question.")


def split_size(split: str, num_examples: Optional[int] = None) -> int:
  return records.split_size("documents", SPLIT_SIZES, split, num_examples)


def _records(split: str, page_size: int, num_examples: int) -> List[Dict]:
  # Built once per process; epochs after the first are cheap.
  return records.generated(generate_example, split, num_examples, page_size)


_SCALARS = {"id": tf.string, "image": tf.string, "width": tf.int64,
            "height": tf.int64, "question": tf.string, "answer": tf.string}
_LISTS = {"words": tf.string, "boxes": tf.float32}


def make_dataset(split: str, page_size: int = 128,
                 num_examples: Optional[int] = None) -> tf.data.Dataset:
  """Records with the fields and dtypes of the module docstring."""
  rows = _records(split, page_size, split_size(split, num_examples))
  columns = {k: tf.constant([r[k] for r in rows], dtype)
             for k, dtype in _SCALARS.items()}
  columns.update({k: records.ragged([r[k] for r in rows], dtype)
                  for k, dtype in _LISTS.items()})
  return tf.data.Dataset.from_tensor_slices(columns)


def feature_description() -> Dict[str, object]:
  """How a document tf.train.Example is parsed: lists come back at their own length."""
  return {
      "id": tf.io.FixedLenFeature([], tf.string, default_value=""),
      "image": tf.io.FixedLenFeature([], tf.string),
      "width": tf.io.FixedLenFeature([], tf.int64),
      "height": tf.io.FixedLenFeature([], tf.int64),
      "words": tf.io.RaggedFeature(tf.string),
      "boxes": tf.io.RaggedFeature(tf.float32),
      "question": tf.io.FixedLenFeature([], tf.string, default_value=""),
      "answer": tf.io.FixedLenFeature([], tf.string, default_value=""),
  }


def to_tf_example(record: Dict) -> tf.train.Example:
  features = {k: records.feature([record[k]], dtype) for k, dtype in _SCALARS.items()}
  features.update({k: records.feature(record[k], dtype) for k, dtype in _LISTS.items()})
  return tf.train.Example(features=tf.train.Features(feature=features))


def write_tfrecords(split: str, path: str, page_size: int = 128,
                    num_examples: Optional[int] = None, num_shards: int = 1) -> List[str]:
  """Writes the split as tf.train.Examples; file naming as in `shapes.write_tfrecords`."""
  return records.write_tfrecords(
      _records(split, page_size, split_size(split, num_examples)), path,
      to_tf_example, num_shards)
