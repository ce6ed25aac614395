"""Benchmarks that write JSON: `python -m tools.benchmark {train,data,checkpoint} [flags]`.

  train       the trainer's step for a config: median step time, examples/s, analytic model
              FLOPs, XLA's FLOPs, MFU against the measured CPU matmul peak or the accelerator's
              spec-sheet peak, memory (tools/bench_train.py); `--reference big_vision`
  data        input-pipeline examples/s (per core) per data kind, or a config's own input
              (tools/bench_data.py)
  checkpoint  async-save blocking time vs a synchronous save, and restore time, for a
              synthetic state of N MiB or a config's train state (tools/bench_checkpoint.py)

`--config.a.b=value` items after the flags override the config (as for training). The JSON
goes to stdout and, with `--out FILE`, to FILE; progress goes to stderr. Timings are never
asserted by tests: docs/benchmarks.md records what these printed, with the machine.
"""
import argparse
import json
import os
import sys
from typing import List, Optional

# TensorFlow (the input pipeline) stays quiet and off accelerators.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tools import bench_checkpoint  # noqa: E402
from tools import bench_data  # noqa: E402
from tools import bench_train  # noqa: E402

SUBCOMMANDS = {
    "train": (bench_train, "the train step: step time, model FLOPs, MFU"),
    "data": (bench_data, "input pipeline examples/s per data kind or config"),
    "checkpoint": (bench_checkpoint, "async checkpoint blocking time, save and restore"),
}


def parse_args(argv: Optional[List[str]]):
  from vlpjax import config as config_lib  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(prog="python -m tools.benchmark", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", help="write the JSON here as well as to stdout")
  sub = parser.add_subparsers(dest="command", required=True)
  for name, (module, help_text) in SUBCOMMANDS.items():
    module.add_arguments(sub.add_parser(name, help=help_text, description=module.__doc__,
                                        formatter_class=argparse.RawDescriptionHelpFormatter))
  args, rest = parser.parse_known_args(argv)
  return args, config_lib.split_overrides(parser, rest)


def main(argv: Optional[List[str]] = None) -> int:
  from vlpjax import config as config_lib  # pylint: disable=g-import-not-at-top
  from vlpjax import host_memory  # pylint: disable=g-import-not-at-top
  # First, before JAX starts its CPU client: steps without 4 KiB page faults
  # (vlpjax/host_memory.py); from the command line this may re-execute the process once.
  host_malloc = host_memory.configure(command_line=argv is None)
  args, overrides = parse_args(argv)
  module, _ = SUBCOMMANDS[args.command]
  try:
    results = module.run(args, overrides)
    results["host_malloc"] = host_malloc
  except (config_lib.ConfigError, ValueError) as e:
    print(f"benchmark {args.command}: {e}", file=sys.stderr)
    return 2
  text = json.dumps(results, indent=2, default=str)
  if args.out:  # First: minutes of measurements must not hang on stdout being open.
    with open(args.out, "w") as f:
      f.write(text + "\n")
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
