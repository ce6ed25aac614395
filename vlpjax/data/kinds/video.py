"""The video-timestamp (Vid2Seq-style) data kind: sources, checks, frames.

The record (`vlpjax.data.videos` writes it; a user's TFRecords use the same
`tf.train.Example` layout, parsed by `feature_description`):

  id            string        named in every problem report; default ""
  frames        string [n]    encoded frames (JPEG/PNG best), in time order
    or
  frame_features float32 [n * D]  precomputed per-frame features (e.g. CLIP, as
                Vid2Seq trains on), stored flat; `normalize_records(...,
                frame_feature_dim=D)` makes them [n, D], and `frames` is not read
  duration      float32       seconds, > 0
  start, end    float32 [E]   event times, 0 <= start < end <= duration
  caption       string [E]    one non-empty caption per event
  speech_start, speech_end  float32 [S]   narration (ASR) segments, same rule
  speech_text   string [S]

Every field may be missing from a record: lists then count as empty, and a
missing duration or frame list is reported as the record's problem.

A task starts with two preprocessors, in this order:
  `normalize_records`  every field present, 1-D (frame features [n, D]),
                       `duration` a scalar (NaN and a problem when missing)
  `check_records`      the schema rules above, in TF; a broken rule sets the
                       `problem` feature (`vlpjax.data.bad_records`), e.g.
                       "time out of range: event 2 end 12.5 > duration 10"
`check_record` applies the same rules to a Python record, with the same text.

Time model: the n frames are spread evenly over the clip, frame f standing for
[f, f + 1) * duration / n.

`sample_frames` turns the record's frames into fixed-shape features:
  frames       uint8 [F, S, S, 3]  (or `frame_features` float32 [F, D])
  frame_times  float32 [F]         seconds: the centre of each picked frame's
                                   interval, (index + 0.5) * duration / n
  frame_mask   bool [F]            False on padding
  images       uint8 [0, S, S, 3]  empty; `video_targets.frames_as_images`
                                   moves the real frames here
Frame i of F is the middle frame of the i-th of F equal parts of the clip:
index = floor((i + 0.5) * n / F). With n >= F these indices are distinct and
every slot is real. A clip with n < F frames follows `short_clip`:
  "pad"     (default) frames 0 .. n-1, then F - n zero frames with mask False
            and time 0; the temporal encoder sees true frame spacing.
  "repeat"  the same formula, which repeats frames (nearest-frame
            upsampling); every slot is real and the mask is all True.
A clip without frames has an all-False mask either way (and a problem). A frame
that does not decode becomes a black frame and the problem "corrupt frame:
frame 3 of 16: <decoder message>".

The targets (dense captioning, transcript span denoising) and `parse_events`
are in `video_targets`.
"""
import math
from typing import Dict, Iterable, List, Mapping, Optional, Tuple, Union

import numpy as np
import seqio
import tensorflow as tf

from vlpjax.data import bad_records
from vlpjax.data import sources
from vlpjax.data import preprocessors

Features = Dict[str, tf.Tensor]
SHORT_CLIP_RULES = ("pad", "repeat")
# (start key, end key, text key, what the problem reports call one segment).
SEGMENT_KEYS = (("start", "end", "caption", "event"),
                ("speech_start", "speech_end", "speech_text", "speech segment"))
_LISTS = {"start": tf.float32, "end": tf.float32, "caption": tf.string,
          "speech_start": tf.float32, "speech_end": tf.float32, "speech_text": tf.string}

# --------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------


def feature_description(frame_feature_dim: Optional[int] = None) -> Dict[str, object]:
  """How a video tf.train.Example is parsed: every list at its own length.

  `duration` is parsed as a list too, so a record without one parses (to an
  empty list) and `normalize_records` reports it instead of the parser failing.
  Frame features stay flat here; `normalize_records` reshapes them.
  """
  description = {k: tf.io.RaggedFeature(dtype) for k, dtype in _LISTS.items()}
  if frame_feature_dim is None:
    description["frames"] = tf.io.RaggedFeature(tf.string)
  else:
    description["frame_features"] = tf.io.RaggedFeature(tf.float32)
  description["id"] = tf.io.FixedLenFeature([], tf.string, default_value="")
  description["duration"] = tf.io.RaggedFeature(tf.float32)
  return description


def tfexample_source(file_pattern: Mapping[str, Union[str, Iterable[str]]],
                     num_input_examples: Optional[Mapping[str, int]] = None,
                     frame_feature_dim: Optional[int] = None) -> seqio.TFExampleDataSource:
  """TFRecords of video tf.train.Examples (split -> glob or list of globs)."""
  return sources.tfexample_source(file_pattern, feature_description(frame_feature_dim),
                                  num_input_examples)


# Nothing kind-specific: rekey the dataset's features to the record names above first.
tfds_source = sources.tfds_source


# --------------------------------------------------------------------------------
# Normalising: every field present and 1-D
# --------------------------------------------------------------------------------


def dense(x) -> tf.Tensor:
  """A parsed list (Tensor, RaggedTensor with uniform rows, SparseTensor) as a Tensor."""
  if isinstance(x, tf.RaggedTensor):
    return x.to_tensor()
  if isinstance(x, tf.SparseTensor):
    return tf.sparse.to_dense(x)
  return tf.convert_to_tensor(x)


def _flat(features: Features, key: str, dtype: tf.DType) -> tf.Tensor:
  if key not in features:
    return tf.zeros([0], dtype)
  return tf.reshape(tf.cast(dense(features[key]), dtype), [-1])


def _frame_features(features: Features, dim: Optional[int]) -> Tuple[tf.Tensor, tf.Tensor]:
  """([n, D] features, problem): flat lists are cut into rows of `dim`."""
  if "frame_features" not in features:
    return tf.zeros([0, dim or 0], tf.float32), tf.constant("")
  values = tf.cast(dense(features["frame_features"]), tf.float32)
  if values.shape.rank == 2 and (dim is None or values.shape[-1] == dim):
    return values, tf.constant("")
  if dim is None:
    raise ValueError("flat frame_features need normalize_records(frame_feature_dim=D)")
  values = tf.reshape(values, [-1])
  size = tf.size(values)
  problem = tf.where(size % dim == 0, "", tf.strings.format(
      "bad frame_features: {} values are not a multiple of D={}", (size, dim)))
  # Whole rows only, so the shapes stay valid for the rest of the task.
  return tf.reshape(values[:size // dim * dim], [-1, dim]), problem


def normalize_records(ds: tf.data.Dataset,
                      frame_feature_dim: Optional[int] = None) -> tf.data.Dataset:
  """Gives every record every field, 1-D, and a scalar `duration`.

  Missing lists become empty lists (a missing frame list then fails "no frames"
  in `check_records`); a missing duration becomes NaN with the problem
  "missing duration". Works on parsed tf.Examples and in-memory records alike.
  """

  def fn(features):
    out = dict(features)
    for key, dtype in _LISTS.items():
      out[key] = _flat(features, key, dtype)
    problem = tf.constant("")
    if "frame_features" in features or frame_feature_dim is not None:
      out["frame_features"], problem = _frame_features(features, frame_feature_dim)
      out.pop("frames", None)
    else:
      out["frames"] = _flat(features, "frames", tf.string)
    out["id"] = tf.reshape(tf.cast(features.get("id", ""), tf.string), [])
    duration = _flat(features, "duration", tf.float32)
    count = tf.size(duration)
    out["duration"] = tf.concat([duration, [math.nan]], axis=0)[0]
    duration_problem = bad_records.first_problem([
        (count > 0, "missing duration"),
        (count < 2, tf.strings.format("bad duration: {} values, need 1", count))])
    out = bad_records.add_problem(out, duration_problem)
    return bad_records.add_problem(out, problem)

  return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


# --------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------


def _g(x) -> tf.Tensor:
  """A number as text: ints plainly, floats as "%g" (what `check_record` writes)."""
  x = tf.convert_to_tensor(x)
  return tf.strings.as_string(x, shortest=x.dtype.is_floating)


def _join(*parts) -> tf.Tensor:
  """Concatenates Python strings and scalar tensors (numbers as "%g") into one string.

  (`tf.strings.format` would quote string tensors.)
  """
  return tf.strings.join([p if isinstance(p, str) or p.dtype == tf.string else _g(p)
                          for p in parts])


def _first(bad: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor]:
  """(no element is bad, index of the first bad one or 0)."""
  padded = tf.concat([tf.cast(bad, tf.int32), [1]], axis=0)  # argmax of [] fails.
  return ~tf.reduce_any(bad), tf.cast(tf.argmax(padded), tf.int32)


def _time_check(times: tf.Tensor, key: str, what: str, duration: tf.Tensor):
  """(ok, reason) for 0 <= t <= duration over a list of times."""
  ok, i = _first(~((times >= 0) & (times <= duration)))
  t = tf.concat([times, [0.0]], axis=0)[i]
  detail = tf.where(t < 0, " < 0", tf.where(t > duration,
                                            " > duration " + _g(duration), ""))
  return ok, _join(f"time out of range: {what} ", i, f" {key} ", t, detail)


def _segment_checks(features: Features, start_key: str, end_key: str, text_key: str,
                    what: str, duration: tf.Tensor) -> List[Tuple[tf.Tensor, tf.Tensor]]:
  starts, ends, texts = features[start_key], features[end_key], features[text_key]
  sizes = [tf.size(starts), tf.size(ends), tf.size(texts)]
  same = tf.equal(sizes[0], sizes[1]) & tf.equal(sizes[0], sizes[2])
  checks = [(same, tf.strings.format(
      f"length mismatch: {start_key}, {end_key}, {text_key} have {{}}, {{}}, {{}} values",
      sizes))]
  # Elementwise rules over the common length, so mismatched lists cannot fail in TF
  # (the length check above comes first and wins).
  n = tf.reduce_min(sizes)
  starts, ends, texts = starts[:n], ends[:n], texts[:n]
  checks.append(_time_check(starts, start_key, what, duration))
  checks.append(_time_check(ends, end_key, what, duration))
  ok, i = _first(~(starts < ends))
  s, e = (tf.concat([x, [0.0]], axis=0)[i] for x in (starts, ends))
  checks.append((ok, _join(f"end not after start: {what} ", i, f" {start_key} ", s,
                           f" {end_key} ", e)))
  ok, i = _first(tf.equal(tf.strings.length(tf.strings.strip(texts)), 0))
  checks.append((ok, _join(f"empty {text_key}: {what} ", i)))
  return checks


def _frame_count(features: Features) -> tf.Tensor:
  key = "frame_features" if "frame_features" in features else "frames"
  return tf.shape(features[key])[0]


def record_checks(features: Features) -> List[Tuple[tf.Tensor, tf.Tensor]]:
  """The schema rules as (ok, reason) pairs, in reporting order (normalized records)."""
  duration = features["duration"]
  checks = [(_frame_count(features) > 0, tf.constant("no frames")),
            (tf.math.is_finite(duration) & (duration > 0),
             _join("bad duration: ", duration, " (need finite and > 0)"))]
  for start_key, end_key, text_key, what in SEGMENT_KEYS:
    checks += _segment_checks(features, start_key, end_key, text_key, what, duration)
  return checks


def check_records(ds: tf.data.Dataset) -> tf.data.Dataset:
  """Sets `problem` to the first broken schema rule (after `normalize_records`).

  Never raises: a bad record keeps valid shapes, and the input pipeline's
  bad-record policy later stops the run or skips and counts it.
  """
  return bad_records.check(ds, record_checks)


def _text(value) -> str:
  if isinstance(value, np.ndarray):
    value = value.item() if value.size == 1 else value.tolist()
  return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _python_time_problem(times, key, what, duration) -> str:
  for i, t in enumerate(times):
    if not 0 <= t <= duration:
      detail = " < 0" if t < 0 else (f" > duration {duration:g}" if t > duration else "")
      return f"time out of range: {what} {i} {key} {t:g}{detail}"
  return ""


def check_record(record: Mapping[str, object], num_frames: Optional[int] = None) -> str:
  """The problem `check_records` would report for a Python record ("" when fine).

  A second implementation of the same rules and texts, for tests and for
  checking records before writing them. `num_frames` overrides the count of
  `frames` / `frame_features`. Times are compared as float32, as TF stores them.
  """
  if num_frames is None:
    num_frames = len(record.get("frames", record.get("frame_features", [])))
  duration = np.asarray(record.get("duration", []), np.float32).reshape(-1)
  if duration.size == 0:
    return "missing duration"
  if duration.size > 1:
    return f"bad duration: {duration.size} values, need 1"
  if num_frames == 0:
    return "no frames"
  duration = float(duration[0])
  if not (math.isfinite(duration) and duration > 0):
    return f"bad duration: {duration:g} (need finite and > 0)"
  for start_key, end_key, text_key, what in SEGMENT_KEYS:
    starts, ends = ([float(t) for t in np.asarray(record.get(k, []), np.float32).reshape(-1)]
                    for k in (start_key, end_key))
    texts = [_text(t) for t in record.get(text_key, [])]
    if not len(starts) == len(ends) == len(texts):
      return (f"length mismatch: {start_key}, {end_key}, {text_key} have "
              f"{len(starts)}, {len(ends)}, {len(texts)} values")
    problem = (_python_time_problem(starts, start_key, what, duration) or
               _python_time_problem(ends, end_key, what, duration))
    if problem:
      return problem
    for i, (s, e) in enumerate(zip(starts, ends)):
      if not s < e:
        return f"end not after start: {what} {i} {start_key} {s:g} {end_key} {e:g}"
    for i, text in enumerate(texts):
      if not text.strip():
        return f"empty {text_key}: {what} {i}"
  return ""


# --------------------------------------------------------------------------------
# Frames
# --------------------------------------------------------------------------------


def frame_indices(n: tf.Tensor, num_frames: int, short_clip: str = "pad"):
  """(index int32 [F], mask bool [F]) of the frames to take (module docstring)."""
  if short_clip not in SHORT_CLIP_RULES:
    raise ValueError(f"short_clip must be one of {SHORT_CLIP_RULES}, got {short_clip!r}")
  n = tf.cast(n, tf.int32)
  i = tf.range(num_frames, dtype=tf.int32)
  uniform = ((2 * i + 1) * n) // (2 * num_frames)  # Exact integer floor((i + .5) n / F).
  if short_clip == "repeat":
    return uniform, tf.fill([num_frames], n > 0)
  enough = n >= num_frames
  index = tf.where(enough, uniform, tf.minimum(i, tf.maximum(n - 1, 0)))
  return index, enough | (i < n)


def _decode_frame(data: tf.Tensor, size: int) -> Tuple[tf.Tensor, tf.Tensor]:
  """(uint8 [S, S, 3], problem): a frame that does not decode is a black frame."""
  image, problem = preprocessors.decode_image_bytes(data)
  # pylint: disable=protected-access
  image = preprocessors._resize(image, (size, size), "bilinear", True)
  return tf.ensure_shape(image, [size, size, 3]), problem


def _frame_problem(problems: tf.Tensor, index: tf.Tensor, n: tf.Tensor) -> tf.Tensor:
  """The first frame's decoding problem, as "corrupt frame: frame i of n: why"."""
  bad = tf.not_equal(problems, "")
  ok, k = _first(bad)
  detail = tf.strings.regex_replace(tf.concat([problems, [""]], axis=0)[k],
                                    "^corrupt image: ", "")
  index = tf.concat([index, [0]], axis=0)[k]
  return tf.where(ok, "", _join("corrupt frame: frame ", index, " of ", n, ": ", detail))


def sample_frames(ds: tf.data.Dataset, num_frames: int = 8, image_size: int = 32,
                  short_clip: str = "pad") -> tf.data.Dataset:
  """Encoded `frames` (or `frame_features`) -> F sampled frames, times and mask.

  Runs after `normalize_records`. Also sets `images` to uint8 [0, S, S, 3], the
  prefix-LM contract's images, which `video_targets.frames_as_images` fills.
  """
  frame_indices(tf.constant(1), num_frames, short_clip)  # Checks `short_clip` now.

  def fn(features):
    use_features = "frame_features" in features
    source = features["frame_features" if use_features else "frames"]
    n = tf.shape(source)[0]
    index, mask = frame_indices(n, num_frames, short_clip)
    duration = features["duration"]
    times = (tf.cast(index, tf.float32) + 0.5) * duration / tf.cast(n, tf.float32)
    out = {**features, "frame_times": tf.where(mask & tf.math.is_finite(times), times, 0.0),
           "frame_mask": mask,
           "images": tf.zeros([0, image_size, image_size, 3], tf.uint8)}
    # One extra element, so a clip without frames gathers padding, not out of range.
    extra = (tf.zeros([1, tf.shape(source)[1]], source.dtype) if use_features
             else tf.constant([""]))
    picked = tf.gather(tf.concat([source, extra], axis=0), index)
    if use_features:
      out["frame_features"] = tf.where(mask[:, None], picked, tf.zeros_like(picked))
      return out
    # A loop, not F unrolled decoders: clips may have 100 frames (as in Vid2Seq).
    # Padding slots decode nothing.
    frames, problems = tf.map_fn(
        lambda slot: tf.cond(slot[1], lambda: _decode_frame(slot[0], image_size),
                             lambda: (tf.zeros([image_size, image_size, 3], tf.uint8),
                                      tf.constant(""))),
        (picked, mask), fn_output_signature=(
            tf.TensorSpec([image_size, image_size, 3], tf.uint8),
            tf.TensorSpec([], tf.string)))
    out["frames"] = tf.ensure_shape(frames, [num_frames, image_size, image_size, 3])
    return bad_records.add_problem(out, _frame_problem(problems, index, n))

  return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)
