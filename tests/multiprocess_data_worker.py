"""One process of `test_multiprocess_data.py`: joins a 2-process JAX run, reads its shards.

Usage: python multiprocess_data_worker.py PROCESS_ID PORT TFRECORD_GLOB OUT_JSON
Writes the ids this process read: 8 epochs' worth of train examples, and its eval batches.
"""
import json
import sys

import jax


def main(process_id: int, port: int, tfrecord_glob: str, out_path: str):
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
  # Imported after joining, as the trainer does: nothing may touch a backend before.
  import ml_collections  # pylint: disable=g-import-not-at-top
  from data_mixtures import shapes as shapes_tasks  # pylint: disable=g-import-not-at-top
  from vlpjax.data import pipeline  # pylint: disable=g-import-not-at-top
  from vlpjax.data import tasks  # pylint: disable=g-import-not-at-top

  shapes_tasks.register_shapes_task("mp_generated", image_size=16,
                                    split_sizes={"train": 32, "validation": 12})
  tasks.register_image_caption_tfrecord_task("mp_files", {"train": tfrecord_glob,
                                                          "validation": tfrecord_glob})
  index, count = jax.process_index(), jax.process_count()
  out = {"process_index": index, "process_count": count}
  for task in ("mp_generated", "mp_files"):
    config = ml_collections.ConfigDict(dict(
        task=task, split="train", pp="resize(16)", text_length=8, shuffle_buffer=64,
        keys=("image", "id")))
    shard_size = pipeline.count_examples(config, count)[index]
    batches = pipeline.train_batches(config, global_batch_size=4, seed=3,
                                     process_index=index, process_count=count)
    # seqio repeats before it shuffles, so epochs blend; 8 epochs' worth shows every id.
    train_ids = [i.decode() for _ in range(2 * shard_size) for i in next(batches)["id"]]
    config.split = "validation"
    eval_ids = [i.decode() for batch in pipeline.eval_batches(
        config, global_batch_size=4, process_index=index, process_count=count)
        for i, real in zip(batch["id"], batch["mask"]) if real]
    out[task] = {"shard_size": shard_size, "train": train_ids, "eval": eval_ids}
  with open(out_path, "w") as f:
    json.dump(out, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
