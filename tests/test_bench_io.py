"""`tools.bench_data` and `tools.bench_checkpoint`: the data and checkpoint benchmarks.

Timings are never asserted (the machine is shared); what is checked is what the figures are
made of: the examples really counted, the shapes the trainer expects, a state that comes
back from disk bit for bit.
"""
import argparse
import json
import os

import jax
import numpy as np
import pytest

from tools import bench_checkpoint
from tools import bench_data
from vlpjax import config as config_lib
from vlpjax import families

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIGLIP_SHAPES = os.path.join(REPO, "experiments", "siglip_shapes.py")


def _args(module, argv):
  parser = argparse.ArgumentParser()
  module.add_arguments(parser)
  return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------
# data


def test_data_kind_counts_what_its_batches_hold(monkeypatch):
  # Count the examples the kind's iterator really yields, apart from the benchmark's own
  # arithmetic.
  yielded = []
  make = bench_data.KINDS["image_caption"]

  def counting(args):
    for batch in make(args):
      yielded.append(len(batch["image"]))
      yield batch

  monkeypatch.setitem(bench_data.KINDS, "image_caption", counting)
  args = _args(bench_data, ["--kinds", "image_caption", "--threads", "2", "--batch_size", "4",
                            "--batches", "3", "--warmup", "1", "--examples", "16"])
  results = json.loads(json.dumps(bench_data.run(args, [])))

  assert yielded == [4] * 4  # 1 warm-up + 3 timed batches of 4
  figures = results["kinds"]["image_caption"]
  assert set(results["kinds"]) == {"image_caption"}
  assert results["threads"] == 2 and results["batch_size"] == 4
  assert figures["examples"] == 3 * 4
  assert figures["seconds"] > 0
  assert figures["examples_per_sec"] == pytest.approx(12 / figures["seconds"])
  assert figures["examples_per_sec_per_core"] == pytest.approx(figures["examples_per_sec"] / 2)


def _run_config_with_trainer_shapes(path: str, batch_size: int) -> dict:
  """`data --config path` over 2 batches (1 thread); asserts the batches have the shapes and
  dtypes the trainer checks every batch against (`trainer._check_batch`)."""
  args = _args(bench_data, ["--config", path, "--threads", "1", "--batches", "2",
                            "--warmup", "1"])
  override = [f"global_batch_size={batch_size}"]
  results = json.loads(json.dumps(bench_data.run(args, override)))
  config = config_lib.finalize(config_lib.load(path), override)
  for key, spec in families.get_family(config).input_specs(batch_size).items():
    assert results["batch_shapes"][key]["shape"] == list(spec.shape), key
    assert results["batch_shapes"][key]["dtype"] == str(np.dtype(spec.dtype)), key
  return results


def test_data_config_times_the_trainers_batches():
  results = _run_config_with_trainer_shapes(SIGLIP_SHAPES, 16)
  assert results["input_format"] == "image_text" and results["batch_unit"] == "examples"
  assert results["threads"] == 1
  assert results["examples"] == 2 * 16
  # Per-task counts come from the batches' task_index, independently of the batch size.
  assert results["examples_by_task"] == {"shapes_captions": 32}
  assert results["examples_per_sec_per_core"] == pytest.approx(results["examples_per_sec"])


def test_data_config_of_packed_rows():
  results = _run_config_with_trainer_shapes(
      os.path.join(REPO, "experiments", "vlm_shapes.py"), 8)
  assert results["batch_unit"] == "packed rows" and results["rows"] == 2 * 8
  # Packed rows read `input.threads` too: per-core figures divide by the pinned pool.
  assert results["threads"] == 1
  assert results["examples_per_sec_per_core"] == pytest.approx(results["examples_per_sec"])
  # Shapes captions are short: several fit in a row (1 + 16 image tokens + <= 10 of 80).
  assert results["rows"] < results["packed_examples"] <= 3 * results["rows"]
  assert results["packed_examples_per_sec"] == pytest.approx(
      results["packed_examples"] / results["seconds"])
  assert results["task_counted_examples"] > 0


def test_packed_examples_are_the_segments_of_each_row():
  segments = np.array([[1, 1, 2, 2, 3, 0],    # three examples and padding
                       [1, 1, 1, 1, 1, 1],    # one long example
                       [0, 0, 0, 0, 0, 0]])   # an empty row
  assert bench_data._packed_examples({"decoder_segment_ids": segments}) == 4


def test_data_flags_that_do_not_go_together():
  with pytest.raises(ValueError, match="--kinds"):
    bench_data.run(_args(bench_data, ["--config", SIGLIP_SHAPES, "--kinds", "video"]), [])
  with pytest.raises(ValueError, match="global_batch_size"):
    bench_data.run(_args(bench_data, ["--config", SIGLIP_SHAPES, "--batch_size", "8"]), [])
  with pytest.raises(ValueError, match="need --config"):
    bench_data.run(_args(bench_data, ["--kinds", "video"]), ["seed=1"])


# --------------------------------------------------------------------------------------------
# checkpoint


def test_checkpoint_round_trip_of_a_sharded_state(tmp_path):
  state, shardings = bench_checkpoint.synthetic_state(3, leaf_mib=1, layout="sharded")
  # 3 MiB of float32 in 1 MiB [256, 1024] leaves, rows split over the 8 test devices.
  assert [x.shape for x in state.values()] == [(256, 1024)] * 3
  assert all(len(x.sharding.device_set) == jax.device_count() for x in state.values())
  host = {k: np.asarray(v) for k, v in state.items()}

  figures, restored = bench_checkpoint.measure(state, shardings, str(tmp_path), repeats=2)

  assert set(restored) == set(host)
  for key, value in host.items():
    np.testing.assert_array_equal(np.asarray(restored[key]), value)
    assert restored[key].sharding == shardings[key]
  assert figures["state_bytes"] == 3 * 2**20
  for key in ("sync_save_s", "async_blocking_s", "async_total_s", "restore_s",
              "sync_save_mb_per_s", "restore_mb_per_s"):
    assert figures[key] > 0, key
  rounds = figures["per_round"]
  assert all(len(v) == 2 for v in rounds.values())
  assert all(b <= t for b, t in zip(rounds["async_blocking_s"], rounds["async_total_s"]))
  assert figures["async_blocking_s"] <= figures["async_total_s"]
  assert figures["blocking_fraction"] == pytest.approx(
      figures["async_blocking_s"] / figures["sync_save_s"])
  # Fresh steps each round, committed in each Checkpointer's own directory.
  for mode in ("sync", "async"):
    assert sorted(os.listdir(tmp_path / mode)) == ["1", "2"]


def test_checkpoint_run_into_a_given_dir_replicated(tmp_path):
  (tmp_path / "out").mkdir()
  args = _args(bench_checkpoint, ["--mib", "2", "--leaf_mib", "1", "--layout", "replicated",
                                  "--repeats", "1", "--dir", str(tmp_path / "out")])
  results = json.loads(json.dumps(bench_checkpoint.run(args, [])))
  assert results["restored_equal"]
  assert results["state_bytes"] == 2 * 2**20
  assert results["devices"] == jax.device_count()
  assert results["async_blocking_s"] <= results["async_total_s"]
  # A given --dir is kept; a second run there saves the next step instead of colliding.
  assert os.listdir(tmp_path / "out" / "sync") == ["1"]
  bench_checkpoint.run(args, [])
  assert sorted(os.listdir(tmp_path / "out" / "sync")) == ["1", "2"]


def test_checkpoint_of_a_config_train_state():
  args = _args(bench_checkpoint, ["--config", SIGLIP_SHAPES, "--repeats", "1"])
  results = bench_checkpoint.run(args, ["global_batch_size=16"])
  # The trainer's state: params and two AdamW moments (f32) and the int32 step, counted
  # from shapes alone.
  from vlpjax import trainer  # pylint: disable=g-import-not-at-top
  config = config_lib.finalize(config_lib.load(SIGLIP_SHAPES), ["global_batch_size=16"])
  abstract = trainer.build(config).abstract_state
  expected = sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(abstract))
  assert results["state_bytes"] == expected
  assert results["restored_equal"]
  assert 0 < results["async_blocking_s"] <= results["async_total_s"]
  assert results["sync_save_s"] > 0 and results["restore_s"] > 0
  assert not os.path.exists(results["directory"])  # the temporary directory is removed


def test_filesystem_is_the_mount_holding_the_path(tmp_path):
  found = bench_checkpoint.filesystem(str(tmp_path))
  assert found is not None and found["type"]
  assert str(tmp_path).startswith(found["mount"].rstrip("/") + "/")
  # Same device as the mount point: the mount really holds the path.
  assert os.stat(tmp_path).st_dev == os.stat(found["mount"]).st_dev


def test_checkpoint_needs_a_state_and_rejects_stray_overrides():
  with pytest.raises(SystemExit):
    _args(bench_checkpoint, [])
  with pytest.raises(ValueError, match="need --config"):
    bench_checkpoint.run(_args(bench_checkpoint, ["--mib", "1"]), ["seed=1"])
