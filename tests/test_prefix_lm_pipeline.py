"""Mixtures by rate and packed prefix-LM batches over tasks with and without images."""
import ml_collections
import numpy as np
import pytest
import seqio
import tensorflow as tf

from vlpjax.data import mixing
from vlpjax.data import prefix_lm_pipeline
from vlpjax.data import tasks
from vlpjax.data.vocab import multimodal_vocabulary

SIZE = 8


def _dataset_fn(split, shuffle_files, seed=None, *, with_images):
  del split, shuffle_files, seed
  vocab = multimodal_vocabulary()
  image_id = vocab.special_ids.image_id(0)
  rng = np.random.default_rng(7 if with_images else 8)
  examples = []
  for i in range(40):
    n_img = int(rng.integers(1, 3)) if with_images else 0
    text = rng.integers(3, 200, size=int(rng.integers(2, 6))).tolist()
    inputs = [image_id] * n_img + text
    targets = rng.integers(3, 200, size=int(rng.integers(1, 5))).tolist() + [1]
    images = rng.integers(0, 256, size=(n_img, SIZE, SIZE, 3)).astype(np.uint8)
    examples.append((f"{'img' if with_images else 'txt'}/{i}", inputs, targets, images))
  return tf.data.Dataset.from_generator(
      lambda: ({"id": e[0], "inputs": e[1], "targets": e[2], "images": e[3]}
               for e in examples),
      output_signature={"id": tf.TensorSpec([], tf.string),
                        "inputs": tf.TensorSpec([None], tf.int32),
                        "targets": tf.TensorSpec([None], tf.int32),
                        "images": tf.TensorSpec([None, SIZE, SIZE, 3], tf.uint8)})


def _features():
  vocab = multimodal_vocabulary()
  return {"inputs": seqio.Feature(vocab, add_eos=False),
          "targets": seqio.Feature(vocab, add_eos=False),
          "images": seqio.ContinuousFeature(dtype=tf.uint8, rank=4)}


@pytest.fixture(scope="module")
def mixture_name():
  import functools  # pylint: disable=g-import-not-at-top
  for name, with_images in (("plm_test_images", True), ("plm_test_text", False)):
    tasks.add_task(name, source=seqio.FunctionDataSource(
        functools.partial(_dataset_fn, with_images=with_images), splits=["train"]),
                   output_features=_features(), preprocessors=[])
  if "plm_test_mix" in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove("plm_test_mix")
  seqio.MixtureRegistry.add("plm_test_mix", [("plm_test_images", 3.0), ("plm_test_text", 1.0)])
  return "plm_test_mix"


def _config(task):
  return ml_collections.ConfigDict(dict(
      task=task, split="train", pp='value_range(-1, 1, key="images")', shuffle_buffer=16,
      row_length=32, max_images_per_row=4, tokens_per_image=3, image_size=SIZE))


def test_choices_follow_rates_and_depend_only_on_position():
  rates = [0.6, 0.3, 0.1]
  drawn = np.fromiter(mixing.choices(rates, seed=3), int, count=20_000)
  freq = np.bincount(drawn, minlength=3) / drawn.size
  # 5 binomial standard deviations.
  np.testing.assert_allclose(freq, rates, atol=5 * np.sqrt(0.25 / drawn.size))
  resumed = np.fromiter(mixing.choices(rates, seed=3, start=5_000), int, count=100)
  np.testing.assert_array_equal(resumed, drawn[5_000:5_100])


def test_mixture_members_and_rates(mixture_name):
  from vlpjax.data import pipeline  # pylint: disable=g-import-not-at-top
  found = mixing.members(mixture_name, pipeline.get_provider)
  assert [(m.task, m.rate) for m in found] == [("plm_test_images", 0.75),
                                                ("plm_test_text", 0.25)]


def test_packed_batches_carry_images_and_resume_exactly(mixture_name):
  batches = prefix_lm_pipeline.PrefixLMBatches(_config(mixture_name), global_batch_size=4,
                                               seed=0)
  first = [next(batches) for _ in range(5)]
  counts = batches.counts
  assert counts["plm_test_images"] > counts["plm_test_text"] > 0
  image_id = prefix_lm_pipeline.image_token_id("plm_test_images")
  for b in first:
    assert b["decoder_target_tokens"].shape == (4, 32)
    assert b["images"].shape == (4, 4, SIZE, SIZE, 3)
    # Every valid slot has its 3 image tokens in the row, and no more.
    np.testing.assert_array_equal((b["decoder_target_tokens"] == image_id).sum(axis=1),
                                  3 * b["image_mask"].sum(axis=1))
    assert b["images"][b["image_mask"]].min() >= -1 and b["images"].max() <= 1
  resumed = prefix_lm_pipeline.PrefixLMBatches(_config(mixture_name), global_batch_size=4,
                                               seed=0, start_position=3)
  for expected in first[3:]:
    got = next(resumed)
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_text_only_task_alone(mixture_name):
  del mixture_name
  batch = next(prefix_lm_pipeline.PrefixLMBatches(_config("plm_test_text"),
                                                  global_batch_size=2, seed=1))
  assert not batch["image_mask"].any()
  assert batch["decoder_loss_weights"].sum() > 0


def test_all_kinds_pack_together_with_layout_and_skip_counts():
  """Documents, videos, stories and text in one mixture: one batch format for all."""
  from data_mixtures import documents, interleaved, videos  # pylint: disable=g-import-not-at-top
  small = {"train": 6, "validation": 2}
  names = {"mix_doc": 1.0, "mix_video": 1.0, "mix_story": 1.0, "mix_text": 1.0}
  documents.register_documents_qa("mix_doc", page_size=96, image_size=16, split_sizes=small)
  videos.register_dense_captions_task("mix_video", num_frames=2, frame_size=16,
                                      clip_frames=4, split_sizes=small)
  interleaved.register_stories_interleaved_task("mix_story", image_size=16, split_sizes=small,
                                                max_images=2)
  interleaved.register_stories_text_task("mix_text", image_size=16, split_sizes=small)
  if "mix_all_kinds" in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove("mix_all_kinds")
  seqio.MixtureRegistry.add("mix_all_kinds", list(names.items()))
  config = ml_collections.ConfigDict(dict(
      task="mix_all_kinds", split="train", pp='value_range(-1, 1, key="images")',
      shuffle_buffer=8, row_length=256, max_images_per_row=4, tokens_per_image=2,
      image_size=16, bad_records="skip"))
  batches = prefix_lm_pipeline.PrefixLMBatches(config, global_batch_size=2, seed=0)
  for _ in range(4):
    batch = next(batches)
    assert batch["decoder_boxes"].shape == (2, 256, 4)
    assert batch["images"].shape == (2, 4, 16, 16, 3)
    # Boxes only where tokens are, and only inside [0, 1].
    assert np.all(batch["decoder_boxes"][batch["decoder_segment_ids"] == 0] == 0)
    assert batch["decoder_boxes"].min() >= 0 and batch["decoder_boxes"].max() <= 1
  assert set(batches.counts) == set(names) and all(n > 0 for n in batches.counts.values())
  assert batches.skipped.total == 0


def _config_with(task, **changes):
  config = _config(task)
  for key, value in changes.items():
    config[key] = value
  return config


def test_task_loss_weights_weigh_their_tasks_targets(mixture_name):
  """{images: 0.5}: the image task's target tokens weigh 0.5, the text task's 1.0."""
  weighted = prefix_lm_pipeline.PrefixLMBatches(
      _config_with(mixture_name, task_loss_weights=ml_collections.ConfigDict(
          {"plm_test_images": 0.5})), global_batch_size=4, seed=0)
  plain = prefix_lm_pipeline.PrefixLMBatches(_config(mixture_name), global_batch_size=4,
                                             seed=0)
  seen = {0.5: 0, 1.0: 0}
  for _ in range(3):
    got, want = next(weighted), next(plain)
    assert got["decoder_loss_weights"].dtype == np.float32
    # Weights change nothing but the weights: same rows.
    for key in want:
      if key != "decoder_loss_weights":
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    np.testing.assert_array_equal(got["decoder_loss_weights"] > 0,
                                  want["decoder_loss_weights"] > 0)
    # Every example of the image task has images, the text task's none.
    for b in range(4):
      seg, lw = got["decoder_segment_ids"][b], got["decoder_loss_weights"][b]
      image_segments = set(got["image_segment_ids"][b][got["image_mask"][b]].tolist())
      for s in range(1, seg.max() + 1):
        targets = lw[(seg == s) & (want["decoder_loss_weights"][b] > 0)]
        weight = 0.5 if s in image_segments else 1.0
        np.testing.assert_array_equal(targets, np.full(targets.size, weight, np.float32))
        seen[weight] += targets.size
  assert seen[0.5] > 0 and seen[1.0] > 0


def test_task_loss_weights_errors(mixture_name):
  with pytest.raises(ValueError, match=r"'plm_test_imags'.*Did you mean 'plm_test_images'"):
    prefix_lm_pipeline.PrefixLMBatches(
        _config_with(mixture_name, task_loss_weights={"plm_test_imags": 0.5}),
        global_batch_size=4, seed=0)
  with pytest.raises(ValueError, match=r"task_loss_weights\['plm_test_text'\] is -1"):
    prefix_lm_pipeline.PrefixLMBatches(
        _config_with(mixture_name, task_loss_weights={"plm_test_text": -1}),
        global_batch_size=4, seed=0)
  assert prefix_lm_pipeline.task_loss_weights(_config(mixture_name), ["a"]) == {}


def test_video_frame_times_reach_the_rows():
  """Grounding clips packed with a task without times: times on the frames' slots only."""
  import functools  # pylint: disable=g-import-not-at-top
  from data_mixtures import videos  # pylint: disable=g-import-not-at-top
  from vlpjax.data import kinds  # pylint: disable=g-import-not-at-top
  videos.register_grounding_task("plm_test_grounding", num_frames=2, frame_size=SIZE,
                                 clip_frames=4, split_sizes={"train": 6})
  # A seqio mixture needs the same output features: the kinds' shared ones.
  tasks.add_task("plm_test_kind_text", source=seqio.FunctionDataSource(
      functools.partial(_dataset_fn, with_images=False), splits=["train"]),
                 output_features=kinds.output_features(), preprocessors=[])
  if "plm_test_video_mix" in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove("plm_test_video_mix")
  seqio.MixtureRegistry.add("plm_test_video_mix", [("plm_test_grounding", 1.0),
                                                   ("plm_test_kind_text", 1.0)])
  batches = prefix_lm_pipeline.PrefixLMBatches(
      _config_with("plm_test_video_mix", task_loss_weights={"plm_test_grounding": 2.0}),
      global_batch_size=2, seed=0)
  n_clips = 0
  for _ in range(3):
    batch = next(batches)
    assert batch["image_times"].shape == (2, 4) and batch["image_times"].dtype == np.float32
    assert not batch["image_times"][~batch["image_mask"]].any()
    for b in range(2):
      slots = batch["image_segment_ids"][b]
      for s in set(slots[batch["image_mask"][b]].tolist()):
        # 4-frame clips, F = 2: frames 1 and 3, at (index + 0.5) / 4 of the clip.
        np.testing.assert_allclose(batch["image_times"][b][slots == s], [0.375, 0.875])
        lw = batch["decoder_loss_weights"][b][batch["decoder_segment_ids"][b] == s]
        assert set(lw.tolist()) == {0.0, 2.0}
        n_clips += 1
  assert n_clips > 0 and batches.counts["plm_test_kind_text"] > 0
