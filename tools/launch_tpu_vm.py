"""Launches `vlpjax.train` on every worker of a Cloud TPU VM (one host or a pod slice).

  python -m tools.launch_tpu_vm --name my-pod --zone us-east5-a --accelerator v5p-256 \\
      --config experiments/siglip_b16.py:batch=32768 --workdir gs://BUCKET/siglip_b16 \\
      [--create [--spot | --preemptible] [--version RUNTIME]] [--project P] [--run] \\
      [--config.a.b=value ...]
  python -m tools.launch_tpu_vm --name my-pod --zone us-east5-a --stop [--run]
  python -m tools.launch_tpu_vm --name my-pod --zone us-east5-a --delete [--run]

Without `--run` nothing is executed: the commands are printed one per line, a shell script to
read, edit or paste. With `--run` those same lines run in order (`sh -c`) and the first failure
stops the launch. The steps:
  1. (`--create`) `gcloud compute tpus tpu-vm create`, spot or preemptible if asked.
  2. A tarball of the checkout as git sees it (tracked and untracked files, uncommitted edits
     included, nothing git ignores), copied to every worker (`tpu-vm scp --worker=all`).
  3. On every worker: unpack into ~/vlpjax-code, a Python 3.11 venv in ~/vlpjax-venv,
     `pip install -c constraints.txt -e .[tpu]`.
  4. On every worker the same `python -m vlpjax.train --config ... --workdir ... --config.x=y`,
     under setsid + nohup (an ssh drop does not stop it), appending to ~/vlpjax-train.log;
     its pid goes to ~/vlpjax-train.pid. JAX finds the other workers of the slice by itself
     (the process index comes from the TPU metadata), so no worker gets flags of its own.

Re-running the same launch resumes: the trainer restarts from the latest checkpoint in the
workdir. Steps 3 and 4 refuse to touch a worker where a trainer is still running; `--stop` ends
it with SIGTERM (the trainer checkpoints its step and exits), then SIGKILL after five minutes.
The config is loaded and validated here first, exactly as the trainer will: a bad key fails in
seconds instead of after the pod has started. A pod needs a gs:// workdir: with a local path
every worker would write its own partial checkpoints.
"""
import argparse
import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from typing import List, Optional, Sequence

from vlpjax import config as config_lib
from vlpjax.registry import nearest

# The checkout that is shipped: the directory holding vlpjax/ and tools/.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Everything on a worker lives in its home directory (where `tpu-vm ssh` and `scp` start).
REMOTE_TARBALL = "vlpjax-code.tar.gz"
REMOTE_CODE = "vlpjax-code"
REMOTE_VENV = "vlpjax-venv"
REMOTE_LOG = "vlpjax-train.log"
REMOTE_PID = "vlpjax-train.pid"
TRAIN_MODULE = "vlpjax.train"
# How long --stop waits for the trainer's checkpoint after SIGTERM before SIGKILL.
STOP_GRACE_S = 300


@dataclasses.dataclass(frozen=True)
class TpuFamily:
  """Accelerator names `<prefix>-<N>`: N counts TensorCores (v4, v5p) or chips (v5e, v6e)."""
  prefix: str
  sizes: Sequence[int]
  single_host_max: int   # the largest N that is one VM; larger slices are pods (multi-host)
  runtime: str           # default `--version`: the TPU runtime image for this family


# gcloud itself rejects a slice shape the pod cannot form; this table catches typos (v5e-256 is
# spelled v5litepod-256) and tells single hosts from pods before anything is paid for.
FAMILIES = (
    TpuFamily("v4", tuple(range(8, 8192 + 1, 8)), 8, "tpu-ubuntu2204-base"),
    TpuFamily("v5p", tuple(range(8, 12288 + 1, 8)), 8, "v2-alpha-tpuv5"),
    TpuFamily("v5litepod", (1, 4, 8, 16, 32, 64, 128, 256), 8, "v2-alpha-tpuv5-lite"),
    TpuFamily("v6e", (1, 4, 8, 16, 32, 64, 128, 256), 8, "v2-alpha-tpuv6e"),
)


# How people say it -> how gcloud spells it.
_OTHER_SPELLINGS = {"v5e": "v5litepod", "v5lite": "v5litepod", "v6": "v6e"}


@dataclasses.dataclass(frozen=True)
class Accelerator:
  name: str
  family: TpuFamily
  size: int

  @property
  def multi_host(self) -> bool:
    return self.size > self.family.single_host_max


def parse_accelerator(name: str) -> Accelerator:
  """`v5p-256` -> Accelerator; an unknown name is a ValueError naming the nearest known ones."""
  prefix, _, size = name.rpartition("-")
  for family in FAMILIES:
    if prefix == family.prefix and size.isdigit() and int(size) in family.sizes:
      return Accelerator(name, family, int(size))
  known_names = [f"{f.prefix}-{n}" for f in FAMILIES for n in f.sizes]
  respelled = f"{_OTHER_SPELLINGS.get(prefix)}-{size}"
  near = [respelled] if respelled in known_names else nearest(name, known_names)
  hint = f" Did you mean {' or '.join(near)}?" if near else ""
  known = "; ".join(f"{f.prefix}-N, N in {_sizes_text(f.sizes)}" for f in FAMILIES)
  raise ValueError(f"--accelerator {name!r} is not a known TPU type.{hint} Known: {known}.")


def _sizes_text(sizes: Sequence[int]) -> str:
  if len(sizes) > 10:
    return f"{sizes[0]}, {sizes[1]}, ..., {sizes[-1]} (multiples of {sizes[0]})"
  return ", ".join(map(str, sizes))


def check_workdir(workdir: str, accelerator: Optional[Accelerator]) -> None:
  """A pod needs one shared workdir (gs://); a single host may use an absolute local path."""
  if workdir.startswith("gs://"):
    if not workdir[len("gs://"):].strip("/"):
      raise ValueError(f"--workdir {workdir!r} names no bucket: use gs://BUCKET/path.")
    return
  if "://" in workdir:
    raise ValueError(f"--workdir {workdir!r}: only gs:// or a local path on the TPU VM works.")
  if accelerator is None or accelerator.multi_host:
    what = (f"{accelerator.name} has several workers" if accelerator else
            "without --accelerator the TPU VM may be a pod")
    raise ValueError(
        f"--workdir {workdir!r} is a local path, but {what}: each worker would write its own "
        f"partial checkpoints and no resume could read them. Use gs://BUCKET/path.")
  if not workdir.startswith("/"):
    raise ValueError(f"--workdir {workdir!r}: a local workdir on the TPU VM must be an absolute "
                     f"path (the code directory is replaced on every launch).")


def check_name(name: str) -> None:
  if not re.fullmatch(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", name):
    raise ValueError(f"--name {name!r}: TPU names are lowercase letters, digits and '-', "
                     f"starting with a letter, at most 63 characters.")


# --- what is shipped: the checkout as git sees it ---------------------------------------------

def _git(root: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, check=False)


# Tracked and untracked files, minus what .gitignore excludes (venvs, workdirs, caches).
_LIST_SHIPPED = ("ls-files", "-z", "--cached", "--others", "--exclude-standard")


def code_version(root: str = REPO_ROOT) -> str:
  """The commit the shipped code is based on, `-dirty` when it has uncommitted edits."""
  result = _git(root, "describe", "--always", "--dirty", "--abbrev=12")
  if result.returncode:
    raise ValueError(f"{root} is not a git checkout with a commit ({result.stderr.strip()}): "
                     f"the launcher ships the files git lists.")
  return result.stdout.strip()


def shipped_config(spec: str, root: str = REPO_ROOT) -> str:
  """`path.py[:arg]` -> the spec with the path relative to the repo (the workers' cwd), after
  checking that the file is one that is shipped."""
  path, colon, arg = spec.partition(":")
  relative = os.path.relpath(os.path.abspath(path), root)
  if relative == os.pardir or relative.startswith(os.pardir + os.sep):
    raise ValueError(f"--config {path!r} is outside the repository {root}: only the repository "
                     f"is shipped to the workers. Put the config under experiments/.")
  listed = _git(root, *_LIST_SHIPPED, "--", relative).stdout
  if not listed:
    raise ValueError(f"--config {relative!r} is ignored by git (.gitignore), so it would not "
                     f"be shipped to the workers. Move it, e.g. under experiments/.")
  return relative + colon + arg


def local_tarball(name: str) -> str:
  return os.path.join(tempfile.gettempdir(), f"vlpjax-code-{name}.tar.gz")


def archive_command(tarball: str, root: str = REPO_ROOT) -> str:
  pack = ["tar", "-C", root, "--null", "-T", "-", "-czf", tarball]
  return f"{shlex.join(['git', '-C', root, *_LIST_SHIPPED])} | {shlex.join(pack)}"


# --- gcloud -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Target:
  name: str
  zone: str
  project: Optional[str] = None

  def gcloud(self, verb: str, *flags: str, positional: Sequence[str] = ()) -> str:
    """`gcloud compute tpus tpu-vm VERB [POSITIONAL or NAME] --zone=Z FLAGS [--project=P]`."""
    project = [f"--project={self.project}"] if self.project else []
    return shlex.join(["gcloud", "compute", "tpus", "tpu-vm", verb,
                       *(positional or [self.name]), f"--zone={self.zone}", *flags, *project])

  def on_all_workers(self, script: str) -> str:
    return self.gcloud("ssh", "--worker=all", f"--command={script}")


def create_command(target: Target, accelerator: Accelerator, version: str,
                   provisioning: Optional[str]) -> str:
  """`provisioning`: None, 'spot' or 'preemptible'."""
  extra = [f"--{provisioning}"] if provisioning else []
  return target.gcloud("create", f"--accelerator-type={accelerator.name}",
                       f"--version={version}", *extra)


def copy_command(target: Target, tarball: str) -> str:
  return target.gcloud("scp", "--worker=all",
                       positional=(tarball, f"{target.name}:{REMOTE_TARBALL}"))


# --- shell run on the workers (POSIX sh; `tpu-vm ssh` starts it in the home directory) ---------

def _is_trainer(pid: str) -> str:
  """Shell test: is `pid` a live vlpjax trainer? A stale pid file (after a reboot) may name an
  unrelated process, so its command line is checked, not just that it exists."""
  return f'grep -qs {TRAIN_MODULE} "/proc/{pid}/cmdline"'


_READ_PID = f'pid=$(cat "$HOME/{REMOTE_PID}" 2>/dev/null)'
_REFUSE_IF_RUNNING = (
    f"{_READ_PID}; if {_is_trainer('$pid')}; then echo \"vlpjax: a trainer is running on "
    f"$(hostname) (pid $pid); stop it first with --stop\" >&2; exit 1; fi")


def install_script() -> str:
  """Unpacks the shipped code, makes the venv once, installs (quick when nothing changed)."""
  pip = f"{REMOTE_VENV}/bin/pip"
  steps = [
      'cd "$HOME"',
      shlex.join(["rm", "-rf", REMOTE_CODE]),
      shlex.join(["mkdir", REMOTE_CODE]),
      shlex.join(["tar", "-xzf", REMOTE_TARBALL, "-C", REMOTE_CODE]),
      # TPU VM images come with an older Python; Ubuntu 22.04 packages 3.11.
      "{ command -v python3.11 >/dev/null || { sudo apt-get update -qq && "
      "sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11 python3.11-venv; }; }",
      f"{{ test -x {REMOTE_VENV}/bin/python || python3.11 -m venv {REMOTE_VENV}; }}",
      shlex.join([pip, "install", "-q", "--upgrade", "pip"]),
      shlex.join([pip, "install", "-q", "-c", f"{REMOTE_CODE}/constraints.txt", "-e",
                  f"{REMOTE_CODE}[tpu]"]),
  ]
  return f"{_REFUSE_IF_RUNNING}; " + " && ".join(steps)


def train_argv(config_spec: str, workdir: str, overrides: Sequence[str]) -> List[str]:
  """What every worker runs, from the code directory (the config path is repo-relative)."""
  return ([f"../{REMOTE_VENV}/bin/python", "-u", "-m", TRAIN_MODULE, "--config", config_spec,
           "--workdir", workdir] + [f"--config.{o}" for o in overrides])


def start_script(train: Sequence[str], version: str) -> str:
  """Starts `train` detached from the ssh session. The pid written is the trainer's own (setsid
  and nohup exec in place), so --stop and the running-trainer check find it."""
  log = f"../{REMOTE_LOG}"
  version = re.sub(r"[^\w.+-]", "_", version)  # it sits inside double quotes
  header = f"=== vlpjax {version} started $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
  return (f"{_REFUSE_IF_RUNNING}; cd \"$HOME/{REMOTE_CODE}\" && "
          f"echo \"{header}\" >> {log} && "
          f"{{ setsid nohup {shlex.join(train)} >> {log} 2>&1 < /dev/null & "
          f"echo $! > ../{REMOTE_PID}; }}")


def stop_script(grace_s: int = STOP_GRACE_S) -> str:
  """SIGTERM the trainer, wait up to `grace_s` for its checkpoint and exit, then SIGKILL."""
  alive = _is_trainer("$pid")
  return (f"{_READ_PID}; if {alive}; then kill \"$pid\"; i=0; "
          f"while {alive} && [ $i -lt {int(grace_s)} ]; do sleep 1; i=$((i+1)); done; "
          f"if {alive}; then kill -9 \"$pid\"; fi; "
          f"echo \"vlpjax: stopped the trainer on $(hostname)\"; "
          f"else echo \"vlpjax: no trainer running on $(hostname)\"; fi")


def launch_commands(target: Target, config_spec: str, workdir: str, overrides: Sequence[str],
                    version: str, create: Optional[str] = None,
                    root: str = REPO_ROOT) -> List[str]:
  """The launch, in order: [create], pack, copy, install, start."""
  tarball = local_tarball(target.name)
  return ([create] if create else []) + [
      archive_command(tarball, root),
      copy_command(target, tarball),
      target.on_all_workers(install_script()),
      target.on_all_workers(start_script(train_argv(config_spec, workdir, overrides), version)),
  ]


# --- command line -----------------------------------------------------------------------------

def parse_args(argv: Sequence[str]):
  parser = argparse.ArgumentParser(prog="python -m tools.launch_tpu_vm", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--name", required=True, help="TPU VM name")
  parser.add_argument("--zone", required=True, help="e.g. us-east5-a")
  parser.add_argument("--project", help="Google Cloud project (default: gcloud's)")
  parser.add_argument("--accelerator", help="e.g. v5p-256, v4-32, v5litepod-16, v6e-8; needed "
                      "with --create, and for a local --workdir (single host only)")
  parser.add_argument("--config", metavar="FILE.py[:ARG]", help="experiment config in the repo")
  parser.add_argument("--workdir", help="gs://BUCKET/path: checkpoints, metrics; resumes")
  parser.add_argument("--create", action="store_true", help="create the TPU VM first")
  provisioning = parser.add_mutually_exclusive_group()
  provisioning.add_argument("--spot", action="store_true", help="with --create: a spot VM")
  provisioning.add_argument("--preemptible", action="store_true",
                            help="with --create: a preemptible VM (older TPU generations)")
  parser.add_argument("--version", help="with --create: the TPU runtime image (default: the "
                      "accelerator family's, e.g. v2-alpha-tpuv5 for v5p)")
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument("--stop", action="store_true", help="stop the trainer on every worker")
  mode.add_argument("--delete", action="store_true", help="delete the TPU VM")
  parser.add_argument("--run", action="store_true",
                      help="execute the commands (default: only print them)")
  args, rest = parser.parse_known_args(argv)
  overrides = config_lib.split_overrides(parser, rest)
  if args.stop or args.delete:
    extra = [flag for flag, given in (("--config", args.config), ("--workdir", args.workdir),
                                      ("--create", args.create), ("--config.*", overrides))
             if given]
    if extra:
      parser.error(f"--stop / --delete take no {', '.join(extra)}")
  else:
    missing = [f"--{key}" for key in ("config", "workdir") if getattr(args, key) is None]
    if missing:
      parser.error(f"{' and '.join(missing)} required to launch (or --stop / --delete)")
  return args, overrides


def plan(args, overrides: Sequence[str], root: str = REPO_ROOT) -> List[str]:
  """Checks everything checkable here; returns the shell commands. ValueError names a problem
  (ConfigError, a ValueError, for the config)."""
  check_name(args.name)
  target = Target(args.name, args.zone, args.project)
  if args.stop:
    return [target.on_all_workers(stop_script())]
  if args.delete:
    return [target.gcloud("delete", "--quiet")]
  accelerator = parse_accelerator(args.accelerator) if args.accelerator else None
  if args.create and accelerator is None:
    raise ValueError("--create needs --accelerator (e.g. --accelerator v5p-256).")
  if (args.spot or args.preemptible or args.version) and not args.create:
    raise ValueError("--spot, --preemptible and --version only apply with --create.")
  check_workdir(args.workdir, accelerator)
  # The trainer's own loading: a bad key fails here, before any machine is paid for.
  from vlpjax import train  # pylint: disable=g-import-not-at-top  (fast --help and --stop)
  train.load_config(args.config, overrides)
  spec = shipped_config(args.config, root)
  create = None
  if args.create:
    provisioning = "spot" if args.spot else "preemptible" if args.preemptible else None
    create = create_command(target, accelerator, args.version or accelerator.family.runtime,
                            provisioning)
  return launch_commands(target, spec, args.workdir, overrides, code_version(root), create, root)


def run_commands(commands: Sequence[str]) -> int:
  """Runs the command lines in order with `sh -c`; the first failure stops, naming its step
  (the command's own error message has already gone to the terminal)."""
  for i, command in enumerate(commands, 1):
    print(f"[{i}/{len(commands)}] {command}", file=sys.stderr, flush=True)
    returncode = subprocess.run(command, shell=True, check=False).returncode
    if returncode:
      print(f"Error: step {i} of {len(commands)} failed with exit status {returncode}: "
            f"{command}", file=sys.stderr)
      return 1
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  if args.run and shutil.which("gcloud") is None:
    print("Error: `gcloud` is not on PATH. Install the Google Cloud CLI "
          "(https://cloud.google.com/sdk/docs/install) and run `gcloud auth login`, or leave "
          "out --run to print the commands instead.", file=sys.stderr)
    return 1
  try:
    commands = plan(args, overrides)
  except config_lib.ConfigError as e:
    print(f"Config error: {e}", file=sys.stderr)
    return 2
  except ValueError as e:
    print(f"Error: {e}", file=sys.stderr)
    return 2
  if not args.run:
    print("\n".join(commands))
    print("(dry run: nothing was executed; --run executes these lines)", file=sys.stderr)
    return 0
  returncode = run_commands(commands)
  if returncode == 0 and not (args.stop or args.delete):
    follow = Target(args.name, args.zone, args.project).gcloud(
        "ssh", "--worker=0", f"--command=tail -f {REMOTE_LOG}")
    print(f"Started. Worker 0's log: {follow}", file=sys.stderr)
  return returncode


if __name__ == "__main__":
  sys.exit(main())
