"""Two local processes (jax.distributed on 127.0.0.1, gloo) read disjoint shards.

Each process takes its shard from `jax.process_index()`; together they must read the
whole split exactly once, for generated (in-memory) tasks and for TFRecord files.
"""
import json
import os
import subprocess
import sys

from tests import processes
from vlpjax.data import shapes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "multiprocess_data_worker.py")


def test_two_processes_read_disjoint_shards_covering_the_split(tmp_path):
  files = shapes.write_tfrecords("train", str(tmp_path / "shapes"), image_size=16,
                                 num_examples=20, num_shards=4)
  glob = str(tmp_path / "shapes-*")
  port = processes.free_port()
  env = processes.env_with_devices(2)
  outs = [str(tmp_path / f"ids{i}.json") for i in range(2)]
  procs = [subprocess.Popen([sys.executable, WORKER, str(i), str(port), glob, outs[i]],
                            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for i in range(2)]
  logs = processes.communicate_all(procs, timeout=300)
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  results = [json.load(open(path)) for path in outs]
  assert [r["process_index"] for r in results] == [0, 1]
  assert all(r["process_count"] == 2 for r in results)

  expected = {"mp_generated": ({f"shapes/train/{i}" for i in range(32)},
                               {f"shapes/validation/{i}" for i in range(12)}),
              "mp_files": ({f"shapes/train/{i}" for i in range(20)},) * 2}
  assert len(files) == 4
  for task, (train_split, eval_split) in expected.items():
    shards = [r[task] for r in results]
    for key, split in (("train", train_split), ("eval", eval_split)):
      a, b = (set(s[key]) for s in shards)
      assert not a & b, (task, key, sorted(a & b))
      assert a | b == split, (task, key)
      if key == "eval":
        assert all(len(s[key]) == len(set(s[key])) for s in shards)
      else:
        assert all(len(set(s[key])) == s["shard_size"] for s in shards), task
    assert sum(s["shard_size"] for s in shards) == len(train_split), task
