"""seqio tasks of the video-timestamp kind (`vlpjax.data.kinds.video`, `video_targets`).

Registered on import, over the embedded generator (`vlpjax.data.videos`):
  videos_dense_captions   Vid2Seq dense captioning: frames as `<image>`s and the
                          timed transcript in, timed events out
  videos_span_denoising   Vid2Seq pretraining: frames and the span-corrupted
                          timed transcript in, the dropped spans out
  videos_grounding        temporal grounding (moment retrieval): frames and one
                          event's caption in, its `<time_s><time_e>` out

`register_video_tfrecord_task` registers any objective over a user's TFRecords
of the same layout, with encoded frames or precomputed frame features.
Every task yields the prefix-LM contract (`inputs`, `targets`, `images`) plus
`frame_times` (seconds) and `image_times` (relative to the clip, [0, 1]), and
`problem` for bad records (`vlpjax.data.bad_records`). With precomputed features
the `images` are the real frames' feature vectors, float32 [F_real, D].
"""
import functools
from typing import Iterable, Mapping, Optional, Union

import seqio

from vlpjax.data import videos
from vlpjax.data.kinds import video
from vlpjax.data.kinds import video_targets
from vlpjax.data import tasks
from vlpjax.data.tasks import add_task

DENSE_CAPTIONS_TASK = "videos_dense_captions"
SPAN_DENOISING_TASK = "videos_span_denoising"
GROUNDING_TASK = "videos_grounding"
OBJECTIVES = ("dense_captions", "span_denoising", "grounding")


def video_preprocessors(objective: str = "dense_captions", *, num_frames: int = 8,
                        frame_size: int = 32, short_clip: str = "pad",
                        frame_feature_dim: Optional[int] = None,
                        speech_input: str = "timed", noise_density: float = 0.15,
                        mean_noise_span_length: float = 3.0,
                        num_bins: Optional[int] = None,
                        grounding_prompt: str = "query:"):
  """The preprocessors of a video task, from raw records to the prefix-LM contract.

  The real sampled frames become `images` with one `<image>` each: decoded frames
  uint8 [F_real, S, S, 3], or with `frame_feature_dim` precomputed features float32
  [F_real, D] (`video_targets.features_as_images`; register the task with
  `video_targets.output_features(frame_feature_dim=D)`). Grounding uses no transcript
  (`speech_input` does not apply) and starts its inputs with `grounding_prompt`.
  """
  if objective not in OBJECTIVES:
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
  steps = [functools.partial(video.normalize_records, frame_feature_dim=frame_feature_dim),
           video.check_records,
           functools.partial(video.sample_frames, num_frames=num_frames,
                             image_size=frame_size, short_clip=short_clip)]
  if objective == "dense_captions":
    steps.append(functools.partial(video_targets.dense_caption_targets,
                                   speech_input=speech_input, num_bins=num_bins))
  elif objective == "grounding":
    steps.append(functools.partial(video_targets.grounding_examples, num_bins=num_bins,
                                   prompt=grounding_prompt))
  else:
    if speech_input not in ("timed", "text"):
      raise ValueError(f"span denoising needs speech_input 'timed' or 'text' (the "
                       f"transcript is its text), got {speech_input!r}")
    steps.append(functools.partial(video_targets.span_denoising, noise_density=noise_density,
                                   mean_noise_span_length=mean_noise_span_length,
                                   timed=speech_input != "text", num_bins=num_bins))
  steps.append(video_targets.frames_as_images if frame_feature_dim is None
               else video_targets.features_as_images)
  return steps


def _generated_task(name: str, objective: str, num_frames: int, frame_size: int,
                    split_sizes: Optional[Mapping[str, int]], clip_frames: int,
                    vocabulary, **kwargs) -> seqio.Task:
  source = tasks.generated_source(videos.make_dataset, split_sizes or videos.SPLIT_SIZES,
                                  num_frames=clip_frames, frame_size=frame_size)
  return add_task(name, source=source,
                  output_features=video_targets.output_features(vocabulary),
                  preprocessors=video_preprocessors(objective, num_frames=num_frames,
                                                    frame_size=frame_size, **kwargs))


def register_dense_captions_task(name: str = DENSE_CAPTIONS_TASK, num_frames: int = 8,
                                 frame_size: int = 32,
                                 split_sizes: Optional[Mapping[str, int]] = None,
                                 clip_frames: int = 16, vocabulary=None,
                                 **kwargs) -> seqio.Task:
  """Generated clips of `clip_frames` frames; F = `num_frames` sampled, S = `frame_size`.

  `kwargs` go to `video_preprocessors` (speech_input, short_clip, num_bins).
  Small `split_sizes` suit tests.
  """
  return _generated_task(name, "dense_captions", num_frames, frame_size, split_sizes,
                         clip_frames, vocabulary, **kwargs)


def register_span_denoising_task(name: str = SPAN_DENOISING_TASK, num_frames: int = 8,
                                 frame_size: int = 32,
                                 split_sizes: Optional[Mapping[str, int]] = None,
                                 clip_frames: int = 16, vocabulary=None,
                                 **kwargs) -> seqio.Task:
  """As `register_dense_captions_task`, with the transcript span-denoising objective.

  `kwargs` may set noise_density, mean_noise_span_length, short_clip, num_bins.
  """
  return _generated_task(name, "span_denoising", num_frames, frame_size, split_sizes,
                         clip_frames, vocabulary, **kwargs)


def register_grounding_task(name: str = GROUNDING_TASK, num_frames: int = 8,
                            frame_size: int = 32,
                            split_sizes: Optional[Mapping[str, int]] = None,
                            clip_frames: int = 16, vocabulary=None,
                            **kwargs) -> seqio.Task:
  """As `register_dense_captions_task`, with the temporal grounding objective.

  `kwargs` may set grounding_prompt, short_clip, num_bins.
  """
  return _generated_task(name, "grounding", num_frames, frame_size, split_sizes,
                         clip_frames, vocabulary, **kwargs)


def register_video_tfrecord_task(
    name: str, file_pattern: Mapping[str, Union[str, Iterable[str]]],
    objective: str = "dense_captions", *,
    num_input_examples: Optional[Mapping[str, int]] = None, num_frames: int = 8,
    frame_size: int = 32, frame_feature_dim: Optional[int] = None,
    vocabulary=None, **kwargs) -> seqio.Task:
  """Video TFRecords (layout in `vlpjax.data.kinds.video`) as a task named `name`.

  Args:
    file_pattern: split -> glob or list of globs.
    objective: "dense_captions", "span_denoising" or "grounding".
    num_frames, frame_size: F frames sampled per clip, resized to S x S.
    frame_feature_dim: D when the records hold `frame_features` instead of frames;
      the task's `images` are then float32 [F_real, D] (pack with image_shape (D,):
      `input.frame_feature_dim=D`).
    vocabulary: a multimodal vocabulary; default `vocab.multimodal_vocabulary()`.
    **kwargs: more `video_preprocessors` options (speech_input, short_clip, ...).
  """
  return add_task(
      name,
      source=video.tfexample_source(file_pattern, num_input_examples, frame_feature_dim),
      output_features=video_targets.output_features(vocabulary, frame_feature_dim),
      preprocessors=video_preprocessors(objective, num_frames=num_frames,
                                        frame_size=frame_size,
                                        frame_feature_dim=frame_feature_dim, **kwargs))


VID2SEQ_MIXTURE = "videos_vid2seq"
# Rates per objective: grounding makes one example per event (2-4 a clip), so it needs no
# boost; span denoising is the auxiliary, unlabelled objective.
VID2SEQ_RATES = {"dense_captions": 1.0, "grounding": 1.0, "span_denoising": 0.5}


def register_vid2seq_mixture(name: str = VID2SEQ_MIXTURE, num_frames: int = 16,
                             frame_size: int = 32,
                             split_sizes: Optional[Mapping[str, int]] = None,
                             clip_frames: int = 16, rates: Optional[Mapping[str, float]] = None,
                             vocabulary=None) -> seqio.Mixture:
  """The three objectives over the embedded clips as tasks `{name}_{objective}` + a Mixture.

  Every frame of a 16-frame clip by default: events change at frame boundaries, so sampling
  fewer frames would blur where they start and end.
  """
  rates = dict(VID2SEQ_RATES, **(rates or {}))
  members = []
  for objective in OBJECTIVES:
    task = _generated_task(f"{name}_{objective}", objective, num_frames, frame_size,
                           split_sizes, clip_frames, vocabulary)
    members.append((task.name, rates[objective]))
  return tasks.add_mixture(name, members)


register_dense_captions_task()
register_span_denoising_task()
register_grounding_task()
register_vid2seq_mixture()
