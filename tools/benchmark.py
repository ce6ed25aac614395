"""Benchmarks that write JSON: `python -m tools.benchmark data [--out FILE]`.

data: input-pipeline throughput per data kind, in examples/s and examples/s per CPU core. Each
kind's source is built before the clock starts (the embedded generators render once), then
`--batches` batches are timed after `--warmup` batches. The tf.data thread pool is pinned to
`--threads` threads (default: every core), and the per-core figure divides by that count.
"""
import argparse
import json
import os
import sys
import time
from typing import Callable, Dict, Iterator

import ml_collections

# Keep TensorFlow quiet and off accelerators: it is only the input pipeline here.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _time_batches(batches: Iterator, batch_size: int, warmup: int, n: int) -> Dict[str, float]:
  for _ in range(warmup):
    next(batches)
  start = time.perf_counter()
  for _ in range(n):
    next(batches)
  seconds = time.perf_counter() - start
  return {"examples": n * batch_size, "seconds": seconds,
          "examples_per_sec": n * batch_size / seconds}


def _image_caption(args) -> Iterator:
  """Shapes records at 224 px through decode, random-resized crop, tokenization."""
  from data_mixtures import shapes as shapes_tasks  # pylint: disable=g-import-not-at-top
  from vlpjax.data import pipeline  # pylint: disable=g-import-not-at-top
  shapes_tasks.register_shapes_task("bench_shapes_224", image_size=224,
                                    split_sizes={"train": args.examples})
  config = ml_collections.ConfigDict(dict(
      task="bench_shapes_224", split="train", text_length=64, shuffle_buffer=1_000,
      pp="random_resized_crop(224, scale=(0.5, 1.0))|flip_lr|value_range(-1, 1)",
      threads=args.threads))
  return pipeline.train_batches(config, global_batch_size=args.batch_size, seed=0)


def _examples(task_or_mixture: str, args) -> Iterator:
  """Batches of `batch_size` examples of a generative kind: its task, then value_range.

  Generative examples differ in length, so they are counted one by one as the
  packer receives them (task preprocessors in tf.data, then numpy), not packed.
  """
  from vlpjax.data import bad_records  # pylint: disable=g-import-not-at-top
  from vlpjax.data import mixing  # pylint: disable=g-import-not-at-top
  from vlpjax.data import pipeline  # pylint: disable=g-import-not-at-top
  from vlpjax.data import preprocessors  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(dict(split="train", shuffle_buffer=1_000))
  chain = preprocessors.parse_pp('value_range(-1, 1, key="images")')
  options = tf.data.Options()
  options.threading.private_threadpool_size = args.threads

  def examples(task: str, seed: int):
    ds = pipeline.task_dataset(config, task, shuffle=True, seed=seed, num_epochs=None,
                               process_index=0, process_count=1,
                               skipped=bad_records.SkipCounter())
    ds = ds.map(lambda f: chain(f, tf.constant([seed, 0], tf.int64)),
                num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(options).as_numpy_iterator()

  stream = mixing.MixedStream(mixing.members(task_or_mixture, pipeline.get_provider),
                              examples, seed=0)
  while True:
    yield [next(stream) for _ in range(args.batch_size)]


def _interleaved(args) -> Iterator:
  """Stories with 224 px images: decode, resize, placeholders, tokenization."""
  from data_mixtures import interleaved  # pylint: disable=g-import-not-at-top
  interleaved.register_stories_interleaved_task(
      "bench_interleaved_224", image_size=224, split_sizes={"train": args.examples // 4})
  return _examples("bench_interleaved_224", args)


def _video(args) -> Iterator:
  """16-frame clips at 224 px: 8 frames sampled and decoded, Vid2Seq time-token targets."""
  from data_mixtures import videos  # pylint: disable=g-import-not-at-top
  videos.register_dense_captions_task(
      "bench_video_224", num_frames=8, frame_size=224, clip_frames=16,
      split_sizes={"train": args.examples // 8})
  return _examples("bench_video_224", args)


def _document(args) -> Iterator:
  """256 px pages at 224 px: decode, loc tokens, the three UDOP objectives mixed."""
  from data_mixtures import documents  # pylint: disable=g-import-not-at-top
  documents.register_documents_udop("bench_documents_224", page_size=256, image_size=224,
                                    split_sizes={"train": args.examples // 4})
  return _examples("bench_documents_224", args)


KINDS: Dict[str, Callable] = {"image_caption": _image_caption, "interleaved": _interleaved,
                              "video": _video, "document": _document}


def run_data(args) -> Dict:
  results = {"benchmark": "data", "threads": args.threads, "batch_size": args.batch_size,
             "cpu_count": os.cpu_count(), "kinds": {}}
  for name in args.kinds or sorted(KINDS):
    batches = KINDS[name](args)
    figures = _time_batches(batches, args.batch_size, args.warmup, args.batches)
    figures["examples_per_sec_per_core"] = figures["examples_per_sec"] / args.threads
    results["kinds"][name] = figures
    print(f"{name}: {figures['examples_per_sec']:.0f} ex/s, "
          f"{figures['examples_per_sec_per_core']:.0f} ex/s per core", file=sys.stderr)
  return results


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m tools.benchmark", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  data = sub.add_parser("data", help="input pipeline examples/s per data kind")
  data.add_argument("--kinds", nargs="*", choices=sorted(KINDS))
  data.add_argument("--threads", type=int, default=os.cpu_count())
  data.add_argument("--batch_size", type=int, default=64)
  data.add_argument("--batches", type=int, default=20)
  data.add_argument("--warmup", type=int, default=3)
  data.add_argument("--examples", type=int, default=2_000,
                    help="size of each embedded source (rendered before timing)")
  parser.add_argument("--out", help="write the JSON here as well as to stdout")
  args = parser.parse_args(argv)
  results = run_data(args)
  text = json.dumps(results, indent=2)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
