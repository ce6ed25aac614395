"""Vid2Seq-style inputs and targets of the video kind, and their inverse.

Run after `video.normalize_records`, `video.check_records` and
`video.sample_frames`. All tokens come from a multimodal vocabulary
(`vocab.multimodal_vocabulary()` unless the output features say otherwise):
its `<time_k>` tokens are relative time bins (`special_tokens`: N bins over
[0, duration], nearest bin, so 0 s -> `<time_0>` and the clip's end ->
`<time_{N-1}>`; bin k stands for k / (N - 1) * duration).

Timed segments. Events (and speech segments) are written in order of start
time (then end time), each as `<time_start><time_end>` followed by the
tokens of its text, encoded on its own (so it starts with SentencePiece's
word-start piece, shown as a space below). Bad times are clipped into the
clip (the record then carries a `problem`; see `video.check_records`).

Dense captioning (`dense_caption_targets`). Worked example, N = 100, a 10 s clip:

  events  (5.0, 7.25, "the circle moves to the right"), (2.0, 4.5, "a red circle appears")
  speech  (2.5, 4.0, "look, a red circle")
  bins    2.0 -> 19.8 -> 20, 4.5 -> 44.55 -> 45, 5.0 -> 49.5 -> 50 (halves up),
          7.25 -> 71.775 -> 72, 2.5 -> 24.75 -> 25, 4.0 -> 39.6 -> 40
  targets "<time_20><time_45> a red circle appears<time_50><time_72> the circle
          moves to the right" + EOS
  inputs  speech_input="timed" (default, as Vid2Seq): "<time_25><time_40> look, a red circle"
          speech_input="text":  " look, a red circle"   (texts only, in order)
          speech_input="none":  empty

Transcript span denoising (`span_denoising`), Vid2Seq's objective on narrated
video without event labels: the transcript, timed as above, is corrupted T5
style. About `noise_density` (0.15) of its tokens, in spans of mean length
`mean_noise_span_length` (3), are dropped; the k-th dropped span is replaced
in `inputs` by the sentinel `<extra_id_k>`, and `targets` lists each sentinel
followed by its span, then EOS. With tokens a b c d e f g and spans [b c] and
[f]:

  inputs  a <extra_id_0> d e <extra_id_1> g
  targets <extra_id_0> b c <extra_id_1> f EOS

The span layout is T5's: round(L * density) noise tokens (at least 1, at most
L - 1), round(noise / mean length) spans (at least 1), noise and kept tokens
each split uniformly at random into that many non-empty runs, interleaved
starting with kept tokens. It is drawn from the example's stateless seed, so
the same task seed gives the same corruption. Records whose transcript has
fewer than 2 tokens (silent clips) are dropped: they have nothing to denoise.

Temporal grounding (`grounding_examples`), UniVTG-style moment retrieval:
one example per event of the record (records without events give none), in
record order. inputs = the fixed `prompt` ("query:") then the event's caption,
targets = `<time_start><time_end>` + EOS, id = "{record id}#{event index}".
For the clip above: event 1 gives

  inputs  "query: a red circle appears"       (prompt and caption encoded apart)
  targets "<time_20><time_45>" + EOS          id "<record id>#1"

A record with a problem gives exactly one example (its first event, or an
empty one), so the bad-record policy sees and counts it once.

Frames in the prefix-LM contract (`frames_as_images`, run last): inputs =
one `<image>` per real frame, then the prompt above; `images` = those frames
uint8 [F_real, S, S, 3]; `frame_times` [F_real] their times in seconds and
`image_times` [F_real] the same relative to the clip, frame_times / duration,
in [0, 1] (what packing carries next to the images, for time positions and
grounding heads). `features_as_images` does the same for precomputed frame
features: `images` float32 [F_real, D], one `<image>` per real frame (the task
then declares `images` as float32 rank 2: `output_features(frame_feature_dim=D)`).

`parse_events` reads events back from targets or model output, `parse_moment`
a grounding answer.
"""
import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import seqio
import tensorflow as tf

from vlpjax.data import bad_records
from vlpjax.data import kinds
from vlpjax.data import special_tokens
from vlpjax.data import vocab

Features = Dict[str, tf.Tensor]
SPEECH_INPUTS = ("timed", "text", "none")
Event = Tuple[float, float, str]


def output_features(vocabulary: Optional[seqio.Vocabulary] = None,
                    frame_feature_dim: Optional[int] = None) -> Dict[str, seqio.Feature]:
  """The shared prefix-LM features (`kinds.output_features`), frames among the optional ones.

  With `frame_feature_dim` the `images` are frame feature vectors, float32 [n, D]
  (`features_as_images`); such tasks mix only with each other (same D).
  """
  features = kinds.output_features(vocabulary)
  if frame_feature_dim is not None:
    features["images"] = seqio.ContinuousFeature(dtype=tf.float32, rank=2)
  return features


def _special_ids(vocabulary) -> special_tokens.SpecialIds:
  ids = getattr(vocabulary, "special_ids", None)
  if ids is None:
    raise ValueError(f"video tasks need a vocabulary with structure tokens "
                     f"(vocab.multimodal_vocabulary()), got {vocabulary!r}")
  return ids


def _num_bins(vocabulary, num_bins: Optional[int]) -> int:
  available = _special_ids(vocabulary).spec.num_time_bins
  num_bins = available if num_bins is None else num_bins
  if not 2 <= num_bins <= available:
    raise ValueError(f"num_bins must be in [2, {available}] (the vocabulary's time "
                     f"tokens), got {num_bins}")
  return num_bins


# --------------------------------------------------------------------------------
# Time tokens and timed segments
# --------------------------------------------------------------------------------


def time_bins(times: tf.Tensor, duration: tf.Tensor, num_bins: int) -> tf.Tensor:
  """`special_tokens.time_to_bin(t, duration, num_bins, clip=True)`, elementwise in TF.

  Computed in float64 in the same order as the Python function, so both give
  the same bin for every float32 time. NaN times and bad durations give bins
  that are valid (their record already has a problem).
  """
  t = tf.cast(times, tf.float64)
  d = tf.cast(duration, tf.float64)
  d = tf.where(tf.math.is_finite(d) & (d > 0), d, tf.ones_like(d))
  t = tf.clip_by_value(tf.where(tf.math.is_nan(t), tf.zeros_like(t), t), 0.0, d)
  k = tf.floor(t / d * (num_bins - 1) + 0.5)
  return tf.cast(tf.clip_by_value(k, 0.0, num_bins - 1.0), tf.int32)


def _by_start_then_end(starts: tf.Tensor, ends: tf.Tensor) -> tf.Tensor:
  by_end = tf.argsort(ends, stable=True)
  return tf.gather(by_end, tf.argsort(tf.gather(starts, by_end), stable=True))


def timed_segment_tokens(starts: tf.Tensor, ends: tf.Tensor, texts: tf.Tensor,
                         duration: tf.Tensor, vocabulary, num_bins: int,
                         with_times: bool = True) -> tf.Tensor:
  """int32 [n]: segments by start time, each `<time_s><time_e>` (if `with_times`) + text.

  Lists of different lengths (a bad record) use their common length.
  """
  n = tf.reduce_min([tf.size(starts), tf.size(ends), tf.size(texts)])
  starts, ends, texts = starts[:n], ends[:n], texts[:n]
  order = _by_start_then_end(starts, ends)
  # A batch of strings encodes to a RaggedTensor [n, None].
  text_ids = tf.cast(vocabulary.encode_tf(tf.gather(texts, order)), tf.int32)
  if with_times:
    first = _special_ids(vocabulary).time_id(0)
    bins = tf.stack([time_bins(tf.gather(starts, order), duration, num_bins),
                     time_bins(tf.gather(ends, order), duration, num_bins)], axis=1)
    text_ids = tf.concat([tf.RaggedTensor.from_tensor(bins + first), text_ids], axis=1)
  return text_ids.flat_values


def _with_eos(tokens: tf.Tensor, feature: seqio.Feature) -> tf.Tensor:
  if feature.add_eos:
    tokens = tf.concat([tokens, [feature.vocabulary.eos_id]], axis=0)
  return tf.cast(tokens, tf.int32)


def _transcript(features: Features, vocabulary, num_bins: int, timed: bool) -> tf.Tensor:
  return timed_segment_tokens(features["speech_start"], features["speech_end"],
                              features["speech_text"], features["duration"], vocabulary,
                              num_bins, with_times=timed)


# --------------------------------------------------------------------------------
# Dense captioning
# --------------------------------------------------------------------------------


def dense_caption_targets(ds: tf.data.Dataset, output_features: Dict[str, seqio.Feature],
                          speech_input: str = "timed",
                          num_bins: Optional[int] = None) -> tf.data.Dataset:
  """targets = timed events + EOS; inputs = the transcript prompt (module docstring).

  Args:
    speech_input: "timed" (time tokens per speech segment, as Vid2Seq), "text"
      (speech texts only) or "none" (empty prompt).
    num_bins: time bins; default all the vocabulary's `<time_k>` tokens.
  """
  if speech_input not in SPEECH_INPUTS:
    raise ValueError(f"speech_input must be one of {SPEECH_INPUTS}, got {speech_input!r}")
  targets_feature = output_features["targets"]
  in_vocab, out_vocab = output_features["inputs"].vocabulary, targets_feature.vocabulary
  num_bins = _num_bins(out_vocab, num_bins)
  _num_bins(in_vocab, num_bins)

  def fn(features):
    targets = timed_segment_tokens(features["start"], features["end"], features["caption"],
                                   features["duration"], out_vocab, num_bins)
    if speech_input == "none":
      inputs = tf.zeros([0], tf.int32)
    else:
      inputs = _transcript(features, in_vocab, num_bins, timed=speech_input == "timed")
    return {**features, "inputs": tf.cast(inputs, tf.int32),
            "targets": _with_eos(targets, targets_feature)}

  return ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


# --------------------------------------------------------------------------------
# Span denoising
# --------------------------------------------------------------------------------


def _random_segmentation(num_items: tf.Tensor, num_segments: tf.Tensor,
                         seed: tf.Tensor) -> tf.Tensor:
  """int32 [num_segments] positive run lengths summing to `num_items`.

  Every such split is equally likely: the cuts are a uniform random subset of
  size num_segments - 1 of the num_items - 1 gaps. Needs 1 <= segments <= items.
  """
  keys = tf.random.stateless_uniform([num_items - 1], seed)
  cuts = tf.sort(tf.argsort(keys)[:num_segments - 1] + 1)
  bounds = tf.concat([[0], tf.cast(cuts, tf.int32), [num_items]], axis=0)
  return bounds[1:] - bounds[:-1]


def random_spans_noise_mask(length, seed: tf.Tensor, noise_density: float = 0.15,
                            mean_noise_span_length: float = 3.0,
                            max_spans: Optional[int] = None) -> tf.Tensor:
  """bool [length], True on the tokens to drop (T5's layout; module docstring).

  `seed` is a stateless seed (int [2]). Fewer than 2 tokens: nothing is noise.
  `max_spans` caps the number of spans (the sentinels available); the spans then
  get longer, the noise count stays.
  """
  length = tf.cast(length, tf.int32)
  n = tf.maximum(length, 2)  # Computed for >= 2 tokens, then cut back below.
  num_noise = tf.cast(tf.round(tf.cast(n, tf.float32) * noise_density), tf.int32)
  num_noise = tf.clip_by_value(num_noise, 1, n - 1)
  num_spans = tf.cast(tf.round(tf.cast(num_noise, tf.float32) / mean_noise_span_length),
                      tf.int32)
  # Both the noise and the kept tokens need a non-empty run per span.
  num_spans = tf.clip_by_value(num_spans, 1, tf.minimum(num_noise, n - num_noise))
  if max_spans is not None:
    num_spans = tf.minimum(num_spans, max_spans)
  seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2)
  noise_lengths = _random_segmentation(num_noise, num_spans, seeds[0])
  kept_lengths = _random_segmentation(n - num_noise, num_spans, seeds[1])
  # Runs alternate kept, noise, kept, noise, ...: odd runs are noise.
  run_ends = tf.cumsum(tf.reshape(tf.stack([kept_lengths, noise_lengths], axis=1), [-1]))
  run = tf.searchsorted(run_ends, tf.range(n), side="right")
  return (run % 2 == 1)[:length] & (length >= 2)


def _keep_non_negative(pairs: tf.Tensor) -> tf.Tensor:
  flat = tf.reshape(pairs, [-1])
  return tf.boolean_mask(flat, flat >= 0)


def span_corrupt(tokens: tf.Tensor, seed: tf.Tensor, vocabulary,
                 noise_density: float = 0.15,
                 mean_noise_span_length: float = 3.0) -> Tuple[tf.Tensor, tf.Tensor]:
  """(inputs, targets) int32 of T5 span corruption of `tokens` (no EOS added).

  Span k becomes `<extra_id_k>` (id `special_ids.sentinel_id(k)`); at most as
  many spans as the vocabulary has sentinels.
  """
  ids = _special_ids(vocabulary)
  if ids.spec.num_sentinels < 1:
    raise ValueError("span corruption needs a vocabulary with <extra_id_k> sentinels")
  tokens = tf.cast(tokens, tf.int32)
  noise = random_spans_noise_mask(tf.size(tokens), seed, noise_density,
                                  mean_noise_span_length, ids.spec.num_sentinels)
  span_start = noise & ~tf.concat([[False], noise], axis=0)[:-1]
  span_index = tf.cumsum(tf.cast(span_start, tf.int32)) - 1
  # Each position contributes (sentinel or -1, token or -1); dropping the -1s
  # gives inputs and targets in one gather-free pass.
  sentinel = tf.where(span_start, ids.sentinel_id(0) - span_index, -1)
  inputs = _keep_non_negative(tf.stack([sentinel, tf.where(noise, -1, tokens)], axis=1))
  targets = _keep_non_negative(tf.stack([sentinel, tf.where(noise, tokens, -1)], axis=1))
  return inputs, targets


def span_denoising(ds: tf.data.Dataset, output_features: Dict[str, seqio.Feature],
                   noise_density: float = 0.15, mean_noise_span_length: float = 3.0,
                   timed: bool = True, num_bins: Optional[int] = None) -> tf.data.Dataset:
  """inputs/targets = span corruption of the (timed) transcript (module docstring).

  Adds `transcript`, the uncorrupted token ids. Records whose transcript has
  fewer than 2 tokens and no problem are dropped; with a problem they stay, so
  the bad-record policy sees them.
  """
  if not 0 < noise_density < 1 or mean_noise_span_length < 1:
    raise ValueError(f"need 0 < noise_density < 1 and mean_noise_span_length >= 1, got "
                     f"{noise_density}, {mean_noise_span_length}")
  targets_feature = output_features["targets"]
  vocabulary = targets_feature.vocabulary
  num_bins = _num_bins(vocabulary, num_bins)

  def add_transcript(features):
    return {**features, "transcript": tf.cast(
        _transcript(features, vocabulary, num_bins, timed), tf.int32)}

  def has_text(features):
    return (tf.size(features["transcript"]) >= 2) | tf.not_equal(
        features.get(bad_records.PROBLEM_KEY, ""), "")

  @seqio.map_over_dataset(num_seeds=1)
  def corrupt(features, seed):
    inputs, targets = span_corrupt(features["transcript"], seed, vocabulary,
                                   noise_density, mean_noise_span_length)
    return {**features, "inputs": inputs, "targets": _with_eos(targets, targets_feature)}

  ds = ds.map(add_transcript, num_parallel_calls=tf.data.AUTOTUNE).filter(has_text)
  return corrupt(ds)  # pylint: disable=no-value-for-parameter


# --------------------------------------------------------------------------------
# Temporal grounding
# --------------------------------------------------------------------------------


def grounding_examples(ds: tf.data.Dataset, output_features: Dict[str, seqio.Feature],
                       num_bins: Optional[int] = None,
                       prompt: str = "query:") -> tf.data.Dataset:
  """One example per event: the caption is the query, its times the answer (module docstring).

  Args:
    num_bins: time bins; default all the vocabulary's `<time_k>` tokens.
    prompt: fixed text before the query, so one model can tell this task from the
      others; "" for none.
  """
  targets_feature = output_features["targets"]
  in_vocab, out_vocab = output_features["inputs"].vocabulary, targets_feature.vocabulary
  num_bins = _num_bins(out_vocab, num_bins)
  first_time = _special_ids(out_vocab).time_id(0)
  prompt_ids = tf.constant(list(in_vocab.encode(prompt)) if prompt else [], tf.int32)

  def per_event(features):
    starts, ends, captions = features["start"], features["end"], features["caption"]
    num_events = tf.reduce_min([tf.size(starts), tf.size(ends), tf.size(captions)])
    bad = tf.not_equal(features.get(bad_records.PROBLEM_KEY, ""), "")
    count = tf.where(bad, 1, num_events)
    # One padding event, so a bad record without events still yields one example.
    starts = tf.concat([starts[:num_events], [0.0]], axis=0)
    ends = tf.concat([ends[:num_events], [0.0]], axis=0)
    captions = tf.concat([captions[:num_events], [""]], axis=0)

    def event(i):
      bins = time_bins(tf.stack([starts[i], ends[i]]), features["duration"], num_bins)
      query = tf.cast(in_vocab.encode_tf(captions[i]), tf.int32)
      return {**features,
              "id": tf.strings.join([features["id"], "#", tf.strings.as_string(i)]),
              "inputs": tf.concat([prompt_ids, query], axis=0),
              "targets": _with_eos(bins + first_time, targets_feature)}

    return tf.data.Dataset.range(tf.cast(count, tf.int64)).map(
        lambda i: event(tf.cast(i, tf.int32)))

  return ds.flat_map(per_event)


# --------------------------------------------------------------------------------
# Frames as images
# --------------------------------------------------------------------------------


def _relative_times(times: tf.Tensor, duration: tf.Tensor) -> tf.Tensor:
  """times / duration in [0, 1]; 0 where that is not finite (a bad record's duration)."""
  relative = tf.cast(times, tf.float32) / tf.cast(duration, tf.float32)
  return tf.clip_by_value(tf.where(tf.math.is_finite(relative), relative, 0.0), 0.0, 1.0)


def _real_frames_as_images(features: Features, frames_key: str, image_id: int) -> Features:
  """`frames_key`'s real frames -> `images`; their `<image>`s start `inputs`."""
  mask = features["frame_mask"]
  images = tf.boolean_mask(features[frames_key], mask)
  times = tf.boolean_mask(features["frame_times"], mask)
  prompt = tf.cast(features.get("inputs", tf.zeros([0], tf.int32)), tf.int32)
  out = {k: v for k, v in features.items() if k not in (frames_key, "frame_mask")}
  out.update(images=images, frame_times=times,
             image_times=_relative_times(times, features["duration"]),
             inputs=tf.concat([tf.fill([tf.shape(images)[0]], image_id), prompt], 0))
  return out


def frames_as_images(ds: tf.data.Dataset,
                     output_features: Dict[str, seqio.Feature]) -> tf.data.Dataset:
  """Real frames -> `images`, one `<image>` each at the start of `inputs` (run last).

  Removes `frames` and `frame_mask`; keeps `frame_times` for the real frames and
  adds `image_times`, the same relative to the clip (in [0, 1]).
  """
  image_id = _special_ids(output_features["inputs"].vocabulary).image_id(0)
  return ds.map(lambda f: _real_frames_as_images(f, "frames", image_id),
                num_parallel_calls=tf.data.AUTOTUNE)


def features_as_images(ds: tf.data.Dataset,
                       output_features: Dict[str, seqio.Feature]) -> tf.data.Dataset:
  """As `frames_as_images` for precomputed features: `images` float32 [F_real, D] (run last).

  Removes `frame_features` and `frame_mask`. The task's `images` feature must be
  float32 rank 2 (`output_features(frame_feature_dim=D)`).
  """
  image_id = _special_ids(output_features["inputs"].vocabulary).image_id(0)
  return ds.map(lambda f: _real_frames_as_images(f, "frame_features", image_id),
                num_parallel_calls=tf.data.AUTOTUNE)


# --------------------------------------------------------------------------------
# Reading events back
# --------------------------------------------------------------------------------


def _as_text(text_or_token_ids, vocabulary) -> str:
  if isinstance(text_or_token_ids, str):
    return text_or_token_ids
  ids = [int(i) for i in np.asarray(text_or_token_ids).reshape(-1)]
  eos = vocabulary.eos_id
  if eos in ids:
    ids = ids[:ids.index(eos)]
  return vocabulary.decode([i for i in ids if i != vocabulary.pad_id])


def parse_events(text_or_token_ids: Union[str, Sequence[int], np.ndarray],
                 duration: float, vocabulary=None,
                 num_bins: int = 100) -> List[Event]:
  """Events (start_s, end_s, caption) in the targets format, read from text or ids.

  Ids are decoded with `vocabulary` (default `vocab.multimodal_vocabulary()`)
  up to the first EOS. Tolerant of model output: an event is two time tokens
  followed by non-empty text; when more time tokens come in a row the last two
  count. Incomplete events (text without two times, times without text) and
  events ending before they start are skipped; other structure tokens are
  ignored. Times are bin values, k / (num_bins - 1) * duration.
  """
  if not isinstance(text_or_token_ids, str):
    vocabulary = vocabulary or vocab.multimodal_vocabulary()
  text = _as_text(text_or_token_ids, vocabulary)
  spec = getattr(vocabulary, "spec", None) or special_tokens.TokenSpec()
  spec = dataclasses.replace(spec, num_time_bins=num_bins)
  events: List[Event] = []
  times: List[float] = []
  words: List[str] = []

  def flush():
    caption = " ".join("".join(words).split())
    if len(times) >= 2 and caption and times[-1] >= times[-2]:
      events.append((times[-2], times[-1], caption))

  for segment in special_tokens.parse_special(text, spec, duration=duration):
    if isinstance(segment, special_tokens.Time):
      if "".join(words).strip():  # A time after text starts the next event.
        flush()
        times, words = [], []
      times.append(segment.value)
    elif isinstance(segment, str):
      words.append(segment)
  flush()
  return events


def parse_moment(text_or_token_ids: Union[str, Sequence[int], np.ndarray],
                 duration: float, vocabulary=None,
                 num_bins: int = 100) -> Optional[Tuple[float, float]]:
  """(start_s, end_s) of a grounding answer (targets format), or None when malformed.

  The first two time tokens count (up to the first EOS when given ids, decoded
  with `vocabulary`, default `vocab.multimodal_vocabulary()`); other tokens are
  ignored. None if there are fewer than two or the end is before the start.
  """
  if not isinstance(text_or_token_ids, str):
    vocabulary = vocabulary or vocab.multimodal_vocabulary()
  text = _as_text(text_or_token_ids, vocabulary)
  spec = getattr(vocabulary, "spec", None) or special_tokens.TokenSpec()
  spec = dataclasses.replace(spec, num_time_bins=num_bins)
  times = [segment.value for segment in special_tokens.parse_special(text, spec,
                                                                     duration=duration)
           if isinstance(segment, special_tokens.Time)][:2]
  if len(times) < 2 or times[1] < times[0]:
    return None
  return times[0], times[1]
