"""tools/plot_metrics: reading workdir metrics back and drawing them, on hand-written workdirs."""
import json

import numpy as np
from PIL import Image
import pytest

from tools import plot_metrics

BLUE, ORANGE = (31, 119, 180), (255, 127, 14)   # matplotlib's C0 and C1.


def _write_jsonl(path, records, tail=""):
  path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def _train_run(workdir, steps=(10, 20, 30, 40), loss0=5.0, evals=True):
  """A workdir as vlpjax.train leaves it: train lines every 10 steps, evals every 20."""
  workdir.mkdir(parents=True)
  records = []
  for step in steps:
    records.append({"step": step, "train/loss": loss0 / step, "train/lr": 1e-3 * step,
                    "train/grad_norm": 1.0, "data/examples/shapes": 8.0 * step,
                    "data/skipped": 0.0})
    if evals and step % 20 == 0:
      records.append({"step": step, "zeroshot/top1": step / 100, "zeroshot/num_examples": 64.0,
                      "retrieval/i2t_r@1": step / 200})
  _write_jsonl(workdir / "metrics.jsonl", records)
  return workdir


def test_read_metrics_later_lines_win_and_a_truncated_last_line_is_skipped(tmp_path, capsys):
  workdir = tmp_path / "run"
  workdir.mkdir()
  _write_jsonl(workdir / "metrics.jsonl", [
      {"step": 10, "train/loss": 4.0, "train/lr": 0.1},
      {"step": 20, "train/loss": 3.0, "train/lr": 0.2},
      {"step": 20, "zeroshot/top1": 0.5},
      {"step": 30, "train/loss": 2.5, "train/lr": 0.3},
      # Resumed from the checkpoint of step 20: steps after it are logged again.
      {"step": 30, "train/loss": 2.0, "train/lr": 0.3, "note": "text is not a metric"},
      {"step": 40, "train/loss": 1.0, "train/lr": 0.4, "flag": True},
  ], tail='{"step": 50, "train/loss": 0.')
  metrics = plot_metrics.read_metrics(str(workdir))
  assert metrics == {
      "train/loss": [(10, 4.0), (20, 3.0), (30, 2.0), (40, 1.0)],
      "train/lr": [(10, 0.1), (20, 0.2), (30, 0.3), (40, 0.4)],
      "zeroshot/top1": [(20, 0.5)],
  }
  err = capsys.readouterr().err
  assert f"{workdir}/metrics.jsonl:7:" in err and "killed mid-write" in err


def test_a_half_line_inside_the_file_is_skipped_with_its_line_number(tmp_path, capsys):
  """A run killed mid-write and resumed appends after the half line: one line holds both."""
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "metrics.jsonl").write_text(
      '{"step": 10, "train/loss": 4.0}\n'
      '{"step": 20, "train/lo{"step": 20, "train/loss": 3.0}\n'
      '[1, 2]\n'
      '{"step": 30, "train/loss": 2.0}\n')
  assert plot_metrics.read_metrics(str(workdir)) == {"train/loss": [(10, 4.0), (30, 2.0)]}
  err = capsys.readouterr().err
  assert "metrics.jsonl:2:" in err and "metrics.jsonl:3:" in err
  assert "killed" not in err


def test_read_metrics_adds_eval_json_files_and_reads_eval_only_runs(tmp_path):
  workdir = tmp_path / "run"
  (workdir / "checkpoints" / "100").mkdir(parents=True)
  (workdir / "checkpoints" / "200").mkdir(parents=True)
  (workdir / "checkpoints" / "300").mkdir(parents=True)   # A checkpoint never evaluated.
  (workdir / "eval_results").mkdir()
  (workdir / "checkpoints" / "100" / "eval_results.json").write_text(json.dumps(
      {"step": 100, "zeroshot": {"top1": 0.25, "top5": 0.5}, "retrieval": {"i2t_r@1": 0.1}}))
  (workdir / "checkpoints" / "200" / "eval_results.json").write_text(json.dumps(
      {"zeroshot": {"top1": 0.75}}))   # No "step": the directory names it.
  (workdir / "eval_results" / "250.json").write_text(json.dumps(
      {"step": 250, "zeroshot": {"top1": 0.8}}))
  (workdir / "eval_results" / "260.json.tmp").write_text("{half a fi")
  assert plot_metrics.read_metrics(str(workdir)) == {
      "retrieval/i2t_r@1": [(100, 0.1)],
      "zeroshot/top1": [(100, 0.25), (200, 0.75), (250, 0.8)],
      "zeroshot/top5": [(100, 0.5)],
  }
  # With a metrics.jsonl too, the eval files (re-evaluations merge into them) win.
  _write_jsonl(workdir / "metrics.jsonl", [
      {"step": 100, "train/loss": 3.0, "zeroshot/top1": 0.2},
      {"step": 200, "train/loss": 2.0}])
  metrics = plot_metrics.read_metrics(str(workdir))
  assert metrics["zeroshot/top1"] == [(100, 0.25), (200, 0.75), (250, 0.8)]
  assert metrics["train/loss"] == [(100, 3.0), (200, 2.0)]


def test_read_metrics_errors_name_the_workdir(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    plot_metrics.read_metrics(str(tmp_path / "missing"))
  (tmp_path / "empty" / "tensorboard").mkdir(parents=True)
  with pytest.raises(ValueError, match=r"empty has no metrics.jsonl.*vlpjax.train workdir"):
    plot_metrics.read_metrics(str(tmp_path / "empty"))


def test_ema_matches_a_numpy_reference():
  rng = np.random.default_rng(0)
  values = rng.normal(size=50).cumsum()
  for weight in (0.0, 0.3, 0.6, 0.95):
    t = np.arange(len(values))
    # s_t = sum_i (1 - w) w^(t-i) x_i / (1 - w^(t+1)), written as one lower-triangular matmul.
    decay = np.tril(weight ** np.maximum(t[:, None] - t[None, :], 0).astype(np.float64))
    reference = (1 - weight) * decay @ values / (1 - weight ** (t + 1))
    np.testing.assert_allclose(plot_metrics.ema(values, weight), reference, rtol=1e-12)
  # Debiased: a constant curve stays put from the first point on.
  np.testing.assert_allclose(plot_metrics.ema(np.full(10, 3.0), 0.9), np.full(10, 3.0))
  # Non-finite points stay as they are and do not enter the average.
  smoothed = plot_metrics.ema([1.0, np.nan, 3.0], 0.5)
  np.testing.assert_allclose(smoothed, [1.0, np.nan, plot_metrics.ema([1.0, 3.0], 0.5)[1]])
  with pytest.raises(ValueError, match="smoothing weight"):
    plot_metrics.ema(values, 1.0)


def test_default_plot_writes_a_png_of_losses_evals_and_learning_rate(tmp_path, capsys):
  workdir = _train_run(tmp_path / "siglip")
  out = tmp_path / "plots" / "curves.png"
  assert plot_metrics.main([str(workdir), "--out", str(out), "--smooth", "0.6"]) == 0
  # data/* and the eval counts left out; the learning rate last.
  expected = ["train/loss", "retrieval/i2t_r@1", "zeroshot/top1", "train/lr"]
  assert capsys.readouterr().out.splitlines() == [f"wrote {out} (4 metrics)"] + [
      f"  {key}" for key in expected]
  image = Image.open(out)
  image.load()
  assert image.format == "PNG"
  assert image.size == (2 * 400, 2 * 300)   # Four 400 x 300 panels, two by two.
  assert _has_color(image, BLUE) and not _has_color(image, ORANGE)
  assert plot_metrics.plot([str(workdir)], str(out)) == expected


def test_metrics_selection_follows_the_regexes_and_names_the_keys_when_none_matches(
    tmp_path, capsys):
  workdir = str(_train_run(tmp_path / "run"))
  out = str(tmp_path / "curves.png")
  drawn = plot_metrics.plot([workdir], out, metrics=["^zeroshot/", "loss", "data/skipped"])
  assert drawn == ["zeroshot/num_examples", "zeroshot/top1", "train/loss", "data/skipped"]
  assert Image.open(out).size == (2 * 400, 2 * 300)
  assert plot_metrics.plot([workdir], out, metrics=["top1", "zeroshot"]) == [
      "zeroshot/top1", "zeroshot/num_examples"]
  assert Image.open(out).size == (2 * 400, 1 * 300)
  # Within one regex: train losses, evals, other train and data keys, the learning rate.
  assert plot_metrics.plot([workdir], out, metrics=["."]) == [
      "train/loss", "retrieval/i2t_r@1", "zeroshot/num_examples", "zeroshot/top1",
      "data/examples/shapes", "data/skipped", "train/grad_norm", "train/lr"]
  assert Image.open(out).size == (3 * 400, 3 * 300)
  with pytest.raises(ValueError, match=r"'bleu' matches no metric; available: data/examples"
                                       r".*train/loss.*zeroshot/top1"):
    plot_metrics.plot([workdir], out, metrics=["loss", "bleu"])
  with pytest.raises(SystemExit) as exit_info:
    plot_metrics.main([workdir, "--out", out, "--metrics", "bleu"])
  assert exit_info.value.code == 2
  assert "matches no metric" in capsys.readouterr().err
  with pytest.raises(ValueError, match="--log_y 'bleu' matches none"):
    plot_metrics.plot([workdir], out, log_y="bleu")


def test_two_workdirs_one_line_each_with_their_labels(tmp_path):
  base = _train_run(tmp_path / "a" / "run", loss0=5.0)
  # The second run has no evals at all: its eval panels hold only the first run's line.
  lora = _train_run(tmp_path / "b" / "run", steps=(10, 20, 30), loss0=4.0, evals=False)
  runs = {"base": plot_metrics.read_metrics(str(base)),
          "lora": plot_metrics.read_metrics(str(lora))}
  fig = plot_metrics.figure(runs, ["train/loss", "zeroshot/top1"], smooth=0.5, log_y="loss")
  loss_ax, top1_ax = fig.axes[:2]
  assert loss_ax.get_yscale() == "log" and top1_ax.get_yscale() == "linear"
  # Raw (faint) and smoothed lines per run, in the run's colour.
  lines = [(line.get_color(), line.get_xdata().tolist(), line.get_ydata().tolist())
           for line in loss_ax.get_lines()]
  base_loss = [5.0 / s for s in (10, 20, 30, 40)]
  lora_loss = [4.0 / s for s in (10, 20, 30)]
  assert lines == [
      ("C0", [10, 20, 30, 40], base_loss),
      ("C0", [10, 20, 30, 40], plot_metrics.ema(base_loss, 0.5).tolist()),
      ("C1", [10, 20, 30], lora_loss),
      ("C1", [10, 20, 30], plot_metrics.ema(lora_loss, 0.5).tolist())]
  (top1,) = top1_ax.get_lines()
  assert top1.get_marker() == "o" and top1.get_ydata().tolist() == [0.2, 0.4]
  assert [t.get_text() for t in fig.legends[0].get_texts()] == ["base", "lora"]

  out = tmp_path / "cmp.png"
  drawn = plot_metrics.plot([str(base), str(lora)], str(out), labels=["base", "lora"])
  assert drawn == ["train/loss", "retrieval/i2t_r@1", "zeroshot/top1", "train/lr"]
  image = Image.open(out)
  assert _has_color(image, BLUE) and _has_color(image, ORANGE)
  # Both workdirs are called "run": the default labels fall back to their paths.
  assert plot_metrics._labels([str(base), str(lora)], None) == [str(base), str(lora)]
  with pytest.raises(ValueError, match="1 labels"):
    plot_metrics.plot([str(base), str(lora)], str(out), labels=["base"])


def _has_color(image, rgb, tolerance=8, min_pixels=20):
  pixels = np.asarray(image.convert("RGB"), np.int32)
  close = np.abs(pixels - np.asarray(rgb)).max(axis=-1) <= tolerance
  return int(close.sum()) >= min_pixels
