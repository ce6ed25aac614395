"""Train a model from an experiment config.

  python -m vlpjax.train --config experiments/siglip_shapes.py[:key=val,flag] \\
      --workdir DIR [--config.a.b=value ...]

Configs: Python files in experiments/ with `get_config(arg)`; the text after ':' is passed as
`arg` (e.g. `batch=32768,scan`). `--config.a.b=value` overrides any key after loading; values
are Python literals of the key's type. Unknown keys and typos fail before any work, naming the
nearest valid keys. The effective config is written to WORKDIR/config.json.

Workdir and resuming: checkpoints go to WORKDIR/checkpoints (Orbax), metrics to
WORKDIR/metrics.jsonl and WORKDIR/tensorboard. Re-running the same command with the same
workdir resumes from the latest checkpoint: params, optimizer state, step, RNG (derived from
seed and step) and the input position, so the result equals an uninterrupted run.

Mesh and sharding: `config.mesh` sizes the device mesh axes (data, fsdp, tensor; one may be
-1 to take the remaining devices; `slices` > 1 spreads `data` over TPU slices). Model params
and activations carry logical axis names (embed, mlp, heads, kv, vocab, act_batch, ...);
`config.sharding_rules` is the one table that maps each name to mesh axes. Layouts:
vlpjax.sharding.parallelism('data_parallel' | 'fsdp' | 'fsdp_tensor' | 'multislice').

Several hosts (docs/scaling.md): run the same command on every host. TPU VM pods, SLURM,
Open MPI and Kubernetes are detected; elsewhere pass --config.distributed.coordinator_address=
HOST:PORT --config.distributed.num_processes=N --config.distributed.process_id=I (or set
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).

Preemption: on SIGTERM (a TPU VM's preemption notice, `scancel`, `kill`) the run saves a
checkpoint at the step it is at, waits for it to commit and exits with status 143; on a pod,
all hosts agree on that step. Re-running the command resumes from it.
"""
import argparse
import sys

from absl import logging

from vlpjax import config as config_lib
from vlpjax import host_memory


def parse_args(argv):
  parser = argparse.ArgumentParser(
      prog="python -m vlpjax.train", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, metavar="FILE.py[:ARG]",
                      help="experiment config file, optionally with ':arg' for get_config")
  parser.add_argument("--workdir", required=True,
                      help="where checkpoints, metrics and config.json go (local or gs://)")
  parser.add_argument("--print_config", action="store_true",
                      help="print the effective config and exit")
  args, rest = parser.parse_known_args(argv)
  return args, config_lib.split_overrides(parser, rest)


def load_config(spec: str, overrides) -> config_lib.ConfigDict:
  return config_lib.finalize(config_lib.load(spec), overrides)


def main(argv=None) -> int:
  # Before JAX starts its CPU client (see vlpjax/host_memory.py); may re-execute the command.
  host_memory.configure(command_line=argv is None)
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    config = load_config(args.config, overrides)
  except config_lib.ConfigError as e:
    print(f"Config error: {e}", file=sys.stderr)
    return 2
  if args.print_config:
    print(config)
    return 0
  logging.set_verbosity(logging.WARNING)
  from vlpjax import trainer  # pylint: disable=g-import-not-at-top  (fast --help, config errors)
  try:
    trainer.Loop(config, args.workdir).run()
  except (config_lib.ConfigError, trainer.NonFiniteLossError, trainer.InputError) as e:
    print(f"Error: {e}", file=sys.stderr)
    return 1
  except trainer.preemption.PreemptedError as e:
    print(str(e), file=sys.stderr)
    return e.exit_code
  return 0


if __name__ == "__main__":
  sys.exit(main())
