"""Offline caching of seqio tasks with Apache Beam, and reading the caches back.

A task is cacheable when its preprocessors contain one `seqio.CacheDatasetPlaceholder()`:
everything before it (deterministic work: reading, decoding records, filtering,
tokenizing) runs once, offline, in a Beam pipeline (seqio's `cache_tasks_main`);
everything after it (random choices, anything that depends on the run) runs on the
fly on the cached examples. Training reads the cache with
`task.get_dataset(..., use_cached=True)` once the cache's directory is registered
(`use_cache_dir`).

What seqio writes for task `name` under the output directory (`name`'s ':' become
path separators, `seqio.get_task_dir_from_name`):

  {split}.tfrecord-SSSSS-of-NNNNN  tf.train.Examples, one per example, shuffled
  info.{split}.json                feature dtypes and shapes, used to parse them
  stats.{split}.json               example and token counts
  COMPLETED                        written last; a task without it is not cached

What survives the round trip: scalars and lists of strings, int32/int64/bool and
float32 features of any fixed inner shape, and ragged int/float/string features
(stored with their row lengths). What does not: uint8 features (TF's example parser
has no uint8, so reading fails), and dense features whose inner dimensions vary
between examples (the inner shape is taken from one example). Images are therefore
cached encoded (JPEG/PNG bytes) and decoded after the placeholder; see
`data_mixtures/shapes.py` for a cacheable task and docs/cache.md for running the
pipeline on a distributed Beam runner.

Public API:
  cache_tasks(names, output_dir, ...)   runs seqio's Beam pipeline in a subprocess
  cache_command(names, output_dir, ...) the command line it runs (to run elsewhere)
  use_cache_dir(path)                    where `use_cached=True` looks first
  check_cached(name, split)              a clear error unless `name` is cached
  leaf_tasks(name)                       the seqio tasks of a task or mixture
"""
import csv
import importlib
import importlib.util
import io
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, Iterable, List, Optional, Sequence

import seqio
import tensorflow as tf

from vlpjax.registry import unknown_name_message

DEFAULT_MODULE_IMPORTS = ("data_mixtures",)
_ENTRY_POINT = "seqio.scripts.cache_tasks_main"
_LOG_TAIL_LINES = 40


class NotCachedError(ValueError):
  """`use_cached=True` for a task (or split) that has no complete offline cache."""


class CacheError(RuntimeError):
  """The Beam caching pipeline failed or did not write a task it was asked for."""


def use_cache_dir(cache_dir: str) -> None:
  """Makes `use_cached=True` look for caches in `cache_dir` before other directories.

  Any path TF's gfile reads works (local, gs://, ...). A task remembers the first
  directory it was found cached in, so call this before the first `get_dataset`.
  """
  others = [d for d in seqio.get_global_cache_dirs() if d != cache_dir]
  seqio.set_global_cache_dirs([cache_dir] + others)


def leaf_tasks(provider_name: str) -> List[seqio.Task]:
  """The task `provider_name`, or every task of the (nested) mixture of that name."""
  provider = seqio.get_mixture_or_task(provider_name)
  if isinstance(provider, seqio.Mixture):
    return list(provider.tasks)
  return [provider]


def _task_cache_dirs(task: seqio.Task) -> List[str]:
  return [os.path.join(d, seqio.get_task_dir_from_name(task.name))
          for d in seqio.get_global_cache_dirs()]


def _how_to_cache(task_name: str) -> str:
  return ("Cache it with `python -m vlpjax.data.cache --tasks=" + task_name +
          " --output_cache_dir=DIR` (docs/cache.md) and set input.cache_dir=DIR, "
          "or set input.use_cached=False.")


def _not_cacheable_message(task: seqio.Task) -> str:
  return (f"task {task.name!r} cannot be cached: its preprocessors have no "
          "seqio.CacheDatasetPlaceholder() (put one after the deterministic steps, "
          "before anything random).")


def check_cached(provider_name: str, split: str) -> None:
  """Raises `NotCachedError` unless every task of `provider_name` has `split` cached.

  seqio itself quietly falls back to on-the-fly preprocessing for a task without a
  placeholder and fails with a bare assertion for a task that is not cached; this
  names the task, the split, the directories searched and how to build the cache.
  """
  for task in leaf_tasks(provider_name):
    if not task.supports_caching:
      raise NotCachedError(f"use_cached=True, but {_not_cacheable_message(task)}")
    searched = _task_cache_dirs(task)
    if not task.cache_dir:
      raise NotCachedError(
          f"use_cached=True, but task {task.name!r} is not cached: no COMPLETED file "
          f"in any cache directory (searched {searched or 'none: no cache dir is set'}). "
          + _how_to_cache(task.name))
    info = seqio.utils.get_cached_info_path(task.cache_dir, split)
    if not tf.io.gfile.exists(info):
      raise NotCachedError(
          f"use_cached=True, but the cache of task {task.name!r} at {task.cache_dir} "
          f"has no split {split!r} (missing {info}); cached splits are those with an "
          "info.<split>.json there.")


def _import_modules(module_imports: Iterable[str]) -> None:
  for module in module_imports:
    try:
      importlib.import_module(module)
    except ModuleNotFoundError as e:
      raise ValueError(f"cannot import task module {module!r} (module_imports): {e}. "
                       "Is its directory on PYTHONPATH?") from None


def _cacheable_tasks(names: Sequence[str]) -> List[str]:
  """Leaf task names of `names` (tasks or mixtures); each must be cacheable."""
  known = set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())
  tasks = []
  for name in names:
    if name not in known:
      raise ValueError("cache_tasks: " + unknown_name_message(
          "seqio task or mixture", name, known) + " Is its module in module_imports?")
    for task in leaf_tasks(name):
      if not task.supports_caching:
        raise ValueError(f"cache_tasks: {_not_cacheable_message(task)}")
      if task.name not in tasks:
        tasks.append(task.name)
  return tasks


def _csv_list(values: Sequence[str]) -> str:
  # absl list flags are parsed as one CSV row, so an option holding a comma
  # (--experiments=a,b) survives when quoted.
  out = io.StringIO()
  csv.writer(out, lineterminator="").writerow(values)
  return out.getvalue()


def cache_command(task_names: Sequence[str], output_dir: str, runner: str = "DirectRunner",
                  module_imports: Sequence[str] = DEFAULT_MODULE_IMPORTS,
                  extra_pipeline_options: Sequence[str] = (), *,
                  min_shards: Optional[int] = None, max_shards: Optional[int] = None,
                  overwrite: bool = False) -> List[str]:
  """The argv of seqio's caching pipeline for exactly `task_names` (leaf tasks).

  `extra_pipeline_options` are Beam options such as "--project=p" or
  "--temp_location=gs://b/tmp"; `min_shards` / `max_shards` bound the number of
  output files per split (seqio's default minimum is 64).
  """
  # seqio takes regexes; the names are matched exactly.
  argv = [sys.executable, "-m", _ENTRY_POINT,
          "--tasks=" + ",".join(re.escape(n) for n in task_names),
          f"--output_cache_dir={output_dir}",
          "--pipeline_options=" + _csv_list([f"--runner={runner}",
                                             *extra_pipeline_options])]
  argv += [f"--module_import={m}" for m in module_imports]
  if min_shards is not None:
    argv.append(f"--min_shards={min_shards}")
  if max_shards is not None:
    argv.append(f"--max_shards={max_shards}")
  if overwrite:
    argv.append("--overwrite")
  return argv


def _import_roots(module_imports: Iterable[str]) -> List[str]:
  """Directories that make `module_imports` importable (as they are here)."""
  roots = []
  for module in module_imports:
    spec = importlib.util.find_spec(module.split(".")[0])
    if spec is None:
      continue
    if spec.submodule_search_locations:  # A package: its parent directory.
      paths = [os.path.dirname(p) for p in spec.submodule_search_locations]
    else:
      paths = [os.path.dirname(spec.origin)] if spec.origin else []
    roots += [p for p in paths if p not in roots]
  return roots


def _subprocess_env(module_imports: Sequence[str]) -> Dict[str, str]:
  env = dict(os.environ)
  # vlpjax itself, and each task module, as this process imports them.
  roots = _import_roots(["vlpjax", *module_imports])
  old = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
  env["PYTHONPATH"] = os.pathsep.join(roots + [p for p in old if p not in roots])
  return env


def _tail(path: str, lines: int = _LOG_TAIL_LINES) -> str:
  with open(path, errors="replace") as f:
    return "".join(f.readlines()[-lines:])


def cache_tasks(task_names: Sequence[str], output_dir: str, runner: str = "DirectRunner",
                module_imports: Sequence[str] = DEFAULT_MODULE_IMPORTS,
                extra_pipeline_options: Sequence[str] = (), *,
                min_shards: Optional[int] = None, max_shards: Optional[int] = None,
                overwrite: bool = False, timeout_s: Optional[float] = None) -> Dict[str, str]:
  """Caches tasks (mixtures: their tasks) into `output_dir` with Beam's `runner`.

  seqio's pipeline runs in a subprocess, so that Beam and absl parse their own
  flags there and a failed or hung job cannot take this process down. The task
  modules are imported here first, to fail fast on unknown or uncacheable names,
  and again in the pipeline (and its workers, on a distributed runner).
  Tasks already cached in `output_dir` are left as they are unless `overwrite`.

  Returns {task name: its cache directory}. Raises `CacheError` with the end of
  the pipeline's log if it fails or leaves a task without its COMPLETED file.
  """
  if not task_names:
    raise ValueError("cache_tasks: no task names given.")
  _import_modules(module_imports)
  tasks = _cacheable_tasks(task_names)
  argv = cache_command(tasks, output_dir, runner, module_imports, extra_pipeline_options,
                       min_shards=min_shards, max_shards=max_shards, overwrite=overwrite)
  fd, log_path = tempfile.mkstemp(prefix="vlpjax_cache_", suffix=".log")
  with os.fdopen(fd, "w") as log:
    try:
      result = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT,
                              env=_subprocess_env(module_imports), timeout=timeout_s,
                              check=False)
    except subprocess.TimeoutExpired:
      raise CacheError(f"caching {tasks} did not finish in {timeout_s} s; log: {log_path}\n"
                       f"{_tail(log_path)}") from None
  if result.returncode != 0:
    raise CacheError(f"caching {tasks} with {runner} failed (exit code "
                     f"{result.returncode}); command: {' '.join(argv)}\nlog: {log_path}, "
                     f"last lines:\n{_tail(log_path)}")
  written = {t: os.path.join(output_dir, seqio.get_task_dir_from_name(t)) for t in tasks}
  missing = [t for t, d in written.items()
             if not tf.io.gfile.exists(os.path.join(d, "COMPLETED"))]
  if missing:
    raise CacheError(f"the caching pipeline finished but wrote no COMPLETED file for "
                     f"{missing} under {output_dir}; log: {log_path}\n{_tail(log_path)}")
  os.remove(log_path)
  return written


def main(argv: Optional[Sequence[str]] = None) -> None:
  """`python -m vlpjax.data.cache --tasks=a,b --output_cache_dir=DIR [--runner=R]
  [--module_import=m ...] [--min_shards=N] [--overwrite] [-- beam options...]`."""
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog="python -m vlpjax.data.cache",
                                   description="Cache seqio tasks offline with Beam.")
  parser.add_argument("--tasks", required=True, help="comma-separated tasks or mixtures")
  parser.add_argument("--output_cache_dir", required=True)
  parser.add_argument("--runner", default="DirectRunner")
  parser.add_argument("--module_import", action="append", default=None,
                      help=f"task modules to import (default: {DEFAULT_MODULE_IMPORTS})")
  parser.add_argument("--min_shards", type=int, default=None)
  parser.add_argument("--max_shards", type=int, default=None)
  parser.add_argument("--overwrite", action="store_true")
  parser.add_argument("beam_options", nargs="*",
                      help="Beam pipeline options after '--', e.g. --project=p")
  args = parser.parse_args(argv)
  try:
    written = cache_tasks(
        [t for t in args.tasks.split(",") if t], args.output_cache_dir, args.runner,
        tuple(args.module_import or DEFAULT_MODULE_IMPORTS), tuple(args.beam_options),
        min_shards=args.min_shards, max_shards=args.max_shards, overwrite=args.overwrite)
  except (ValueError, CacheError) as e:  # Our messages say it all; no traceback.
    raise SystemExit(f"{parser.prog}: error: {e}") from None
  for task, path in written.items():
    print(f"{task}: {path}")


if __name__ == "__main__":
  main()
