"""`python -m tools.benchmark data`: input-pipeline throughput, as JSON.

Two modes:

* per data kind (default; `--kinds`): each kind's source is built before the clock starts (the
  embedded generators render once), then `--batches` batches of `--batch_size` examples are
  timed after `--warmup` batches. The tf.data thread pool is pinned to `--threads` threads
  (default: every core), and the per-core figure divides by that count.
* `--config PATH[:arg]` (+ `--config.a.b=value` overrides): exactly the training input the
  trainer reads for that config (`vlpjax.trainer.make_train_batches`), timed the same way.
  A batch is `global_batch_size` examples, or packed rows for prefix-LM families; for those
  the examples inside the timed rows are counted too (from the rows' segment ids, and from the
  batches' per-task counts). The tf.data pool is pinned to `--threads` (default: the
  config's `input.threads`, else every core) through the config's `input.threads`.

Progress lines go to stderr; `run` returns the JSON-able results.
"""
import argparse
import os
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Optional

import ml_collections
import numpy as np

# Keep TensorFlow quiet and off accelerators: it is only the input pipeline here.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_DEFAULT_BATCH_SIZE = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The `data` subcommand's flags."""
  parser.add_argument("--config", help="time this config's training input (PATH[:arg]); "
                      "--config.a.b=value overrides apply")
  parser.add_argument("--kinds", nargs="*", choices=sorted(KINDS),
                      help="data kinds to time (default: all; not with --config)")
  parser.add_argument("--threads", type=int, default=None,
                      help="tf.data thread pool size (default: every core)")
  parser.add_argument("--batch_size", type=int, default=None,
                      help=f"examples per batch of a kind (default {_DEFAULT_BATCH_SIZE}; "
                      "with --config use --config.global_batch_size)")
  parser.add_argument("--batches", type=int, default=20, help="timed batches")
  parser.add_argument("--warmup", type=int, default=3, help="untimed batches first")
  parser.add_argument("--examples", type=int, default=2_000,
                      help="size of each kind's embedded source (rendered before timing; "
                      "not with --config)")


def run(args: argparse.Namespace, overrides: List[str]) -> Dict[str, Any]:
  """Times the data kinds, or `--config`'s training input; returns the results."""
  if args.batches < 1 or args.warmup < 0:
    raise ValueError(f"--batches must be >= 1 and --warmup >= 0, got {args.batches} and "
                     f"{args.warmup}.")
  if args.threads is not None and args.threads < 1:
    raise ValueError(f"--threads must be >= 1, got {args.threads}.")
  if args.config:
    if args.kinds:
      raise ValueError("--kinds times the built-in data kinds; --config times the config's "
                       "own input: give one of them.")
    if args.batch_size is not None:
      raise ValueError("--batch_size does not apply with --config: the batch is the config's "
                       "global_batch_size (override it with --config.global_batch_size=N).")
    return run_config(args, overrides)
  if overrides:
    raise ValueError(f"overrides {overrides} need --config.")
  return run_kinds(args)


# --------------------------------------------------------------------------------------------
# Per data kind.


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
  config = ml_collections.ConfigDict(dict(split="train", shuffle_buffer=1_000,
                                          threads=args.threads))
  chain = preprocessors.parse_pp('value_range(-1, 1, key="images")')

  def examples(task: str, seed: int):
    ds = pipeline.task_dataset(config, task, shuffle=True, seed=seed, num_epochs=None,
                               process_index=0, process_count=1,
                               skipped=bad_records.SkipCounter())
    ds = ds.map(lambda f: chain(f, tf.constant([seed, 0], tf.int64)),
                num_parallel_calls=tf.data.AUTOTUNE)
    return pipeline.with_options(ds.prefetch(tf.data.AUTOTUNE), config).as_numpy_iterator()

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


def run_kinds(args) -> Dict[str, Any]:
  """Examples/s (and per core) of each data kind in `args.kinds` (default: all)."""
  # Resolved on a copy: the flags stay as given.
  args = argparse.Namespace(**vars(args))
  args.threads = args.threads or os.cpu_count()
  args.batch_size = args.batch_size or _DEFAULT_BATCH_SIZE
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


# --------------------------------------------------------------------------------------------
# A config's own training input.


def _packed_examples(batch: Dict[str, np.ndarray]) -> int:
  """Examples packed into a batch of prefix-LM rows.

  Segments are numbered 1..k in each row (0 is padding), so a row's largest segment id is
  the number of examples in it.
  """
  segments = batch["decoder_segment_ids"]
  return int(segments.max(axis=-1, initial=0).sum())


def _shapes(batch: Dict[str, np.ndarray]) -> Dict[str, Dict[str, Any]]:
  return {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in sorted(batch.items())}


def _threads(config, requested: Optional[int]) -> int:
  """Threads the per-core figures divide by; tf.data's pool is pinned to them
  (`input.threads`, read by both pipelines through `pipeline.with_options`)."""
  threads = requested or config.input.threads or os.cpu_count()
  config.input.threads = threads
  return threads


def run_config(args, overrides: List[str]) -> Dict[str, Any]:
  """Times exactly the batches `vlpjax.train` would read for `args.config`."""
  from vlpjax import families  # pylint: disable=g-import-not-at-top
  from vlpjax import trainer  # pylint: disable=g-import-not-at-top
  from vlpjax import train  # pylint: disable=g-import-not-at-top
  config = train.load_config(args.config, overrides)
  trainer.import_data_modules(config)
  family = families.get_family(config)
  threads = _threads(config, args.threads)
  packed = family.input_format == "prefix_lm"
  print(f"data --config {args.config}: {family.input_format} batches of "
        f"{config.global_batch_size}, {threads} threads", file=sys.stderr)

  # The first batches also render the embedded sources (minutes for the video demo), as
  # they do when the trainer starts: timed apart as the start-up cost.
  started = time.perf_counter()
  batches = trainer.make_train_batches(config, family, start_position=0)
  for _ in range(args.warmup):
    batch = next(batches)
  startup = time.perf_counter() - started
  counts_tasks = hasattr(batches, "task_counts")
  if counts_tasks and packed:
    # Packed rows: the counts are of examples drawn since the previous call, so this call
    # sets the baseline at the end of the warm-up.
    batches.task_counts(None)
  by_task: Dict[str, int] = {}
  segment_examples = 0
  start = time.perf_counter()
  for _ in range(args.batches):
    batch = next(batches)
    # Counting is part of the loop the trainer runs too (it logs per-task counts).
    if counts_tasks:
      for name, n in batches.task_counts(batch).items():
        by_task[name] = by_task.get(name, 0) + n
    if packed:
      segment_examples += _packed_examples(batch)
  seconds = time.perf_counter() - start

  per_sec = args.batches * config.global_batch_size / seconds
  results = {
      "benchmark": "data", "config": args.config, "overrides": list(overrides),
      "family": config.family, "input_format": family.input_format, "task": config.input.task,
      "threads": threads, "cpu_count": os.cpu_count(),
      # What one of the trainer's batches holds: `global_batch_size` of them.
      "batch_unit": "packed rows" if packed else "examples",
      "global_batch_size": config.global_batch_size, "batches": args.batches,
      "warmup": args.warmup, "startup_s": startup, "seconds": seconds,
      "examples": args.batches * config.global_batch_size,
      "examples_per_sec": per_sec, "examples_per_sec_per_core": per_sec / threads,
      "batch_shapes": _shapes(batch),
  }
  if packed:
    results.update(
        rows=results["examples"], rows_per_sec=per_sec, rows_per_sec_per_core=per_sec / threads,
        packed_examples=segment_examples,
        packed_examples_per_sec=segment_examples / seconds,
        packed_examples_per_sec_per_core=segment_examples / seconds / threads)
  if by_task:
    counted = sum(by_task.values())
    results.update(examples_by_task=by_task, task_counted_examples=counted,
                   task_counted_examples_per_sec=counted / seconds,
                   task_counted_examples_per_sec_per_core=counted / seconds / threads)
  line = f"{per_sec:.0f} {'rows' if packed else 'ex'}/s, {per_sec / threads:.0f} per core"
  if packed:
    line += (f"; {segment_examples / seconds:.0f} packed ex/s, "
             f"{segment_examples / seconds / threads:.0f} per core")
  print(line, file=sys.stderr)
  return results
