"""The video-timestamp kind: checks, frames, Vid2Seq targets, span denoising, tasks."""
import io
import math

import numpy as np
from PIL import Image
import pytest
import seqio
import tensorflow as tf

from data_mixtures import videos as video_tasks
from vlpjax.data import packing
from vlpjax.data import records
from vlpjax.data import special_tokens
from vlpjax.data import videos
from vlpjax.data.kinds import video
from vlpjax.data.kinds import video_targets
from vlpjax.data.vocab import multimodal_vocabulary

VOCAB = multimodal_vocabulary()
IDS = VOCAB.special_ids
OUT = video_targets.output_features()
_LIST_TYPES = {"frames": tf.string, "start": tf.float32, "end": tf.float32,
               "caption": tf.string, "speech_start": tf.float32, "speech_end": tf.float32,
               "speech_text": tf.string, "duration": tf.float32}


def _png(value: int, size: int = 4) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(np.full([size, size, 3], value, np.uint8)).save(buffer, format="PNG")
  return buffer.getvalue()


def _hand_record(**changes):
  record = dict(
      id="hand/0", frames=[_png(10), _png(20), _png(30)], duration=[10.0],
      # Out of order on purpose: targets sort by start time.
      start=[5.0, 2.0], end=[7.25, 4.5],
      caption=["the circle moves to the right", "a red circle appears"],
      speech_start=[2.5], speech_end=[4.0], speech_text=["look, a red circle"])
  record.update(changes)
  return {k: v for k, v in record.items() if v is not None}  # None: field missing.


def _serialize(record) -> bytes:
  """A tf.train.Example with only the fields `record` has (any may be missing)."""
  features = {k: records.feature(np.atleast_1d(record[k]).tolist() if k == "duration"
                                 else record[k], _LIST_TYPES[k])
              for k in _LIST_TYPES if k in record}
  if "id" in record:
    features["id"] = records.bytes_feature([record["id"]])
  return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def _run(recs, objective="dense_captions", num_frames=4, frame_size=4, seed=None, **kwargs):
  """Parses `recs` as tf.Examples and runs a video task's preprocessors on them."""
  ds = tf.data.Dataset.from_tensor_slices([_serialize(r) for r in recs]).map(
      lambda s: tf.io.parse_single_example(s, video.feature_description()))
  steps = video_tasks.video_preprocessors(objective, num_frames=num_frames,
                                          frame_size=frame_size, **kwargs)
  with seqio.utils.map_seed_manager(seed):
    for step in steps:
      ds = seqio.utils.add_kwargs_to_transform(step, output_features=OUT)(ds)
    return list(ds.as_numpy_iterator())


def _times(*bins):
  return [IDS.time_id(k) for k in bins]


# --------------------------------------------------------------------------------
# Dense captioning targets and time tokens
# --------------------------------------------------------------------------------


def test_dense_caption_targets_hand_checked():
  # Nearest bin of t / 10 * 99: 2.0 -> 19.8 -> 20, 4.5 -> 44.55 -> 45, 5.0 -> 49.5 -> 50
  # (halves up), 7.25 -> 71.775 -> 72, 2.5 -> 24.75 -> 25, 4.0 -> 39.6 -> 40.
  assert [special_tokens.time_to_bin(t, 10.0) for t in (2.0, 4.5, 5.0, 7.25, 2.5, 4.0)] == [
      20, 45, 50, 72, 25, 40]
  assert _times(20, 45) == [533, 558]  # 512 base pieces, then <image>, then <time_0>.
  caption_a, caption_b, speech = (VOCAB.encode(t) for t in (
      "a red circle appears", "the circle moves to the right", "look, a red circle"))
  (ex,) = _run([_hand_record()], num_frames=3)
  assert ex["problem"] == b""
  assert ex["targets"].tolist() == (_times(20, 45) + caption_a + _times(50, 72) + caption_b +
                                    [VOCAB.eos_id])
  assert ex["inputs"].tolist() == [IDS.image_id(0)] * 3 + _times(25, 40) + speech
  assert VOCAB.decode(ex["targets"].tolist()) == (
      "<time_20><time_45> a red circle appears<time_50><time_72> the circle moves to the right")
  # Frames in order, one <image> each; frame f of 3 stands for (f + 0.5) * 10 / 3 s.
  assert ex["images"].shape == (3, 4, 4, 3)
  np.testing.assert_array_equal(ex["images"][:, 0, 0, 0], [10, 20, 30])
  np.testing.assert_allclose(ex["frame_times"], [5 / 3, 5.0, 25 / 3], rtol=1e-6)
  (text_only,) = _run([_hand_record()], num_frames=3, speech_input="text")
  assert text_only["inputs"].tolist() == [IDS.image_id(0)] * 3 + speech
  (no_speech,) = _run([_hand_record()], num_frames=3, speech_input="none")
  assert no_speech["inputs"].tolist() == [IDS.image_id(0)] * 3
  assert no_speech["targets"].tolist() == ex["targets"].tolist()


def test_time_bins_agree_with_special_tokens():
  rng = np.random.default_rng(0)
  for num_bins in (2, 7, 100):
    durations = np.float32([10.0, 3.3, 0.7, 123.456])
    for duration in durations:
      # Random times, both ends and the exact half-bin points (the rounding edges).
      halves = (np.arange(num_bins - 1) + 0.5) / (num_bins - 1) * duration
      times = np.concatenate([rng.uniform(0, duration, 50), [0, duration], halves])
      times = np.clip(times.astype(np.float32), 0, duration)
      got = video_targets.time_bins(times, duration, num_bins).numpy()
      want = [special_tokens.time_to_bin(float(t), float(duration), num_bins) for t in times]
      assert got.tolist() == want
      # Every bin survives bin -> time -> bin; every time is within half a bin.
      assert [special_tokens.time_to_bin(special_tokens.token_to_time(k, duration, num_bins),
                                         duration, num_bins) for k in range(num_bins)] == list(
                                             range(num_bins))
      back = np.array([special_tokens.token_to_time(k, duration, num_bins) for k in got])
      assert np.all(np.abs(back - times) <= duration / (num_bins - 1) / 2 * (1 + 1e-5))


def test_parse_events_round_trip_on_generated_clips():
  examples = _run([videos.generate_example("validation", i, num_frames=8)
                   for i in range(8)], num_frames=4, frame_size=8)
  assert all(ex["problem"] == b"" for ex in examples)
  for ex in examples:
    duration = float(ex["duration"])
    order = sorted(range(len(ex["start"])), key=lambda i: (ex["start"][i], ex["end"][i]))
    want = [(ex["start"][i], ex["end"][i], ex["caption"][i].decode()) for i in order]
    for given in (ex["targets"], VOCAB.decode(ex["targets"].tolist())):
      got = video_targets.parse_events(given, duration)
      assert [g[2] for g in got] == [w[2] for w in want]
      half_bin = duration / 99 / 2 + 1e-6
      for (gs, ge, _), (ws, we, _) in zip(got, want):
        assert abs(gs - ws) <= half_bin and abs(ge - we) <= half_bin


def test_parse_events_skips_malformed_output():
  parse = lambda text: video_targets.parse_events(text, duration=99.0)  # Bin k = k s.
  assert parse("<time_10><time_20> a cat<time_30> dangling<time_40><time_50>") == [
      (10.0, 20.0, "a cat")]
  assert parse("no times at all") == []
  assert parse("") == []
  assert parse("<time_1><time_2>") == []
  assert parse("<time_5><time_9><time_12> three times") == [(9.0, 12.0, "three times")]
  assert parse("<time_50><time_40> backwards<time_3><time_3> instant") == [
      (3.0, 3.0, "instant")]
  assert parse("<time_1> <time_2> spaced <loc_7>loc  ignored") == [
      (1.0, 2.0, "spaced loc ignored")]
  assert parse("<time_150><time_2> out of range bin") == []  # <time_150> is text.
  ids = VOCAB.encode("<time_4><time_8> kept") + [VOCAB.eos_id] + VOCAB.encode(
      "<time_9><time_10> after eos")
  assert video_targets.parse_events([0] + ids + [0, 0], duration=99.0) == [(4.0, 8.0, "kept")]
  assert video_targets.parse_events(np.array([], np.int32), duration=5.0) == []
  # Fewer bins than the vocabulary has: bins rescale, larger tokens are text.
  assert video_targets.parse_events("<time_2><time_4> x", 8.0, num_bins=5) == [
      (4.0, 8.0, "x")]


# --------------------------------------------------------------------------------
# Span denoising
# --------------------------------------------------------------------------------


def _corrupt(length, seed, **kwargs):
  tokens = tf.range(3, 3 + length)
  inputs, targets = video_targets.span_corrupt(tokens, tf.constant([seed, 0]), VOCAB,
                                               **kwargs)
  return inputs.numpy().tolist(), targets.numpy().tolist()


def _reconstruct(inputs, targets):
  """The original tokens, checking sentinel order on the way."""
  sentinel = lambda k: IDS.sentinel_id(k)
  is_sentinel = lambda t: bool(IDS.is_sentinel_id(t))
  spans, k = {}, -1
  for t in targets:
    if is_sentinel(t):
      k += 1
      assert t == sentinel(k), "targets' sentinels must be <extra_id_0>, <extra_id_1>, ..."
      spans[k] = []
    else:
      assert k >= 0, "targets must start with a sentinel"
      spans[k].append(t)
  in_sentinels = [t for t in inputs if is_sentinel(t)]
  assert in_sentinels == [sentinel(i) for i in range(len(spans))]
  assert all(spans.values()), "every span drops at least one token"
  out = []
  for t in inputs:
    out.extend(spans[IDS.sentinel_id(0) - t] if is_sentinel(t) else [t])
  return out


def test_span_corruption_reconstructs_and_follows_t5_counts():
  noise = spans = total = 0
  for seed in range(60):
    length = 8 + 7 * seed % 150
    inputs, targets = _corrupt(length, seed)
    assert _reconstruct(inputs, targets) == list(range(3, 3 + length))
    dropped = len([t for t in targets if not IDS.is_sentinel_id(t)])
    num_spans = len(targets) - dropped
    # T5's counts: round(L * 0.15) noise tokens, round(noise / 3) spans.
    assert dropped == min(max(int(np.round(length * 0.15)), 1), length - 1)
    assert num_spans == min(max(int(np.round(dropped / 3)), 1), dropped, length - dropped)
    assert not IDS.is_sentinel_id(inputs[0])  # T5's layout starts with kept tokens.
    noise, spans, total = noise + dropped, spans + num_spans, total + length
  assert abs(noise / total - 0.15) < 0.01
  assert abs(noise / spans - 3.0) < 0.3


def test_span_corruption_is_seeded_and_configurable():
  assert _corrupt(40, 1) == _corrupt(40, 1)
  assert len({tuple(_corrupt(40, s)[1]) for s in range(20)}) > 15
  # Over many seeds every position but the first is dropped sometimes, at about
  # the density (6 of 40 tokens).
  hits = np.zeros(40)
  for seed in range(300):
    mask = video_targets.random_spans_noise_mask(40, tf.constant([seed, 1])).numpy()
    assert mask.sum() == 6
    hits += mask
  assert hits[0] == 0 and np.all(hits[1:] > 0)
  assert abs(hits.mean() / 300 - 0.15) < 1e-9
  inputs, targets = _corrupt(30, 3, noise_density=0.5, mean_noise_span_length=1.0)
  assert len(targets) == 30  # 15 spans of one token, each with its sentinel.
  assert _reconstruct(inputs, targets) == list(range(3, 33))
  capped = video_targets.random_spans_noise_mask(200, tf.constant([0, 0]), max_spans=2)
  runs = np.diff(np.concatenate([[0], capped.numpy().astype(int)])) == 1
  assert capped.numpy().sum() == 30 and runs.sum() == 2
  # Too short to corrupt: nothing dropped.
  assert _corrupt(1, 0) == ([3], []) and _corrupt(0, 0) == ([], [])
  assert _corrupt(2, 0) == ([3, IDS.sentinel_id(0)], [IDS.sentinel_id(0), 4])


def test_span_denoising_task_corrupts_the_timed_transcript():
  recs = [videos.generate_example("train", i, num_frames=6) for i in range(8)]
  first = _run(recs, "span_denoising", seed=5)
  assert [ex["id"] for ex in first] == [r["id"].encode() for r in recs
                                       if r["speech_text"]]  # Silent clips dropped.
  assert len(first) >= 4
  for ex, again in zip(first, _run(recs, "span_denoising", seed=5)):
    assert ex["inputs"].tolist() == again["inputs"].tolist()
  other = _run(recs, "span_denoising", seed=6)
  assert any(a["targets"].tolist() != b["targets"].tolist() for a, b in zip(first, other))
  for ex in first:
    n_images = len(ex["images"])
    assert ex["inputs"][:n_images].tolist() == [IDS.image_id(0)] * n_images
    assert ex["targets"][-1] == VOCAB.eos_id
    restored = _reconstruct(ex["inputs"][n_images:].tolist(), ex["targets"][:-1].tolist())
    assert restored == ex["transcript"].tolist()
    # The transcript is the dense-captioning input format of the speech.
    events = video_targets.parse_events(ex["transcript"], float(ex["duration"]))
    assert [e[2] for e in events] == [t.decode() for t in ex["speech_text"]]


# --------------------------------------------------------------------------------
# Frames
# --------------------------------------------------------------------------------


def _numpy_frame_indices(n, num_frames, short_clip):
  i = np.arange(num_frames)
  uniform = np.floor((i + 0.5) * n / num_frames).astype(int)
  if short_clip == "repeat":
    return uniform, np.full(num_frames, n > 0)
  if n >= num_frames:
    return uniform, np.ones(num_frames, bool)
  return np.minimum(i, max(n - 1, 0)), i < n


@pytest.mark.parametrize("short_clip", video.SHORT_CLIP_RULES)
def test_sample_frames_picks_the_middle_frames(short_clip):
  lengths = (1, 3, 8, 13)
  recs = [_hand_record(frames=[_png(10 * (f + 1)) for f in range(n)], duration=[12.5])
          for n in lengths]
  for n, ex in zip(lengths, _run(recs, num_frames=8, short_clip=short_clip)):
    index, mask = _numpy_frame_indices(n, 8, short_clip)
    assert ex["problem"] == b""
    assert len(ex["images"]) == mask.sum()
    np.testing.assert_array_equal(ex["images"][:, 1, 2, 0], 10 * (index[mask] + 1))
    np.testing.assert_allclose(ex["frame_times"], (index[mask] + 0.5) * 12.5 / n, rtol=1e-6)
    assert ex["inputs"].tolist().count(IDS.image_id(0)) == mask.sum()
  assert _numpy_frame_indices(13, 8, "pad")[0].tolist() == [0, 2, 4, 5, 7, 8, 10, 12]


def test_sample_frames_keeps_padding_before_frames_as_images():
  ds = video.normalize_records(tf.data.Dataset.from_tensors(
      {"frames": [_png(10), _png(20)], "duration": 4.0}))
  ex = next(video.sample_frames(ds, num_frames=4, image_size=4).as_numpy_iterator())
  assert ex["frame_mask"].tolist() == [True, True, False, False]
  np.testing.assert_array_equal(ex["frames"][:, 0, 0, 0], [10, 20, 0, 0])
  np.testing.assert_allclose(ex["frame_times"], [1.0, 3.0, 0.0, 0.0])
  with pytest.raises(ValueError, match="short_clip"):
    video.sample_frames(ds, short_clip="loop")


# --------------------------------------------------------------------------------
# Bad records
# --------------------------------------------------------------------------------

BAD = [
    (dict(end=[12.5, 4.5]), "time out of range: event 0 end 12.5 > duration 10"),
    (dict(start=[5.0, -1.0]), "time out of range: event 1 start -1 < 0"),
    (dict(start=[5.0, math.nan]), "time out of range: event 1 start nan"),
    (dict(end=[5.0, 4.5]), "end not after start: event 0 start 5 end 5"),
    (dict(end=[4.0, 4.5]), "end not after start: event 0 start 5 end 4"),
    (dict(caption=["ok", "  "]), "empty caption: event 1"),
    (dict(caption=["only one"]), "length mismatch: start, end, caption have 2, 2, 1 values"),
    (dict(speech_end=[11.0]),
     "time out of range: speech segment 0 speech_end 11 > duration 10"),
    (dict(speech_text=[""]), "empty speech_text: speech segment 0"),
    (dict(duration=None), "missing duration"),
    (dict(duration=[0.0]), "bad duration: 0 (need finite and > 0)"),
    (dict(duration=[math.inf]), "bad duration: inf (need finite and > 0)"),
    (dict(duration=[5.0, 6.0]), "bad duration: 2 values, need 1"),
    (dict(frames=[]), "no frames"),
    (dict(frames=None, duration=None), "missing duration"),
]


@pytest.mark.parametrize("objective", video_tasks.OBJECTIVES)
def test_every_bad_record_gets_its_reason(objective):
  cases = BAD + [(dict(frames=[_png(10), b"not an image", _png(30)]), "corrupt frame: ")]
  got = _run([_hand_record(**changes) for changes, _ in cases] + [_hand_record()], objective,
             num_frames=3)
  # Bad records stay, once each, with valid shapes; grounding asks about each of the
  # good record's 2 events.
  assert len(got) == len(cases) + (2 if objective == "grounding" else 1)
  for ex, (changes, reason) in zip(got, cases):
    if reason.endswith(": "):
      assert ex["problem"].decode().startswith("corrupt frame: frame 1 of 3: "), ex["problem"]
      assert ex["images"][1].max() == 0  # The bad frame is black, the others decoded.
    else:
      assert ex["problem"].decode() == reason, changes
      assert video.check_record(_hand_record(**changes)) == reason
    assert ex["targets"][-1] == VOCAB.eos_id
    assert ex["inputs"].tolist().count(IDS.image_id(0)) == len(ex["images"])
  assert got[-1]["problem"] == b"" and video.check_record(_hand_record()) == ""


def test_tf_checks_agree_with_check_record_on_mutated_clips():
  rng = np.random.default_rng(1)
  recs = []
  for i in range(24):
    record = videos.generate_example("validation", i, num_frames=4, frame_size=8)
    record["duration"] = [record["duration"]]
    key = ["start", "end", "speech_start", "speech_end"][i % 4]
    if record[key] and i % 3:
      j = int(rng.integers(len(record[key])))
      values = list(record[key])
      values[j] = float(rng.choice([-0.5, values[j] + 3.0, 100.0, values[j]]))
      record[key] = values
    recs.append(record)
  got = _run(recs)
  want = [video.check_record(r) for r in recs]
  assert [ex["problem"].decode() for ex in got] == want
  assert 4 <= sum(bool(w) for w in want) < len(want)


# --------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------


def _task_examples(name, **kwargs):
  ds = seqio.get_mixture_or_task(name).get_dataset(
      sequence_length=None, split="validation", shuffle=False, **kwargs)
  return list(ds.as_numpy_iterator())


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_tfrecord_task_equals_generated_task(tmp_path):
  sizes = dict(num_frames=4, frame_size=16)
  path = str(tmp_path / "videos.tfrecord")
  videos.write_tfrecords("validation", path, num_frames=6, frame_size=16, num_examples=4)
  for objective, register in (("dense_captions", video_tasks.register_dense_captions_task),
                              ("span_denoising", video_tasks.register_span_denoising_task),
                              ("grounding", video_tasks.register_grounding_task)):
    register(f"test_videos_mem_{objective}", split_sizes={"validation": 4}, clip_frames=6,
             **sizes)
    video_tasks.register_video_tfrecord_task(
        f"test_videos_file_{objective}", {"validation": path}, objective, **sizes)
    seed = dict(seed=3) if objective == "span_denoising" else {}
    memory = _task_examples(f"test_videos_mem_{objective}", **seed)
    _assert_same(_task_examples(f"test_videos_file_{objective}", **seed), memory)
    assert memory and all(ex["problem"] == b"" for ex in memory)
  # The examples pack with images like any prefix-LM task.
  rows = packing.pack(memory, row_length=256, max_images_per_row=8, tokens_per_image=2,
                      image_token_id=IDS.image_id(0), image_shape=(16, 16, 3))
  assert sum(int(r["image_mask"].sum()) for r in rows) == sum(len(e["images"]) for e in memory)


def test_registered_tasks_and_frame_feature_records(tmp_path):
  for name in (video_tasks.DENSE_CAPTIONS_TASK, video_tasks.SPAN_DENOISING_TASK,
               video_tasks.GROUNDING_TASK):
    assert name in seqio.TaskRegistry.names()
  dim = 3
  good = dict(_hand_record(frames=None), id="feat/0",
              frame_features=np.arange(5 * dim, dtype=np.float32))
  ragged = dict(good, id="feat/1", frame_features=np.ones(7, np.float32))
  path = str(tmp_path / "features.tfrecord")
  with tf.io.TFRecordWriter(path) as writer:
    for record in (good, ragged):
      example = tf.train.Example.FromString(_serialize(record))
      example.features.feature["frame_features"].CopyFrom(
          records.float_feature(record["frame_features"]))
      writer.write(example.SerializeToString())
  video_tasks.register_video_tfrecord_task("test_videos_features", {"validation": path},
                                           num_frames=4, frame_feature_dim=dim)
  first, second = _task_examples("test_videos_features")
  # The real frames' features are the "images", one <image> each, as frames would be.
  assert first["problem"] == b"" and first["images"].dtype == np.float32
  # 5 frames, F = 4: frames floor((i + 0.5) * 5 / 4) = 0, 1, 3, 4.
  np.testing.assert_array_equal(first["images"],
                                np.arange(15, dtype=np.float32).reshape(5, 3)[[0, 1, 3, 4]])
  assert first["inputs"].tolist()[:6] == [IDS.image_id(0)] * 4 + _times(25, 40)
  np.testing.assert_allclose(first["frame_times"], np.float32([0.5, 1.5, 3.5, 4.5]) * 10 / 5)
  np.testing.assert_allclose(first["image_times"], np.float32([0.5, 1.5, 3.5, 4.5]) / 5)
  assert "frame_features" not in first and "frame_mask" not in first
  assert second["problem"] == b"bad frame_features: 7 values are not a multiple of D=3"
  # Whole rows only: 2 frames of 3 values, both real (F = 4 pads).
  np.testing.assert_array_equal(second["images"], np.ones((2, 3), np.float32))
  assert second["inputs"].tolist().count(IDS.image_id(0)) == 2


# --------------------------------------------------------------------------------
# Temporal grounding and frame times
# --------------------------------------------------------------------------------


def test_grounding_examples_hand_checked():
  (first, second) = _run([_hand_record()], "grounding", num_frames=3)
  prompt = VOCAB.encode("query:")
  images = [IDS.image_id(0)] * 3
  # One example per event, in record order (the first event is the later one).
  assert [first["id"], second["id"]] == [b"hand/0#0", b"hand/0#1"]
  assert first["inputs"].tolist() == images + prompt + VOCAB.encode(
      "the circle moves to the right")
  assert first["targets"].tolist() == _times(50, 72) + [VOCAB.eos_id]
  assert second["inputs"].tolist() == images + prompt + VOCAB.encode("a red circle appears")
  assert second["targets"].tolist() == _times(20, 45) + [VOCAB.eos_id]
  assert VOCAB.decode(second["inputs"][3:].tolist()) == "query: a red circle appears"
  for ex in (first, second):
    assert ex["problem"] == b"" and float(ex["duration"]) == 10.0
    np.testing.assert_array_equal(ex["images"][:, 0, 0, 0], [10, 20, 30])
    np.testing.assert_allclose(ex["frame_times"], [5 / 3, 5.0, 25 / 3], rtol=1e-6)
    np.testing.assert_allclose(ex["image_times"], [1 / 6, 1 / 2, 5 / 6], rtol=1e-6)
  (bare, _) = _run([_hand_record()], "grounding", num_frames=3, grounding_prompt="")
  assert bare["inputs"].tolist() == images + VOCAB.encode("the circle moves to the right")
  # Records without events ask nothing; the others go on.
  got = _run([_hand_record(start=[], end=[], caption=[]), _hand_record(id="hand/1")],
             "grounding", num_frames=3)
  assert [ex["id"] for ex in got] == [b"hand/1#0", b"hand/1#1"]


def test_grounding_round_trips_generated_events():
  recs = [videos.generate_example("validation", i, num_frames=8) for i in range(6)]
  got = _run(recs, "grounding", num_frames=4, frame_size=8, num_bins=50)
  assert len(got) == sum(len(r["caption"]) for r in recs) > 6
  events = [(r["id"], i, s, e, c) for r in recs
            for i, (s, e, c) in enumerate(zip(r["start"], r["end"], r["caption"]))]
  prompt = len(VOCAB.encode("query:"))
  for ex, (rid, i, start, end, caption) in zip(got, events):
    assert ex["id"].decode() == f"{rid}#{i}" and ex["problem"] == b""
    n_images = len(ex["images"])
    query = VOCAB.decode(ex["inputs"][n_images + prompt:].tolist())
    duration = float(ex["duration"])
    ids = ex["targets"].tolist()[:2] + VOCAB.encode(query)
    ((s, e, text),) = video_targets.parse_events(ids, duration, num_bins=50)
    assert text == caption
    half_bin = duration / 49 / 2 * (1 + 1e-5)
    assert abs(s - start) <= half_bin and abs(e - end) <= half_bin
    assert video_targets.parse_moment(ex["targets"], duration, num_bins=50) == (s, e)


def test_parse_moment_reads_answers():
  parse = lambda text: video_targets.parse_moment(text, duration=99.0)  # Bin k = k s.
  assert parse("<time_10><time_20>") == (10.0, 20.0)
  assert parse(" at <time_3> until <time_3> then <time_9>") == (3.0, 3.0)
  assert parse("<time_20><time_10>") is None and parse("<time_5>") is None
  assert parse("") is None and parse("<time_150><time_2>") is None
  ids = [0] + _times(4, 8) + [VOCAB.eos_id] + _times(1, 2)
  assert video_targets.parse_moment(ids, duration=99.0) == (4.0, 8.0)
  assert video_targets.parse_moment(_times(4) + [VOCAB.eos_id] + _times(8), 99.0) is None


@pytest.mark.parametrize("objective", video_tasks.OBJECTIVES)
def test_image_times_are_frame_times_over_duration(objective):
  recs = [videos.generate_example("train", i, num_frames=5) for i in range(4)]
  got = _run(recs, objective, num_frames=4, frame_size=8, seed=1)
  assert got
  for ex in got:
    assert ex["image_times"].dtype == np.float32
    assert ex["image_times"].shape == (len(ex["images"]),)
    np.testing.assert_allclose(ex["image_times"], ex["frame_times"] / ex["duration"],
                               rtol=1e-6)
    # 5 frames, F = 4: indices 0, 1, 3, 4, times (index + 0.5) / 5 whatever the duration.
    np.testing.assert_allclose(ex["image_times"], [0.1, 0.3, 0.7, 0.9], rtol=1e-6)
  # Padded slots of short clips have no time: only the real frames are images.
  (short,) = _run([_hand_record(frames=[_png(1), _png(2)], duration=[4.0])], num_frames=4)
  np.testing.assert_allclose(short["image_times"], [0.25, 0.75])


def test_frame_features_pack_and_batch_as_images(tmp_path):
  """Feature records -> grounding examples -> packed rows whose images are feature vectors."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from vlpjax.data import prefix_lm_pipeline  # pylint: disable=g-import-not-at-top
  dim, rng = 6, np.random.default_rng(3)
  path = str(tmp_path / "features.tfrecord")
  features_of = {}
  with tf.io.TFRecordWriter(path) as writer:
    for i in range(6):
      record = dict(_hand_record(frames=None), id=f"feat/{i}")
      features = rng.standard_normal((3 + i % 2, dim)).astype(np.float32)
      features_of[record["id"]] = features
      example = tf.train.Example.FromString(_serialize(record))
      example.features.feature["frame_features"].CopyFrom(
          records.float_feature(features.reshape(-1)))
      writer.write(example.SerializeToString())
  video_tasks.register_video_tfrecord_task("test_videos_feature_grounding",
                                           {"train": path}, "grounding", num_frames=2,
                                           frame_feature_dim=dim)
  config = ml_collections.ConfigDict(dict(
      task="test_videos_feature_grounding", split="train", pp="", shuffle_buffer=4,
      row_length=64, max_images_per_row=4, tokens_per_image=1, image_size=32,
      frame_feature_dim=dim))
  batch = next(prefix_lm_pipeline.PrefixLMBatches(config, global_batch_size=2, seed=0))
  assert batch["images"].shape == (2, 4, dim) and batch["images"].dtype == np.float32
  # Every valid slot holds a picked frame's features with its time: F = 2 of n = 3 or 4
  # frames are indices floor((i + 0.5) * n / 2) = (0, 2) or (1, 3), at (index + .5) / n.
  picked = {}
  for features in features_of.values():
    n = len(features)
    for index in ((0, 2) if n == 3 else (1, 3)):
      picked[features[index].tobytes()] = (index + 0.5) / n
  n_slots = 0
  for b in range(2):
    for slot in np.flatnonzero(batch["image_mask"][b]):
      assert batch["images"][b, slot].tobytes() in picked
      np.testing.assert_allclose(batch["image_times"][b, slot],
                                 picked[batch["images"][b, slot].tobytes()], rtol=1e-6)
      n_slots += 1
  assert n_slots >= 4
  assert not batch["images"][~batch["image_mask"]].any()
  assert not batch["image_times"][~batch["image_mask"]].any()
