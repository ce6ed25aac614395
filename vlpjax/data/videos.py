"""Embedded video data: shapes that appear, move, change colour and vanish.

A Vid2Seq-style record is a short clip, the timed events in it with a caption
each, and a narrator's speech transcript that tells the same events a little
late, as real narration does. Every clip is a pure function of (split, index),
like `shapes.py`, whose colours and drawing helpers it uses.

Time: a clip has `num_frames` frames (default 16) spread evenly over `duration`
seconds (8, 10, 12, 14 or 16); frame f shows the interval [f, f + 1) * dt with
dt = duration / num_frames. Events change at frame boundaries, so an event
seen first in frame a and last in frame b - 1 is [a * dt, b * dt]. All times
are multiples of 1/8 s, which float32 (the tf.train.Example type) holds exactly.

Record (also the `tf.train.Example` layout; lists are parsed with
`tf.io.RaggedFeature`, so each parses to a 1-D tensor of its own length):

  id            string        "videos/{split}/{index}"
  frames        string [F]    JPEG bytes, one per frame
  duration      float32       seconds
  start, end    float32 [E]   event times, 0 <= start < end <= duration
  caption       string [E]    "a red circle appears on the left", ...
  speech_start, speech_end  float32 [S]   narration segments, same rule
  speech_text   string [S]    "look, a red circle", ...

Events and speech are sorted by start time.
"""
import io
import zlib
from typing import Dict, List, Optional

import numpy as np
from PIL import Image, ImageDraw
import tensorflow as tf

from vlpjax.data import records
from vlpjax.data import shapes

SPLIT_SIZES = {"train": 2_000, "validation": 200}

# Bump when the clips change, so old and new data never share seeds.
_VERSION = 1
_JPEG_QUALITY = 95
_FRAME_SECONDS = (0.5, 0.625, 0.75, 0.875, 1.0)  # dt; multiples of 1/8 s.

# A 3x3 grid of places (fractions of the side). Two-shape clips keep one shape
# in the top row and one in the bottom row, moving sideways only, so shapes
# never overlap and a caption never describes a hidden shape.
_COORDS = {"left": 0.25, "center": 0.5, "right": 0.75}
_ROWS = {"top": 0.27, "middle": 0.5, "bottom": 0.73}
_PHRASES = {
    ("top", "left"): "at the top left", ("top", "center"): "at the top",
    ("top", "right"): "at the top right", ("middle", "left"): "on the left",
    ("middle", "center"): "in the middle", ("middle", "right"): "on the right",
    ("bottom", "left"): "at the bottom left", ("bottom", "center"): "at the bottom",
    ("bottom", "right"): "at the bottom right",
}
_APPEAR_SPEECH = ("look, a {colour} {shape}", "here comes a {colour} {shape}",
                  "a {colour} {shape} shows up")
_MOVE_SPEECH = ("now it goes {where}", "the {shape} is moving {where}",
                "it slides {where}")
_COLOUR_SPEECH = ("and it becomes {colour}", "now the {shape} is {colour}",
                  "it changes to {colour}")
_VANISH_SPEECH = ("and now it is gone", "the {shape} disappears",
                  "bye bye {shape}")


def _rng(split: str, index: int) -> np.random.Generator:
  # crc32, unlike hash(), is the same in every process and Python version.
  split_key = zlib.crc32(split.encode("utf-8"))
  return np.random.default_rng(np.random.SeedSequence([_VERSION, split_key, index]))


def _pick(rng: np.random.Generator, options):
  options = list(options)
  return options[rng.integers(len(options))]


def _plan_shape(rng, shape, rows, num_frames):
  """One shape's life: its per-frame state and its events (in frame units).

  Returns (states, events): states[f] is None (not visible) or
  (row, col_x, row_y, colour); events are (first_frame, end_frame, caption,
  speech) with end_frame exclusive.
  """
  colour = _pick(rng, shapes.COLOURS)
  row = _pick(rng, rows)
  col = _pick(rng, _COORDS)
  appear = int(rng.integers(0, num_frames // 3 + 1))
  x, y = _COORDS[col], _ROWS[row]
  states = [None] * num_frames
  events = [(appear, appear + 1,
             f"a {colour} {shape} appears {_PHRASES[row, col]}",
             _pick(rng, _APPEAR_SPEECH).format(colour=colour, shape=shape))]
  cursor = appear + 1  # First frame not yet planned.
  for f in range(appear, cursor):
    states[f] = (x, y, colour)
  for _ in range(int(rng.integers(1, 4))):
    kind = _pick(rng, ("move", "move", "colour", "vanish"))
    # A shape stays at least two frames before it vanishes, so it is seen.
    start = cursor + int(rng.integers(1 if kind == "vanish" else 0, 3))
    length = int(rng.integers(2, 5)) if kind == "move" else 1
    if start + length > num_frames:
      break
    # Frames until the action hold the current state.
    for f in range(cursor, start):
      states[f] = (x, y, colour)
    if kind == "vanish":
      events.append((start, start + 1, f"the {shape} vanishes",
                     _pick(rng, _VANISH_SPEECH).format(shape=shape)))
      return states, events
    if kind == "colour":
      colour = _pick(rng, [c for c in shapes.COLOURS if c != colour])
      states[start] = (x, y, colour)
      events.append((start, start + 1, f"the {shape} turns {colour}",
                     _pick(rng, _COLOUR_SPEECH).format(shape=shape, colour=colour)))
    else:
      # Two-shape clips move within their row; one-shape clips anywhere.
      new_row = row if len(rows) > 1 else _pick(rng, _ROWS)
      new_col = _pick(rng, [c for c in _COORDS if (new_row, c) != (row, col)])
      nx, ny = _COORDS[new_col], _ROWS[new_row]
      for step in range(length):
        t = (step + 1) / length
        states[start + step] = (x + t * (nx - x), y + t * (ny - y), colour)
      where = _PHRASES[new_row, new_col]
      where = "to the middle" if where == "in the middle" else (
          "to the " + where.split(" the ")[1])
      events.append((start, start + length, f"the {shape} moves {where}",
                     _pick(rng, _MOVE_SPEECH).format(shape=shape, where=where)))
      row, col, x, y = new_row, new_col, nx, ny
    cursor = start + length
  for f in range(cursor, num_frames):
    states[f] = (x, y, colour)
  return states, events


def _speech(rng, events, dt, duration):
  """Narration of most events, starting a little after each and never overlapping."""
  segments, free_from = [], 0.0
  for first, _, _, text in events:
    if rng.uniform() < 0.15:  # Narrators skip some events.
      continue
    start = max(first * dt + 0.125 * int(rng.integers(2, 9)), free_from)
    end = min(start + 0.25 * len(text.split()) + 0.5, duration)
    if end - start < 0.5:
      break
    segments.append((start, end, text))
    free_from = end + 0.125
  return segments


def _draw_frame(rng, size, background, fills, radii, angles, objects):
  image = Image.new("RGB", (size, size), background)
  draw = ImageDraw.Draw(image)
  for shape, (x, y, colour) in objects:
    shapes.draw_shape(draw, shape, x * size, y * size, radii[shape],
                      fills[shape, colour], angles[shape])
  # Per-frame sensor-like noise; channels stay in [10, 247] as in shapes.py.
  noise = rng.integers(-6, 7, size=(size, size, 1), dtype=np.int16)
  image = Image.fromarray((np.asarray(image, np.int16) + noise).astype(np.uint8))
  buffer = io.BytesIO()
  image.save(buffer, format="JPEG", quality=_JPEG_QUALITY)
  return buffer.getvalue()


def generate_example(split: str, index: int, num_frames: int = 16,
                     frame_size: int = 32) -> Dict:
  """Clip `index` of `split` as a record (see the module docstring)."""
  rng = _rng(split, index)
  dt = _pick(rng, _FRAME_SECONDS)
  duration = num_frames * dt
  num_shapes = int(rng.integers(1, 3))
  kinds = [shapes.SHAPES[i] for i in rng.permutation(len(shapes.SHAPES))[:num_shapes]]
  lanes = [("top",), ("bottom",)] if num_shapes == 2 else [tuple(_ROWS)]
  plans = [_plan_shape(rng, k, lanes[i], num_frames) for i, k in enumerate(kinds)]
  background = tuple(int(v) for v in rng.integers(175, 236) + rng.integers(-12, 13, size=3))
  fills = {(k, c): tuple(int(v) for v in np.array(rgb) + rng.integers(-15, 16, size=3))
           for k in kinds for c, rgb in shapes.COLOURS.items()}
  radii = {k: frame_size * rng.uniform(0.13, 0.18) for k in kinds}
  angles = {k: np.deg2rad(rng.uniform(-12, 12)) for k in kinds}
  frames = []
  for f in range(num_frames):
    objects = [(k, plan[0][f]) for k, plan in zip(kinds, plans) if plan[0][f]]
    frames.append(_draw_frame(rng, frame_size, background, fills, radii, angles,
                              objects))
  events = sorted((e for _, plan_events in plans for e in plan_events),
                  key=lambda e: (e[0], e[1], e[2]))
  speech = _speech(rng, events, dt, duration)
  return dict(
      id=f"videos/{split}/{index}", frames=frames, duration=float(duration),
      start=[e[0] * dt for e in events], end=[e[1] * dt for e in events],
      caption=[e[2] for e in events],
      speech_start=[s[0] for s in speech], speech_end=[s[1] for s in speech],
      speech_text=[s[2] for s in speech])


def _record_id(record) -> str:
  value = record.get("id", "")
  return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _check_segments(rid, record, start_key, end_key, text_key, duration):
  starts, ends, texts = (list(record.get(k, [])) for k in (start_key, end_key, text_key))
  if not len(starts) == len(ends) == len(texts):
    raise ValueError(f"video record {rid!r}: {start_key}, {end_key} and {text_key} "
                     f"have lengths {len(starts)}, {len(ends)}, {len(texts)}; "
                     "they must be equal.")
  for i, (s, e) in enumerate(zip(starts, ends)):
    if not 0 <= s < e <= duration:
      raise ValueError(f"video record {rid!r}: segment {i} of {text_key} is "
                       f"[{float(s)}, {float(e)}]; need 0 <= {start_key} < {end_key} "
                       f"<= duration ({duration}).")


def validate_record(record) -> None:
  """Raises ValueError, naming the record id, if the record breaks the schema."""
  rid = _record_id(record)
  if len(record["frames"]) == 0:
    raise ValueError(f"video record {rid!r}: has no frames.")
  duration = float(record["duration"])
  if not duration > 0:
    raise ValueError(f"video record {rid!r}: duration {duration} is not positive.")
  _check_segments(rid, record, "start", "end", "caption", duration)
  _check_segments(rid, record, "speech_start", "speech_end", "speech_text", duration)


def split_size(split: str, num_examples: Optional[int] = None) -> int:
  return records.split_size("videos", SPLIT_SIZES, split, num_examples)


def _records(split: str, num_frames: int, frame_size: int,
             num_examples: int) -> List[Dict]:
  # Built once per process; epochs after the first are cheap.
  return records.generated(generate_example, split, num_examples, num_frames, frame_size)


_LISTS = {"frames": tf.string, "start": tf.float32, "end": tf.float32,
          "caption": tf.string, "speech_start": tf.float32, "speech_end": tf.float32,
          "speech_text": tf.string}


def make_dataset(split: str, num_frames: int = 16, frame_size: int = 32,
                 num_examples: Optional[int] = None) -> tf.data.Dataset:
  """Records with the fields and dtypes of the module docstring."""
  rows = _records(split, num_frames, frame_size, split_size(split, num_examples))
  columns = {k: records.ragged([r[k] for r in rows], dtype) for k, dtype in _LISTS.items()}
  columns["id"] = tf.constant([r["id"] for r in rows])
  columns["duration"] = tf.constant([r["duration"] for r in rows], tf.float32)
  return tf.data.Dataset.from_tensor_slices(columns)


def feature_description() -> Dict[str, object]:
  """How a video tf.train.Example is parsed: lists come back at their own length."""
  description = {k: tf.io.RaggedFeature(dtype) for k, dtype in _LISTS.items()}
  description["id"] = tf.io.FixedLenFeature([], tf.string, default_value="")
  description["duration"] = tf.io.FixedLenFeature([], tf.float32)
  return description


def to_tf_example(record: Dict) -> tf.train.Example:
  features = {k: records.feature(record[k], dtype) for k, dtype in _LISTS.items()}
  features["id"] = records.bytes_feature([record["id"]])
  features["duration"] = records.float_feature([record["duration"]])
  return tf.train.Example(features=tf.train.Features(feature=features))


def write_tfrecords(split: str, path: str, num_frames: int = 16, frame_size: int = 32,
                    num_examples: Optional[int] = None, num_shards: int = 1) -> List[str]:
  """Writes the split as tf.train.Examples; file naming as in `shapes.write_tfrecords`."""
  return records.write_tfrecords(
      _records(split, num_frames, frame_size, split_size(split, num_examples)), path,
      to_tf_example, num_shards)
