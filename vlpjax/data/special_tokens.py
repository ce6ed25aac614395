"""Structure tokens: image placeholders, time bins, layout bins and sentinels.

Pure Python (no seqio, no TensorFlow), so models, decoders and data generators
can share the token names, the id layout and the number <-> bin conversions
without loading a vocabulary. `vlpjax.data.vocab.MultimodalVocabulary` appends
these tokens to a SentencePiece model.

Token names (`TokenSpec.tokens()` lists them in id order):
  * images:    `<image>` when there is one placeholder, else `<image_0>` ...
  * time:      `<time_0>` ... `<time_{N-1}>`, Vid2Seq-style bins relative to
               the video's duration (default N = 100)
  * layout:    `<loc_0>` ... `<loc_{K-1}>`, UDOP-style bins over the image's
               width or height (default K = 500); a box is four of them,
               x0 y0 x1 y1
  * sentinels: `<extra_id_0>` ... as in T5, so span-corruption code that
               expects `<extra_id_k>` at id `vocab_size - 1 - k` works unchanged

Quantisation maps [0, duration] (or [0, width]) linearly onto bins 0 .. N-1 so
that both ends are representable (0 -> bin 0, duration -> bin N-1). Bins are
rounded to the *nearest* (halves up), so a value survives value -> bin -> value
within half a bin width. Vid2Seq itself floors; `time_to_bin(..., rounding=
"floor")` gives that for compatibility with its checkpoints.

Write the tokens without spaces around them ("<time_3><time_9>a dog runs"): the
vocabulary encodes them atomically either way, but a space before a token costs
one extra "▁" piece.
"""
import dataclasses
import math
import re
from typing import List, Optional, Sequence, Tuple, Union

Number = Union[int, float]

IMAGE = "image"
TIME = "time"
LOC = "loc"
SENTINEL = "extra_id"


@dataclasses.dataclass(frozen=True)
class TokenSpec:
  """How many structure tokens of each kind a vocabulary has."""
  num_image_tokens: int = 1
  num_time_bins: int = 100
  num_loc_bins: int = 500
  num_sentinels: int = 100

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{field.name} must be an int >= 0, got {value!r}")
    # One bin cannot hold both ends of the range (see the module docstring).
    for name in ("num_time_bins", "num_loc_bins"):
      if getattr(self, name) == 1:
        raise ValueError(f"{name} must be 0 or >= 2, got 1")

  @property
  def num_tokens(self) -> int:
    return (self.num_image_tokens + self.num_time_bins + self.num_loc_bins +
            self.num_sentinels)

  def tokens(self) -> List[str]:
    """All token strings, in the order their ids follow the base vocabulary."""
    # Sentinels go last and reversed, T5's convention: <extra_id_0> is the last id.
    return ([image_token(k, self.num_image_tokens) for k in range(self.num_image_tokens)] +
            [time_token(k) for k in range(self.num_time_bins)] +
            [loc_token(k) for k in range(self.num_loc_bins)] +
            [sentinel_token(k) for k in reversed(range(self.num_sentinels))])


def image_token(k: int = 0, num_image_tokens: int = 1) -> str:
  if not 0 <= k < num_image_tokens:
    raise ValueError(f"image token index {k} outside [0, {num_image_tokens})")
  return "<image>" if num_image_tokens == 1 else f"<image_{k}>"


def time_token(k: int) -> str:
  return f"<time_{int(k)}>"


def loc_token(k: int) -> str:
  return f"<loc_{int(k)}>"


def sentinel_token(k: int) -> str:
  return f"<extra_id_{int(k)}>"


# --------------------------------------------------------------------------------
# Ids: where each kind sits after the base vocabulary
# --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SpecialIds:
  """The id layout of a vocabulary of `base_size` pieces extended by `spec`.

  The `is_*` tests work elementwise on Python ints, numpy / JAX arrays and TF
  tensors alike, so models and decoders can work on ids without strings.
  """
  base_size: int
  spec: TokenSpec

  @property
  def image_start(self) -> int:
    return self.base_size

  @property
  def time_start(self) -> int:
    return self.image_start + self.spec.num_image_tokens

  @property
  def loc_start(self) -> int:
    return self.time_start + self.spec.num_time_bins

  @property
  def sentinel_start(self) -> int:
    return self.loc_start + self.spec.num_loc_bins

  @property
  def vocab_size(self) -> int:
    return self.sentinel_start + self.spec.num_sentinels

  def image_id(self, k: int = 0) -> int:
    return self.image_start + _check_index("image token", k, self.spec.num_image_tokens)

  def time_id(self, k: int) -> int:
    return self.time_start + _check_index("time bin", k, self.spec.num_time_bins)

  def loc_id(self, k: int) -> int:
    return self.loc_start + _check_index("loc bin", k, self.spec.num_loc_bins)

  def sentinel_id(self, k: int) -> int:
    # T5's layout: <extra_id_0> is the last id of the vocabulary.
    return self.vocab_size - 1 - _check_index("sentinel", k, self.spec.num_sentinels)

  def is_image_id(self, ids):
    return (ids >= self.image_start) & (ids < self.time_start)

  def is_time_id(self, ids):
    return (ids >= self.time_start) & (ids < self.loc_start)

  def is_loc_id(self, ids):
    return (ids >= self.loc_start) & (ids < self.sentinel_start)

  def is_sentinel_id(self, ids):
    return (ids >= self.sentinel_start) & (ids < self.vocab_size)

  def is_special_id(self, ids):
    return (ids >= self.base_size) & (ids < self.vocab_size)

  def time_bin(self, ids):
    """Time bin of time ids (elementwise; meaningless where not `is_time_id`)."""
    if isinstance(ids, int) and not self.is_time_id(ids):
      raise ValueError(f"id {ids} is not a time token id "
                       f"[{self.time_start}, {self.loc_start})")
    return ids - self.time_start

  def loc_bin(self, ids):
    """Layout bin of loc ids (elementwise; meaningless where not `is_loc_id`)."""
    if isinstance(ids, int) and not self.is_loc_id(ids):
      raise ValueError(f"id {ids} is not a loc token id "
                       f"[{self.loc_start}, {self.sentinel_start})")
    return ids - self.loc_start


def _check_index(what: str, k: int, count: int) -> int:
  if not 0 <= k < count:
    raise ValueError(f"{what} {k} outside [0, {count})")
  return int(k)


# --------------------------------------------------------------------------------
# Time
# --------------------------------------------------------------------------------


def _quantise(fraction: float, num_bins: int, rounding: str) -> int:
  scaled = fraction * (num_bins - 1)
  if rounding == "nearest":
    k = math.floor(scaled + 0.5)  # Not round(): banker's rounding is surprising here.
  elif rounding == "floor":
    k = math.floor(scaled)
  else:
    raise ValueError(f"rounding must be 'nearest' or 'floor', got {rounding!r}")
  return min(max(k, 0), num_bins - 1)  # Guards float error only; range is checked first.


def _check_bins(name: str, num_bins: int):
  if not isinstance(num_bins, int) or num_bins < 2:
    raise ValueError(f"{name} must be an int >= 2, got {num_bins!r}")


def time_to_bin(t: Number, duration: Number, num_bins: int = 100, *,
                clip: bool = False, rounding: str = "nearest") -> int:
  """Bin of time `t` (seconds) in a video of `duration` seconds.

  Args:
    t: time in [0, duration]; outside (or NaN) raises ValueError naming it,
      unless `clip` (annotations often end a little after the video does).
    duration: length of the video, > 0.
    num_bins: N; 0 -> bin 0 and duration -> bin N-1.
    clip: clamp out-of-range times into [0, duration] instead of raising.
    rounding: "nearest" (default, error <= half a bin) or "floor" (Vid2Seq).
  """
  _check_bins("num_bins", num_bins)
  if not (math.isfinite(duration) and duration > 0):
    raise ValueError(f"duration must be finite and > 0, got {duration!r}")
  if math.isnan(t):
    raise ValueError(f"timestamp {t!r} is NaN")
  if not 0 <= t <= duration:
    if not clip:
      raise ValueError(f"timestamp {t!r} is outside [0, duration={duration!r}]")
    t = min(max(t, 0), duration)
  return _quantise(t / duration, num_bins, rounding)


def time_to_token(t: Number, duration: Number, num_bins: int = 100, **kwargs) -> str:
  """`<time_k>` for time `t`; arguments as for `time_to_bin`."""
  return time_token(time_to_bin(t, duration, num_bins, **kwargs))


def token_to_time(k: Union[int, str], duration: Number = 1.0, num_bins: int = 100) -> float:
  """The time a bin (or a `<time_k>` token) stands for: k / (N-1) * duration."""
  _check_bins("num_bins", num_bins)
  if isinstance(k, str):
    k = _parse_one(TIME, k)
  _check_index("time bin", k, num_bins)
  return k / (num_bins - 1) * duration


# --------------------------------------------------------------------------------
# Boxes
# --------------------------------------------------------------------------------


def _box_scale(width: Optional[Number], height: Optional[Number]) -> Tuple[float, float]:
  if (width is None) != (height is None):
    raise ValueError(f"give both width and height (pixel box) or neither (normalised "
                     f"box), got width={width!r}, height={height!r}")
  if width is None:
    return 1.0, 1.0
  for name, value in (("width", width), ("height", height)):
    if not (math.isfinite(value) and value > 0):
      raise ValueError(f"{name} must be finite and > 0, got {value!r}")
  return float(width), float(height)


def box_to_loc_bins(box: Sequence[Number], width: Optional[Number] = None,
                    height: Optional[Number] = None, num_bins: int = 500, *,
                    clip: bool = False) -> Tuple[int, int, int, int]:
  """Bins (x0, y0, x1, y1) of a box.

  Args:
    box: x0, y0, x1, y1, either in pixels of a `width` x `height` image
      (coordinates in [0, width] and [0, height]) or, without width/height,
      normalised to [0, 1]. x1 < x0, y1 < y0, NaN or out-of-range coordinates
      raise ValueError naming the box.
    width, height: image size in pixels; both or neither.
    num_bins: K; coordinate 0 -> bin 0, the far edge -> bin K-1, nearest bin.
    clip: clamp out-of-range coordinates into the image instead of raising.
  """
  _check_bins("num_bins", num_bins)
  sx, sy = _box_scale(width, height)
  box = tuple(box)
  if len(box) != 4:
    raise ValueError(f"box {box!r} must have 4 coordinates x0, y0, x1, y1")
  if any(math.isnan(c) for c in box):
    raise ValueError(f"box {box!r} has a NaN coordinate")
  x0, y0, x1, y1 = box
  if x1 < x0 or y1 < y0:
    raise ValueError(f"box {box!r} has x1 < x0 or y1 < y0")
  limits = (sx, sy, sx, sy)
  if not clip:
    for c, limit in zip(box, limits):
      if not 0 <= c <= limit:
        raise ValueError(f"box {box!r}: coordinate {c!r} is outside [0, {limit!r}]")
  return tuple(_quantise(min(max(c, 0.0), limit) / limit, num_bins, "nearest")
               for c, limit in zip(box, limits))


def box_to_loc_tokens(box: Sequence[Number], width: Optional[Number] = None,
                      height: Optional[Number] = None, num_bins: int = 500,
                      **kwargs) -> str:
  """"<loc_a><loc_b><loc_c><loc_d>" for a box; arguments as for `box_to_loc_bins`."""
  return "".join(loc_token(k) for k in box_to_loc_bins(box, width, height, num_bins,
                                                       **kwargs))


def loc_tokens_to_box(tokens: Union[str, Sequence[int]], width: Optional[Number] = None,
                      height: Optional[Number] = None,
                      num_bins: int = 500) -> Tuple[float, float, float, float]:
  """The box (x0, y0, x1, y1) that four loc tokens (a string) or bins stand for.

  In pixels when `width` and `height` are given, else normalised to [0, 1].
  """
  _check_bins("num_bins", num_bins)
  sx, sy = _box_scale(width, height)
  if isinstance(tokens, str):
    found = _SPECIAL_RE.findall(tokens)
    rest = _SPECIAL_RE.sub("", tokens)
    if rest.strip() or len(found) != 4 or any(kind != LOC for kind, _ in found):
      raise ValueError(f"expected exactly four <loc_k> tokens, got {tokens!r}")
    bins = [_parse_one(LOC, f"<loc_{index}>") for _, index in found]
  else:
    bins = list(tokens)
    if len(bins) != 4:
      raise ValueError(f"expected four loc bins, got {tokens!r}")
  for k in bins:
    _check_index("loc bin", k, num_bins)
  scale = (sx, sy, sx, sy)
  return tuple(k / (num_bins - 1) * s for k, s in zip(bins, scale))


# --------------------------------------------------------------------------------
# Parsing decoded text
# --------------------------------------------------------------------------------

_SPECIAL_RE = re.compile(r"<(image|time|loc|extra_id)(?:_(\d+))?>")


def _parse_one(kind: str, token: str) -> int:
  match = _SPECIAL_RE.fullmatch(token)
  if not match or match.group(1) != kind or match.group(2) is None:
    raise ValueError(f"{token!r} is not a <{kind}_k> token")
  return int(match.group(2))


@dataclasses.dataclass(frozen=True)
class Image:
  index: int


@dataclasses.dataclass(frozen=True)
class Time:
  bin: int
  value: float  # In the units of `duration` (its fraction when duration=1).


@dataclasses.dataclass(frozen=True)
class Box:
  bins: Tuple[int, int, int, int]
  coords: Tuple[float, float, float, float]  # Pixels, or normalised without width/height.


@dataclasses.dataclass(frozen=True)
class Loc:
  """A loc token that is not part of a complete box (a malformed output)."""
  bin: int


@dataclasses.dataclass(frozen=True)
class Sentinel:
  index: int


Segment = Union[str, Image, Time, Box, Loc, Sentinel]


def _token_segment(kind: str, index: Optional[str], spec: TokenSpec, duration: Number):
  """The segment for one matched token, or None if `spec` has no such token."""
  if kind == IMAGE:
    if spec.num_image_tokens == 1 and index is None:
      return Image(0)
    if spec.num_image_tokens > 1 and index is not None:
      k = int(index)
      return Image(k) if k < spec.num_image_tokens and index == str(k) else None
    return None
  # A token with leading zeros ("<time_07>") is not in the vocabulary: plain text.
  if index is None or index != str(int(index)):
    return None
  k = int(index)
  if kind == TIME and k < spec.num_time_bins:
    return Time(k, token_to_time(k, duration, spec.num_time_bins))
  if kind == LOC and k < spec.num_loc_bins:
    return Loc(k)
  if kind == SENTINEL and k < spec.num_sentinels:
    return Sentinel(k)
  return None


def parse_special(text: str, spec: TokenSpec = TokenSpec(), *, duration: Number = 1.0,
                  width: Optional[Number] = None,
                  height: Optional[Number] = None) -> List[Segment]:
  """Splits decoded text into plain text (str), Image, Time, Box, Loc and Sentinel.

  Four loc tokens in a row (whitespace between them is dropped) make a Box;
  loc tokens left over are Loc segments, so malformed model outputs still
  parse. Times are in the units of `duration`, boxes in pixels when `width`
  and `height` are given. Token-like strings that `spec` does not have (e.g.
  `<time_150>` with 100 bins) stay plain text, as the vocabulary treats them.
  """
  raw: List[Segment] = []
  position = 0
  for match in _SPECIAL_RE.finditer(text):
    segment = _token_segment(match.group(1), match.group(2), spec, duration)
    if segment is None:
      continue
    if match.start() > position:
      raw.append(text[position:match.start()])
    raw.append(segment)
    position = match.end()
  if position < len(text):
    raw.append(text[position:])
  return _group_boxes(_merge_text(raw), spec, width, height)


def _merge_text(segments: List[Segment]) -> List[Segment]:
  merged: List[Segment] = []
  for s in segments:
    if isinstance(s, str) and merged and isinstance(merged[-1], str):
      merged[-1] += s
    else:
      merged.append(s)
  return merged


def _group_boxes(segments: List[Segment], spec: TokenSpec, width, height) -> List[Segment]:
  out: List[Segment] = []
  i = 0
  while i < len(segments):
    run, j = [], i  # The loc tokens from i on, skipping whitespace-only text.
    while j < len(segments):
      s = segments[j]
      if isinstance(s, Loc):
        run.append(j)
      elif not (isinstance(s, str) and not s.strip() and j + 1 < len(segments) and
                isinstance(segments[j + 1], Loc) and run):
        break
      j += 1
    if len(run) < 4:
      out.append(segments[i])
      i += 1
      continue
    bins = tuple(segments[k].bin for k in run[:4])
    out.append(Box(bins, loc_tokens_to_box(bins, width, height, spec.num_loc_bins)))
    i = run[3] + 1
  return out
