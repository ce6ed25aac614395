"""tools.launch_tpu_vm: the printed commands, their validation, and the commands actually run.

The gcloud lines are parsed back with shlex and checked piece by piece. The scripts meant for the
workers are run here by a real shell in a scratch home directory (fake `python3.11`, `pip` and
trainer stand in for the TPU VM's), and `--run` runs against a fake `gcloud` on PATH that
records its arguments: both are real subprocesses, nothing of the launcher is mocked.
"""
import os
import shlex
import signal
import stat
import subprocess
import sys
import tarfile
import time

import pytest

from tools import launch_tpu_vm as launch

ROOT = launch.REPO_ROOT
CONFIG = "experiments/siglip_b16.py:batch=1024,steps=10"
# Overrides a naive launcher would mangle: spaces, both quote kinds, a pipe, parentheses, a glob.
OVERRIDES = ['--config.input.pp=resize(224, method="bilinear")|value_range(-1, 1)',
             "--config.input.task=it's a \"quoted\" task",
             "--config.input.files.train=gs://b/data dir/train-*.tfrecord"]
WORKDIR = "gs://my-bucket/run 1"
LAUNCH = ["--name", "my-pod", "--zone", "us-east5-a", "--accelerator", "v5p-256",
          "--config", CONFIG, "--workdir", WORKDIR] + OVERRIDES
SHELL_OPERATORS = (">>", ">", "&", "&&", ";", "|", "2>&1", "<")


def dry_run(capsys, argv):
  assert launch.main(argv) == 0
  out = capsys.readouterr().out
  return [shlex.split(line) for line in out.splitlines()]


def remote_script(ssh_argv, name="my-pod", zone="us-east5-a"):
  """The --command of a `tpu-vm ssh` argv, after checking it targets every worker."""
  assert ssh_argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", name]
  assert "--worker=all" in ssh_argv and f"--zone={zone}" in ssh_argv
  (command,) = [a for a in ssh_argv if a.startswith("--command=")]
  return command[len("--command="):]


def module_index(words):
  """Where `-m vlpjax.train` names the module (the scripts also grep for the name)."""
  (i,) = [i for i in range(1, len(words)) if words[i - 1:i + 1] == ["-m", "vlpjax.train"]]
  return i


def train_args_in(script):
  """The arguments after `-m vlpjax.train` in a worker script, up to the first redirection."""
  words = shlex.split(script)
  start = module_index(words) + 1
  end = next(i for i in range(start, len(words)) if words[i] in SHELL_OPERATORS)
  return words[start:end]


def test_dry_run_prints_create_copy_install_and_the_same_train_command_on_all_workers(capsys):
  lines = dry_run(capsys, LAUNCH + ["--create", "--spot", "--project", "proj-1"])
  assert len(lines) == 5
  create, archive, copy, install, start = lines
  assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-pod",
                    "--zone=us-east5-a", "--accelerator-type=v5p-256",
                    "--version=v2-alpha-tpuv5", "--spot", "--project=proj-1"]
  tarball = launch.local_tarball("my-pod")
  pipe = archive.index("|")
  assert archive[:pipe] == ["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others",
                            "--exclude-standard"]
  assert archive[pipe + 1:] == ["tar", "-C", ROOT, "--null", "-T", "-", "-czf", tarball]
  assert copy == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball,
                  "my-pod:vlpjax-code.tar.gz", "--zone=us-east5-a", "--worker=all",
                  "--project=proj-1"]
  for ssh in (install, start):
    assert ssh[-1] == "--project=proj-1"
  install_words = shlex.split(remote_script(install))
  assert ["-c", "vlpjax-code/constraints.txt", "-e", "vlpjax-code[tpu]"] == (
      install_words[install_words.index("-c"):install_words.index("-c") + 4])
  assert "python3.11" in install_words
  start_script = remote_script(start)
  assert train_args_in(start_script) == [
      "--config", CONFIG, "--workdir", WORKDIR] + OVERRIDES
  # Detached from the ssh session, logging to a file, its pid kept for --stop.
  words = shlex.split(start_script)
  assert words[module_index(words) - 5:module_index(words) - 1] == [
      "setsid", "nohup", "../vlpjax-venv/bin/python", "-u"]
  after = module_index(words) + 1 + len(train_args_in(start_script))
  assert words[after:after + 8] == [">>", "../vlpjax-train.log", "2>&1", "<", "/dev/null", "&",
                                    "echo", "$!"]
  assert words[after + 8:after + 10] == [">", "../vlpjax-train.pid;"]


def test_without_create_no_vm_is_made_and_runtime_flags_are_refused(capsys):
  lines = dry_run(capsys, LAUNCH)
  assert [line[4] if line[0] == "gcloud" else line[0] for line in lines] == [
      "git", "scp", "ssh", "ssh"]
  assert launch.main(LAUNCH + ["--spot"]) == 2
  assert "only apply with --create" in capsys.readouterr().err


def test_preemptible_and_explicit_runtime_version(capsys):
  lines = dry_run(capsys, ["--name", "my-pod", "--zone", "us-east5-a", "--accelerator",
                           "v4-32", "--create", "--preemptible", "--version", "my-runtime",
                           "--config", CONFIG, "--workdir", "gs://b/w"])
  assert lines[0][-3:] == ["--accelerator-type=v4-32", "--version=my-runtime",
                           "--preemptible"]


def test_bad_config_exits_2_with_the_config_error(capsys):
  assert launch.main(LAUNCH + ["--config.optim.lrr=3"]) == 2
  captured = capsys.readouterr()
  assert captured.out == ""
  assert "Config error: unknown config key 'optim.lrr'" in captured.err
  assert "'optim.lr'" in captured.err  # the nearest valid key
  assert launch.main(LAUNCH + ["--config.total_steps=many"]) == 2
  assert "total_steps" in capsys.readouterr().err
  argv = list(LAUNCH)
  argv[argv.index(CONFIG)] = "experiments/no_such_config.py"
  assert launch.main(argv) == 2
  assert "no such file 'experiments/no_such_config.py'" in capsys.readouterr().err


def test_local_workdir_only_on_a_single_host(capsys):
  def launch_with(accelerator, workdir):
    argv = ["--name", "one", "--zone", "z", "--config", CONFIG, "--workdir", workdir]
    return launch.main(argv + (["--accelerator", accelerator] if accelerator else []))

  for accelerator in ("v5p-256", "v5litepod-16", None):
    assert launch_with(accelerator, "/mnt/disk/run") == 2
    err = capsys.readouterr().err
    assert "local path" in err and "gs://BUCKET/path" in err
  assert launch_with("v5p-8", "runs/relative") == 2
  assert "absolute" in capsys.readouterr().err
  assert launch_with("v5p-8", "s3://bucket/run") == 2
  assert "only gs://" in capsys.readouterr().err
  assert launch_with("v5p-8", "/mnt/disk/run") == 0
  start = shlex.split(capsys.readouterr().out.splitlines()[-1])
  assert train_args_in(remote_script(start, name="one", zone="z")) == [
      "--config", CONFIG, "--workdir", "/mnt/disk/run"]


@pytest.mark.parametrize("name, multi_host", [
    # Single VMs and pods as the Cloud TPU docs list them: v5p-16 is 2 hosts, v4-32 is 4,
    # v5litepod-8 / v6e-8 are one 8-chip VM, v5litepod-16 is a pod.
    ("v5p-8", False), ("v5p-16", True), ("v5p-256", True), ("v4-8", False), ("v4-32", True),
    ("v5litepod-8", False), ("v5litepod-16", True), ("v6e-4", False), ("v6e-256", True)])
def test_known_accelerators(name, multi_host):
  assert launch.parse_accelerator(name).multi_host == multi_host


@pytest.mark.parametrize("name, suggestion", [
    ("v5e-256", "v5litepod-256"), ("v6-8", "v6e-8"), ("v5p-255", None), ("tpu", None)])
def test_unknown_accelerator_names_a_valid_one(name, suggestion):
  with pytest.raises(ValueError, match="not a known TPU type") as e:
    launch.parse_accelerator(name)
  assert f"--accelerator {name!r}" in str(e.value)
  if suggestion:
    assert f"Did you mean {suggestion}?" in str(e.value)


def test_bad_names_and_missing_arguments(capsys):
  argv = list(LAUNCH)
  argv[argv.index("my-pod")] = "My_Pod"
  assert launch.main(argv) == 2
  assert "--name 'My_Pod'" in capsys.readouterr().err
  assert launch.main(["--name", "a", "--zone", "z", "--config", CONFIG, "--workdir", "gs://b/w",
                      "--create"]) == 2
  assert "--create needs --accelerator" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    launch.main(["--name", "a", "--zone", "z", "--config", CONFIG])  # no --workdir
  assert "--workdir required" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    launch.main(["--name", "a", "--zone", "z", "--stop", "--config", CONFIG])
  assert "take no --config" in capsys.readouterr().err


def test_config_must_be_a_shipped_file_in_the_repo(tmp_path):
  assert launch.shipped_config(CONFIG) == CONFIG
  assert launch.shipped_config(os.path.join(ROOT, "experiments/siglip_b16.py")) == (
      "experiments/siglip_b16.py")
  with pytest.raises(ValueError, match="outside the repository"):
    launch.shipped_config(str(tmp_path / "my_config.py"))
  with pytest.raises(ValueError, match="ignored by git"):
    launch.shipped_config(os.path.join(ROOT, "workdirs/my_config.py"))


def test_stop_and_delete(capsys):
  (stop,) = dry_run(capsys, ["--name", "my-pod", "--zone", "us-east5-a", "--stop"])
  assert "kill" in shlex.split(remote_script(stop))
  (delete,) = dry_run(capsys, ["--name", "my-pod", "--zone", "us-east5-a", "--delete",
                               "--project", "p"])
  assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-pod",
                    "--zone=us-east5-a", "--quiet", "--project=p"]


# --- the worker scripts, run by a real shell ----------------------------------------------------

def write_executable(path, text):
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


def fake_worker(tmp_path):
  """A home directory with the shipped tarball, and a PATH whose python3.11 makes a venv of
  fakes: pip records its arguments, python (the trainer) records its own and runs until
  SIGTERM, which it notes."""
  home, fakes = tmp_path / "home", tmp_path / "fakes"
  home.mkdir()
  (fakes / "venv_bin").mkdir(parents=True)
  write_executable(fakes / "venv_bin" / "pip", """#!/bin/sh
n=$(ls "$HOME" | grep -c '^pip-call-')
printf '%s\\0' "$@" > "$HOME/pip-call-$n"
""")
  write_executable(fakes / "venv_bin" / "python", """#!/bin/sh
printf '%s\\0' "$@" > "$HOME/trainer-argv"
echo "training, cwd $(pwd)"
trap 'echo TERM >> "$HOME/trainer-signals"; kill $child; exit 0' TERM
sleep 120 & child=$!
wait $child
""")
  write_executable(fakes / "python3.11", f"""#!/bin/sh
[ "$1 $2" = "-m venv" ] || exit 9
mkdir -p "$3/bin" && cp {fakes}/venv_bin/* "$3/bin/"
""")
  code = tmp_path / "code"
  (code / "experiments").mkdir(parents=True)
  (code / "constraints.txt").write_text("jax==0.10.2\n")
  (code / "experiments" / "siglip_b16.py").write_text("# the config\n")
  with tarfile.open(home / launch.REMOTE_TARBALL, "w:gz") as tar:
    tar.add(code, arcname=".")
  env = dict(os.environ, HOME=str(home), PATH=f"{fakes}{os.pathsep}{os.environ['PATH']}")
  return home, env


def on_worker(shell, script, env):
  return subprocess.run([shell, "-c", script], env=env, cwd=env["HOME"], capture_output=True,
                        text=True, timeout=60)


def trainer_pid(home):
  """The pid in the pid file if that process is a trainer (the scripts' own test)."""
  pid_file = home / launch.REMOTE_PID
  if not pid_file.exists():
    return None
  pid = int(pid_file.read_text())
  try:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
      return pid if b"vlpjax.train" in f.read() else None
  except FileNotFoundError:
    return None


def wait_for(predicate, timeout_s=20):
  deadline = time.time() + timeout_s
  while not predicate():
    assert time.time() < deadline, "timed out"
    time.sleep(0.05)


@pytest.mark.parametrize("shell", ["bash", "sh"])
def test_worker_scripts_install_start_refuse_stop_and_resume(tmp_path, shell):
  home, env = fake_worker(tmp_path)
  train = launch.train_argv(CONFIG, WORKDIR, [o[len("--config."):] for o in OVERRIDES])
  start = launch.start_script(train, "abc123-dirty")
  try:
    result = on_worker(shell, launch.install_script(), env)
    assert result.returncode == 0, result.stderr
    assert (home / "vlpjax-code" / "constraints.txt").read_text() == "jax==0.10.2\n"
    calls = sorted(home.glob("pip-call-*"))
    assert [c.read_bytes().split(b"\0")[:-1] for c in calls] == [
        [b"install", b"-q", b"--upgrade", b"pip"],
        [b"install", b"-q", b"-c", b"vlpjax-code/constraints.txt", b"-e", b"vlpjax-code[tpu]"]]

    result = on_worker(shell, start, env)  # returns at once: nothing keeps the session's pipes
    assert result.returncode == 0, result.stderr
    wait_for(lambda: (home / "trainer-argv").exists() and trainer_pid(home))
    wait_for(lambda: (home / "trainer-argv").read_bytes().count(b"\0") == len(train) - 1)
    # The trainer got exactly the arguments, through ssh-style shell quoting.
    assert (home / "trainer-argv").read_bytes().decode().split("\0")[:-1] == train[1:]
    pid = trainer_pid(home)
    assert os.getsid(pid) == pid  # its own session: a dropped ssh connection does not reach it

    for script in (start, launch.install_script()):  # a running trainer is left alone
      result = on_worker(shell, script, env)
      assert result.returncode == 1
      assert "a trainer is running on" in result.stderr and f"(pid {pid})" in result.stderr

    result = on_worker(shell, launch.stop_script(grace_s=20), env)
    assert result.returncode == 0 and "stopped the trainer" in result.stdout
    assert trainer_pid(home) is None
    assert (home / "trainer-signals").read_text() == "TERM\n"  # SIGTERM: time to checkpoint
    assert "no trainer running" in on_worker(shell, launch.stop_script(), env).stdout

    # Relaunch (resume): the code directory is replaced, the log is appended to.
    (home / "vlpjax-code" / "stale.py").write_text("")
    assert on_worker(shell, launch.install_script(), env).returncode == 0
    assert not (home / "vlpjax-code" / "stale.py").exists()
    assert on_worker(shell, start, env).returncode == 0
    wait_for(lambda: trainer_pid(home) not in (None, pid))
    log = (home / launch.REMOTE_LOG).read_text()
    assert log.count("=== vlpjax abc123-dirty started ") == 2
    assert f"training, cwd {home}/vlpjax-code" in log
  finally:
    pid = trainer_pid(home)
    if pid:
      os.kill(pid, signal.SIGTERM)  # the fake trainer's trap also ends its `sleep`


# --- --run: real subprocesses against a fake gcloud ---------------------------------------------

FAKE_GCLOUD = """#!/bin/sh
n=$(ls "$GCLOUD_LOG" | wc -l)
printf '%s\\0' "$@" > "$GCLOUD_LOG/$(printf %03d "$n")"
if [ -n "$GCLOUD_FAIL_ON" ]; then
  case " $* " in *" $GCLOUD_FAIL_ON "*) echo "ERROR: (gcloud) fake $GCLOUD_FAIL_ON failure" >&2
                                        exit 3;; esac
fi
"""


def cli(argv, env):
  return subprocess.run([sys.executable, "-m", "tools.launch_tpu_vm", *argv], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)


def gcloud_env(tmp_path, fail_on=""):
  bin_dir, log_dir = tmp_path / "bin", tmp_path / "gcloud-calls"
  bin_dir.mkdir(exist_ok=True)
  log_dir.mkdir()
  write_executable(bin_dir / "gcloud", FAKE_GCLOUD)
  return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
              GCLOUD_LOG=str(log_dir), GCLOUD_FAIL_ON=fail_on, TMPDIR=str(tmp_path))


def gcloud_calls(env):
  log_dir = env["GCLOUD_LOG"]
  return [open(os.path.join(log_dir, f), "rb").read().decode().split("\0")[:-1]
          for f in sorted(os.listdir(log_dir))]


def test_run_executes_the_printed_commands_in_order(tmp_path):
  argv = LAUNCH + ["--create", "--spot"]
  env = gcloud_env(tmp_path)
  printed = cli(argv, env)
  assert printed.returncode == 0, printed.stderr
  lines = [shlex.split(line) for line in printed.stdout.splitlines()]
  assert gcloud_calls(env) == []  # a dry run runs nothing

  ran = cli(argv + ["--run"], env)
  assert ran.returncode == 0, ran.stderr
  assert gcloud_calls(env) == [line[1:] for line in lines if line[0] == "gcloud"]
  assert "Started. Worker 0's log:" in ran.stderr
  # The archive step really ran: the working tree as git sees it, without ignored files.
  (tarball,) = {line[-1] for line in lines if line[0] == "git"}
  assert tarball == str(tmp_path / "vlpjax-code-my-pod.tar.gz")  # TMPDIR is honoured
  with tarfile.open(tarball) as tar:
    names = set(tar.getnames())
  assert {"setup.py", "constraints.txt", "vlpjax/train.py", "tools/launch_tpu_vm.py",
          "experiments/siglip_b16.py"} <= names
  assert not [n for n in names if n.startswith((".venv/", "workdirs/", ".git/"))]


def test_run_stops_at_the_first_failure_with_its_message(tmp_path):
  env = gcloud_env(tmp_path, fail_on="scp")
  ran = cli(LAUNCH + ["--create", "--run"], env)
  assert ran.returncode == 1
  assert [call[3] for call in gcloud_calls(env)] == ["create", "scp"]  # no ssh after the failure
  assert "ERROR: (gcloud) fake scp failure" in ran.stderr
  assert "Error: step 3 of 5 failed with exit status 3: gcloud compute tpus tpu-vm scp" in (
      ran.stderr)


def test_run_without_gcloud_on_path_says_so_before_anything(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  env = dict(os.environ, PATH=str(empty), TMPDIR=str(tmp_path))
  ran = cli(LAUNCH + ["--create", "--run", "--config.no_such_key=1"], env)
  assert ran.returncode == 1
  assert ran.stdout == ""
  assert "`gcloud` is not on PATH" in ran.stderr
  assert "Config error" not in ran.stderr  # checked first, before the config
  assert os.listdir(tmp_path) == ["empty"]  # no tarball: nothing ran
