"""Embedded shapes data, vocabulary, preprocessors, seqio tasks and the pipeline.

Everything runs the real seqio / tf.data / SentencePiece code on tiny splits.
"""
import io

import ml_collections
import numpy as np
from PIL import Image
import pytest
import seqio
import tensorflow as tf

import data_mixtures  # noqa: F401  (registers shapes_captions)
from data_mixtures import shapes as shapes_tasks
from vlpjax.data import tasks
from vlpjax.data import pipeline
from vlpjax.data import preprocessors
from vlpjax.data import shapes
from vlpjax.data import vocab
from vlpjax.registry import UnknownNameError

TINY = "test_shapes_tiny"
TINY_SIZES = {"train": 48, "validation": 10}


@pytest.fixture(scope="module", autouse=True)
def tiny_task():
  shapes_tasks.register_shapes_task(TINY, image_size=32, split_sizes=TINY_SIZES)


def _config(**overrides):
  fields = dict(task=TINY, split="train", pp="value_range(-1, 1)", text_length=12,
                shuffle_buffer=16)
  fields.update(overrides)
  return ml_collections.ConfigDict(fields)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


# --- embedded data -------------------------------------------------------------


def test_class_names():
  assert len(shapes.CLASS_NAMES) == 20
  assert len(set(shapes.CLASS_NAMES)) == 20
  assert shapes.CLASS_NAMES[0] == "red circle"


def test_generator_is_deterministic_per_split_and_index():
  a = shapes.generate_example("train", 7, image_size=32)
  assert a == shapes.generate_example("train", 7, image_size=32)
  assert a["id"] == "shapes/train/7"
  assert a["image"] != shapes.generate_example("validation", 7, image_size=32)["image"]
  assert a["image"] != shapes.generate_example("train", 8, image_size=32)["image"]
  colour, shape = shapes.CLASS_NAMES[a["label"]].split()
  assert colour in a["caption"] and shape in a["caption"]


def test_make_dataset_records():
  ds = shapes.make_dataset("validation", image_size=32, num_examples=3)
  assert {k: s.dtype for k, s in ds.element_spec.items()} == {
      "id": tf.string, "image": tf.string, "caption": tf.string, "label": tf.int64}
  first = next(ds.as_numpy_iterator())
  expected = shapes.generate_example("validation", 0, image_size=32)
  assert first["image"] == expected["image"]
  assert first["caption"].decode() == expected["caption"]


# --- vocabulary ----------------------------------------------------------------


def test_vocabulary_round_trip():
  v = vocab.default_vocabulary()
  caption = "a small red triangle on the left"
  ids = v.encode(caption)
  assert v.decode(ids) == caption
  assert len(ids) == 7  # One piece per word: the model was trained on these captions.
  assert (v.pad_id, v.eos_id, v.unk_id) == (0, 1, 2)
  assert v.decode(v.encode("Zebra 42, naïve!")) == "Zebra 42, naïve!"  # byte fallback


# --- seqio task ----------------------------------------------------------------


def test_shapes_task_output_spec():
  task = seqio.get_mixture_or_task("shapes_captions")
  features = task.output_features
  assert set(features) == {"texts", "image", "label"}
  assert (features["texts"].dtype, features["texts"].rank) == (tf.int32, 1)
  assert not features["texts"].add_eos
  assert (features["image"].dtype, features["image"].rank) == (tf.uint8, 3)
  assert (features["label"].dtype, features["label"].rank) == (tf.int64, 0)
  ds = task.get_dataset({"texts": 16}, split="validation", shuffle=False, seed=0)
  spec = ds.element_spec
  assert spec["image"].dtype == tf.uint8 and spec["image"].shape.as_list() == [None, None, 3]
  assert spec["texts"].dtype == tf.int32 and spec["texts"].shape.rank == 1
  ex = next(ds.as_numpy_iterator())
  assert ex["image"].shape == (64, 64, 3)
  assert vocab.default_vocabulary().decode(ex["texts"].tolist()) == ex["caption"].decode()


def test_registration_is_idempotent():
  shapes_tasks.register_shapes_task(TINY, image_size=32, split_sizes=TINY_SIZES)
  assert TINY in seqio.TaskRegistry.names()


# --- preprocessors -------------------------------------------------------------


def _encode(array, fmt):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format=fmt)
  return buffer.getvalue()


def test_jpeg_records_never_run_python(monkeypatch):
  # Python in the hot path would compete with the training loop for the GIL and
  # hang a process that exits while prefetching; shapes JPEGs must stay in TF.
  calls = []
  original = preprocessors._pil_decode  # pylint: disable=protected-access
  monkeypatch.setattr(preprocessors, "_pil_decode",
                      lambda *args: calls.append(1) or original(*args))
  ds = preprocessors.decode_image(shapes.make_dataset("validation", 32, num_examples=10))
  assert len(list(ds.as_numpy_iterator())) == 10
  assert not calls


def test_decode_image_formats_agree():
  # PNG takes TF's decoder, BMP and grayscale GIF take PIL's: same pixels out.
  array = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
  gray = array[..., 0]
  ds = tf.data.Dataset.from_tensor_slices({"image": [
      _encode(array, "PNG"), _encode(array, "BMP"), _encode(gray, "PNG"), _encode(gray, "GIF")]})
  images = [ex["image"] for ex in preprocessors.decode_image(ds).as_numpy_iterator()]
  np.testing.assert_array_equal(images[0], array)
  np.testing.assert_array_equal(images[1], array)
  np.testing.assert_array_equal(images[2], np.stack([gray] * 3, axis=-1))
  np.testing.assert_array_equal(images[3], images[2])


def test_choose_caption_is_seeded():
  ds = tf.data.Dataset.from_tensor_slices(
      {"caption": tf.ragged.constant([["a", "b", "c", "d"]] * 16 + [[]])})

  def chosen(seed):
    with seqio.utils.map_seed_manager(seed):
      return [c.decode() for c in
              preprocessors.choose_caption(ds).map(lambda f: f["caption"]).as_numpy_iterator()]

  first = chosen(1)
  assert first == chosen(1) and first != chosen(2)
  assert set(first[:-1]) <= set("abcd") and len(set(first)) > 1
  assert first[-1] == ""  # No caption at all gives the empty one.


def test_pp_parsing():
  chain = preprocessors.parse_pp(
      "random_resized_crop(16, scale=(0.5, 1.0))|flip_lr|value_range(-1, 1)|pad_tokens(4)")
  assert [name for name, _, _ in chain.ops] == [
      "random_resized_crop", "flip_lr", "value_range", "pad_tokens"]
  assert chain.random_ops == ["random_resized_crop", "flip_lr"]
  out = chain({"image": tf.zeros([32, 24, 3], tf.uint8), "texts": tf.constant([5, 6, 7, 8, 9])},
              tf.constant([1, 2]))
  assert out["image"].shape == (16, 16, 3) and out["image"].dtype == tf.float32
  assert float(tf.reduce_min(out["image"])) == -1.0
  assert out["texts"].numpy().tolist() == [5, 6, 7, 8]
  assert preprocessors.parse_pp("").ops == []


def test_pp_unknown_op_names_nearest():
  with pytest.raises(UnknownNameError, match="Did you mean 'flip_lr'"):
    preprocessors.parse_pp("resize(32)|flip_rl")


def test_pp_rejects_code_and_bad_args():
  with pytest.raises(ValueError, match="literals"):
    preprocessors.parse_pp("resize(__import__('os').getpid())")
  with pytest.raises(ValueError, match="unexpected keyword"):
    preprocessors.parse_pp("resize(32, sise=3)")


def test_random_pp_is_deterministic_per_seed():
  chain = preprocessors.parse_pp("random_resized_crop(16, scale=(0.2, 1.0))|flip_lr")
  image = tf.random.stateless_uniform([32, 32, 3], [0, 0], maxval=256, dtype=tf.int32)
  features = {"image": tf.cast(image, tf.uint8)}
  run = lambda seed: chain(features, tf.constant(seed))["image"].numpy()
  np.testing.assert_array_equal(run([3, 4]), run([3, 4]))
  others = [run([3, s]) for s in range(5, 9)]
  assert any(not np.array_equal(run([3, 4]), o) for o in others)


# --- sources -------------------------------------------------------------------


def test_tfrecord_source_matches_function_source(tmp_path):
  files = shapes.write_tfrecords("validation", str(tmp_path / "val"), image_size=32,
                                 num_examples=TINY_SIZES["validation"], num_shards=2)
  assert len(files) == 2
  tasks.register_image_caption_tfrecord_task("test_shapes_tfrecord",
                                      {"validation": str(tmp_path / "val-*")})

  def by_id(name):
    ds = seqio.get_mixture_or_task(name).get_dataset(
        {"texts": 16}, split="validation", shuffle=False, seed=0)
    return {ex["id"]: ex for ex in ds.as_numpy_iterator()}

  assert shapes.write_tfrecords("validation", str(tmp_path / "one"), 32, 2) == [
      str(tmp_path / "one")]
  from_files, generated = by_id("test_shapes_tfrecord"), by_id(TINY)
  assert sorted(from_files) == sorted(generated)
  for record_id, ex in generated.items():
    np.testing.assert_array_equal(from_files[record_id]["image"], ex["image"])
    np.testing.assert_array_equal(from_files[record_id]["texts"], ex["texts"])
    assert from_files[record_id]["label"] == ex["label"]
  # Files have no known size: counting takes a pass; 2 files shard per file.
  config = _config(task="test_shapes_tfrecord", split="validation")
  assert pipeline.count_examples(config, process_count=2) == [5, 5]


# --- pipeline ------------------------------------------------------------------


def test_train_batches_shapes_and_dtypes():
  batch = next(pipeline.train_batches(_config(threads=1), global_batch_size=8, seed=0))
  assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
  assert batch["texts"].shape == (8, 12) and batch["texts"].dtype == np.int32
  assert set(batch) == {"image", "texts", "task_index"}
  assert batch["task_index"].dtype == np.int32 and not batch["task_index"].any()


def test_a_pinned_thread_pool_changes_where_batches_are_made_not_what_they_are():
  pp = "random_resized_crop(16, scale=(0.3, 1.0))|flip_lr|value_range(-1, 1)"
  default = _take(pipeline.train_batches(_config(pp=pp), global_batch_size=8, seed=3), 4)
  pinned = _take(pipeline.train_batches(_config(pp=pp, threads=2), global_batch_size=8,
                                        seed=3), 4)
  for expected, got in zip(default, pinned):
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key])
  # Pinned, tf.data does not autotune: in its own pool the tuning thread held up deleted
  # iterators for up to a minute (see pipeline.with_options).
  options = pipeline.train_dataset(_config(threads=2), global_batch_size=8, seed=0).options()
  assert options.threading.private_threadpool_size == 2 and not options.autotune.enabled
  assert options.autotune.initial_parallelism == 2  # What untuned AUTOTUNE maps run at.
  unpinned = pipeline.train_dataset(_config(), global_batch_size=8, seed=0).options()
  assert unpinned.autotune.enabled is not False  # None: tf.data's default, on.


def test_train_batches_resume_exactly():
  # 8 batches of 8 > 48 examples: the resumed part crosses an epoch boundary.
  config = _config(pp="random_resized_crop(16, scale=(0.3, 1.0))|flip_lr|value_range(-1, 1)")
  full = _take(pipeline.train_batches(config, global_batch_size=8, seed=5), 8)
  resumed = _take(pipeline.train_batches(config, global_batch_size=8, seed=5,
                                         start_position=5), 3)
  for expected, got in zip(full[5:], resumed):
    for k in expected:
      np.testing.assert_array_equal(expected[k], got[k])
  other_seed = next(pipeline.train_batches(config, global_batch_size=8, seed=6))
  assert not np.array_equal(other_seed["image"], full[0]["image"])


def test_train_batches_shard_disjoint():
  config = _config(pp="", keys=("id",))
  per_process = []
  for index in range(2):
    # Two epochs of this process's half (seqio shuffles after repeating, so
    # epochs blur at the edges): 12 local batches of 4.
    batches = _take(pipeline.train_batches(config, global_batch_size=8, seed=1,
                                           process_index=index, process_count=2), 12)
    per_process.append({i for b in batches for i in b["id"].tolist()})
  assert len(per_process[0]) == len(per_process[1]) == 24
  assert not per_process[0] & per_process[1]
  assert len(per_process[0] | per_process[1]) == TINY_SIZES["train"]


def test_eval_batches_pad_and_mask():
  config = _config(split="validation", pp="resize(24)|value_range(-1, 1)")
  assert pipeline.count_examples(config) == [10]
  batches = list(pipeline.eval_batches(config, global_batch_size=4))
  assert len(batches) == 3
  assert batches[-1]["mask"].tolist() == [True, True, False, False]
  assert batches[-1]["image"].shape == (4, 24, 24, 3)
  assert not batches[-1]["image"][2:].any() and not batches[-1]["texts"][2:].any()
  labels = np.concatenate([b["label"][b["mask"]] for b in batches])
  expected = [shapes.generate_example("validation", i, 32)["label"] for i in range(10)]
  assert labels.tolist() == expected and labels.dtype == np.int32


def test_eval_batches_sharded_same_length_and_disjoint():
  config = _config(split="validation", pp="", keys=("id",))
  shards = [list(pipeline.eval_batches(config, global_batch_size=8, process_index=i,
                                       process_count=2)) for i in range(2)]
  assert len(shards[0]) == len(shards[1]) == 2  # 5 examples each, local batch 4.
  ids = [{i for b in s for i, m in zip(b["id"].tolist(), b["mask"]) if m} for s in shards]
  assert not ids[0] & ids[1] and len(ids[0] | ids[1]) == 10


def test_eval_rejects_random_ops():
  with pytest.raises(ValueError, match="random ops"):
    pipeline.eval_batches(_config(split="validation", pp="flip_lr"), global_batch_size=4)


def test_unknown_task_names_nearest():
  with pytest.raises(ValueError, match="Did you mean 'shapes_captions'"):
    pipeline.train_batches(_config(task="shapes_caption"), global_batch_size=8, seed=0)


def test_image_caption_mixture_follows_rates_and_resumes():
  shapes_tasks.register_shapes_task("test_shapes_other", image_size=32,
                                    split_sizes={"train": 16, "validation": 4})
  if "test_shapes_mix" in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove("test_shapes_mix")
  seqio.MixtureRegistry.add("test_shapes_mix", [(TINY, 3.0), ("test_shapes_other", 1.0)])
  config = _config(task="test_shapes_mix")
  batches = pipeline.train_batches(config, global_batch_size=8, seed=5)
  assert sorted(batches.task_names) == sorted([TINY, "test_shapes_other"])
  tiny = batches.task_names.index(TINY)
  seen = _take(batches, 50)
  index = np.concatenate([b["task_index"] for b in seen])
  # 400 draws at rate 3/4: standard deviation 0.022, so 0.09 is four of them.
  assert abs(np.mean(index == tiny) - 0.75) < 0.09
  total = {}
  for b in seen:
    for name, n in batches.task_counts(b).items():
      total[name] = total.get(name, 0) + n
  assert total == {TINY: int(np.sum(index == tiny)),
                   "test_shapes_other": int(np.sum(index == 1 - tiny))}
  # The stream is a function of the seed and the position: resuming at batch 20 matches.
  resumed = pipeline.train_batches(config, global_batch_size=8, seed=5, start_position=20)
  for expected in seen[20:24]:
    got = next(resumed)
    np.testing.assert_array_equal(got["task_index"], expected["task_index"])
    np.testing.assert_array_equal(got["image"], expected["image"])
