"""tools/inspect_data: decoded examples and a contact sheet for each data kind."""
import numpy as np
from PIL import Image
import seqio

from data_mixtures import documents, interleaved, videos
from tools import inspect_data

SMALL = {"train": 4, "validation": 2}


def test_readable_collapses_image_runs():
  assert inspect_data.readable("a <image> <image> <image> b <image>") == "a <image>x3 b <image>"


def test_contact_sheet_for_a_mixture_of_every_kind(tmp_path, capsys):
  documents.register_documents_udop("inspect_docs", page_size=96, image_size=32,
                                    split_sizes=SMALL)
  videos.register_dense_captions_task("inspect_video", num_frames=2, frame_size=16,
                                      clip_frames=4, split_sizes=SMALL)
  interleaved.register_stories_interleaved_task("inspect_story", image_size=16,
                                                split_sizes=SMALL, max_images=3)
  if "inspect_all" in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove("inspect_all")
  seqio.MixtureRegistry.add("inspect_all", [("inspect_docs_layout_modeling", 1.0),
                                            ("inspect_video", 1.0), ("inspect_story", 1.0)])
  assert inspect_data.main(["--mixture", "inspect_all", "-n", "9", "--out", str(tmp_path)]) == 0
  out = capsys.readouterr().out
  assert out.count("--- example") == 9
  for task in ("inspect_docs_layout_modeling", "inspect_video", "inspect_story"):
    assert f"[{task}]" in out
  # Special tokens are shown as written.
  assert "<loc_" in out and "<time_" in out and "<image>" in out
  sheet = np.asarray(Image.open(tmp_path / "contact_sheet.png"))
  assert sheet.shape[1] == 2 * (inspect_data.CELL_WIDTH + 8) and sheet.shape[0] > 300
  # The cells hold pictures, not just text on white.
  assert len(np.unique(sheet.reshape(-1, 3), axis=0)) > 50


def test_video_timeline_reads_events_from_targets():
  vocabulary = videos.video_targets.output_features()["targets"].vocabulary
  text = "<time_10><time_50> a red circle appears<time_60><time_90> it vanishes"
  events = inspect_data._events(vocabulary, text, duration=10.0)  # pylint: disable=protected-access
  bin_time = lambda k: k / 99 * 10.0  # 100 bins over 10 s.
  assert events == [(bin_time(10), bin_time(50), "a red circle appears"),
                    (bin_time(60), bin_time(90), "it vanishes")]
