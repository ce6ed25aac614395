"""The walkthrough in docs/data.md works as written: its files and command run here.

Blocks marked `<!-- docs-test: NAME -->` are files to write (NAME) or, for NAME "command",
the shell command to run; all run in a scratch directory standing in for the user's.
"""
import os
import re
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BLOCK = re.compile(r"<!-- docs-test: (\S+) -->\n```[a-z]*\n(.*?)```", re.S)


def _blocks(doc: str):
  with open(os.path.join(REPO, doc)) as f:
    return _BLOCK.findall(f.read())


def test_data_walkthrough_runs_as_written(tmp_path):
  blocks = _blocks("docs/data.md")
  assert [name for name, _ in blocks] == ["make_records.py", "my_tasks.py", "command"]
  os.symlink(os.path.join(REPO, "experiments"), tmp_path / "experiments")
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, str(tmp_path)])}
  for name, text in blocks[:-1]:
    (tmp_path / name).write_text(text)
  subprocess.run([sys.executable, "make_records.py"], cwd=tmp_path, env=env, check=True)
  assert sorted(os.listdir(tmp_path / "my_records")) == [
      "train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord"]

  command = blocks[-1][1].replace("\\\n", " ").replace("/tmp/my_run", str(tmp_path / "run"))
  argv = shlex.split(command)
  assert argv[:3] == ["python", "-m", "vlpjax.train"]
  proc = subprocess.run([sys.executable] + argv[1:], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  assert "step 20/20" in proc.stdout
  assert "data: examples per task {'my_captions': 320}" in proc.stdout
