"""Look at what a task or mixture feeds the model: decoded examples and a PNG contact sheet.

  python -m tools.inspect_data --mixture stories_interleaved -n 8 --out /tmp/look
  python -m tools.inspect_data --mixture my_captions --module my_tasks -n 16 --out /tmp/look

Examples are drawn as training draws them (mixture rates, per-task shuffles with `--seed`), after
the task's preprocessors and before any pp op. Token features are decoded with the task's
vocabulary, special tokens shown as written (`<time_12>`, `<loc_250>`, `<extra_id_0>`), with
runs of `<image>` shortened to `<image>x64`. The contact sheet (`DIR/contact_sheet.png`) has one
cell per example: its images (or video frames), the text, word boxes drawn on document pages
(blue: the input's layout, red: boxes in the targets), and for videos a timeline with the events
of the targets. Bad records are skipped and counted, never fatal: the point is to look.
"""
import argparse
import importlib
import os
import re
import sys
import textwrap
from typing import Dict, List, Optional, Sequence, Tuple

import ml_collections
import numpy as np
from PIL import Image, ImageDraw, ImageFont

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

CELL_WIDTH = 384
THUMB = 96           # Pixels per image in a cell.
CHAR_WIDTH = 6       # PIL's built-in bitmap font.
LINE_HEIGHT = 11
_IMAGE_RUN = re.compile(r"(<image(?:_\d+)?>)(?:\s*\1)+")


def readable(text: str) -> str:
  """Collapses runs of one image token into `<image>xN`."""
  return _IMAGE_RUN.sub(lambda m: f"{m.group(1)}x{m.group(0).count(m.group(1))}", text)


def draw_examples(mixture: str, split: str, n: int, seed: int) -> List[Tuple[str, Dict]]:
  """n (task name, numpy example) pairs drawn at the mixture's rates."""
  from vlpjax.data import bad_records  # pylint: disable=g-import-not-at-top
  from vlpjax.data import mixing  # pylint: disable=g-import-not-at-top
  from vlpjax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(dict(split=split, shuffle_buffer=256, bad_records="skip"))
  skipped = bad_records.SkipCounter()
  members = mixing.members(mixture, pipeline.get_provider)

  def examples(task: str, task_seed: int):
    ds = pipeline.task_dataset(config, task, shuffle=True, seed=task_seed, num_epochs=None,
                               process_index=0, process_count=1, skipped=skipped)
    return ds.as_numpy_iterator()

  stream = mixing.MixedStream(members, examples, seed)
  drawn = [next(stream) for _ in range(n)]
  if skipped.total:
    print(f"(skipped bad records while drawing: {skipped.counts})")
  return drawn


def decoded_texts(task_name: str, example: Dict) -> Dict[str, str]:
  """Token features decoded with their vocabularies; string features as they are."""
  import seqio  # pylint: disable=g-import-not-at-top
  features = seqio.get_mixture_or_task(task_name).output_features
  out = {}
  for key, value in example.items():
    value = np.asarray(value)
    feature = features.get(key)
    if (feature is not None and getattr(feature, "vocabulary", None) is not None
        and value.ndim == 1 and np.issubdtype(value.dtype, np.integer)):
      out[key] = readable(feature.vocabulary.decode([int(t) for t in value]))
    elif value.dtype.kind in "SO" and value.ndim == 0:
      out[key] = value.item().decode("utf-8", "replace")
  return out


def _uint8(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype == np.uint8:
    return image
  if image.min() < 0:  # value_range(-1, 1)
    image = (image + 1) * 127.5
  return np.clip(image, 0, 255).astype(np.uint8)


def images_of(example: Dict) -> List[np.ndarray]:
  """The example's pictures: `image`, `images` or `frames`, as uint8 [H, W, 3]."""
  for key in ("frames", "images"):
    if key in example and np.asarray(example[key]).ndim == 4:
      mask = example.get("frame_mask") if key == "frames" else example.get("image_mask")
      stack = np.asarray(example[key])
      keep = range(len(stack)) if mask is None else np.flatnonzero(mask)
      return [_uint8(stack[i]) for i in keep]
  if "image" in example and np.asarray(example["image"]).ndim == 3:
    return [_uint8(example["image"])]
  return []


def _boxes(vocabulary, text: str) -> List[Tuple[float, float, float, float]]:
  """Normalised boxes written as loc tokens in `text`."""
  from vlpjax.data import special_tokens  # pylint: disable=g-import-not-at-top
  spec = getattr(vocabulary, "spec", None)
  if spec is None:
    return []
  return [s.coords for s in special_tokens.parse_special(text, spec)
          if isinstance(s, special_tokens.Box)]


def _events(vocabulary, text: str, duration: float) -> List[Tuple[float, float, str]]:
  """(start, end, caption) of the `<time_s><time_e> caption` runs in `text`."""
  from vlpjax.data.kinds import video_targets  # pylint: disable=g-import-not-at-top
  spec = getattr(vocabulary, "spec", None)
  if spec is None:
    return []
  return video_targets.parse_events(text, duration, vocabulary, num_bins=spec.num_time_bins)


def _draw_boxes(picture: Image.Image, boxes, colour) -> None:
  draw = ImageDraw.Draw(picture)
  w, h = picture.size
  for x0, y0, x1, y1 in boxes:
    if x1 > x0 and y1 > y0:
      draw.rectangle([x0 * w, y0 * h, x1 * w - 1, y1 * h - 1], outline=colour)


def _timeline(events, duration: float, width: int) -> Image.Image:
  rows = max(len(events), 1)
  strip = Image.new("RGB", (width, 6 + rows * LINE_HEIGHT), "white")
  draw = ImageDraw.Draw(strip)
  draw.line([0, 2, width - 1, 2], fill="black")
  for row, (start, end, caption) in enumerate(events):
    y = 4 + row * LINE_HEIGHT
    x0, x1 = (int(width * t / max(duration, 1e-9)) for t in (start, end))
    draw.rectangle([x0, y, max(x1, x0 + 1), y + LINE_HEIGHT - 3], fill=(255, 200, 120))
    draw.text((x0 + 2, y - 1), f"{start:.1f}-{end:.1f}s {caption}"[:width // CHAR_WIDTH],
              fill="black")
  return strip


def render_cell(task_name: str, example: Dict, texts: Dict[str, str]) -> Image.Image:
  """One example: pictures (with boxes), an event timeline for videos, then its text."""
  import seqio  # pylint: disable=g-import-not-at-top
  features = seqio.get_mixture_or_task(task_name).output_features
  # The token vocabulary (seqio sorts features, and continuous ones have a pass-through one).
  vocabulary = features["targets"].vocabulary if "targets" in features else None
  pictures = [Image.fromarray(p).resize((THUMB, THUMB), Image.NEAREST)
              for p in images_of(example)[:(CELL_WIDTH // THUMB) * 2]]
  if "input_boxes" in example and pictures:  # A document page: its words' layout.
    boxes = {tuple(b) for b in np.asarray(example["input_boxes"]).tolist() if any(b)}
    _draw_boxes(pictures[0], sorted(boxes), (40, 90, 255))
  if pictures and "targets" in texts:
    _draw_boxes(pictures[0], _boxes(vocabulary, texts["targets"]), (230, 30, 30))
  parts = []
  per_row = CELL_WIDTH // THUMB
  for row in range(0, len(pictures), per_row):
    strip = Image.new("RGB", (CELL_WIDTH, THUMB), "white")
    for i, picture in enumerate(pictures[row:row + per_row]):
      strip.paste(picture, (i * THUMB, 0))
    parts.append(strip)
  if "duration" in example and "targets" in texts:
    duration = float(np.asarray(example["duration"]))
    parts.append(_timeline(_events(vocabulary, texts["targets"], duration), duration,
                           CELL_WIDTH))
  lines = [f"[{task_name}]"]
  for key, text in texts.items():
    lines += textwrap.wrap(f"{key}: {text}", CELL_WIDTH // CHAR_WIDTH)[:6]
  caption = Image.new("RGB", (CELL_WIDTH, 4 + LINE_HEIGHT * len(lines)), "white")
  ImageDraw.Draw(caption).multiline_text((2, 2), "\n".join(lines), fill="black",
                                         font=ImageFont.load_default(), spacing=0)
  parts.append(caption)
  cell = Image.new("RGB", (CELL_WIDTH, sum(p.height for p in parts) + 4), "white")
  y = 0
  for part in parts:
    cell.paste(part, (0, y))
    y += part.height
  return cell


def contact_sheet(cells: Sequence[Image.Image], columns: int = 2) -> Image.Image:
  rows = [cells[i:i + columns] for i in range(0, len(cells), columns)]
  heights = [max(c.height for c in row) for row in rows]
  sheet = Image.new("RGB", (columns * (CELL_WIDTH + 8), sum(heights) + 8 * len(rows)), "gray")
  y = 0
  for row, height in zip(rows, heights):
    for i, cell in enumerate(row):
      sheet.paste(cell, (i * (CELL_WIDTH + 8), y))
    y += height + 8
  return sheet


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m tools.inspect_data", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--mixture", required=True, help="seqio task or mixture name")
  parser.add_argument("-n", type=int, default=8, help="examples to show")
  parser.add_argument("--out", help="directory for contact_sheet.png (none: print only)")
  parser.add_argument("--split", default="train")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--module", action="append", default=[],
                      help="module registering the task (repeatable); data_mixtures always")
  args = parser.parse_args(argv)
  for name in ["data_mixtures"] + args.module:
    importlib.import_module(name)
  drawn = draw_examples(args.mixture, args.split, args.n, args.seed)
  cells = []
  for i, (task, example) in enumerate(drawn):
    texts = decoded_texts(task, example)
    print(f"--- example {i} [{task}]")
    for key, text in texts.items():
      print(f"  {key}: {text}")
    shapes = {k: tuple(np.shape(v)) for k, v in example.items() if np.ndim(v) >= 1}
    print(f"  shapes: {shapes}")
    cells.append(render_cell(task, example, texts))
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "contact_sheet.png")
    contact_sheet(cells).save(path)
    print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
