"""Vid2Seq-sized video model: 100 frames through ViT-B/16, a temporal transformer, a decoder.

  python -m vlpjax.train --workdir gs://BUCKET/vid2seq --config experiments/vid2seq_b16.py:\\
spm=/ckpt/t5/spiece.model,dense_files=gs://BUCKET/youcook2/train-*.tfrecord,\\
narrated_files=gs://BUCKET/yttemporal/train-*.tfrecord
  ... --config experiments/vid2seq_b16.py:features=768,...   # precomputed CLIP frame features

Model (after Vid2Seq): 100 frames sampled evenly from each clip; each frame through ViT-B/16 at
224 px, pooled by attention (MAP) to one token, or, with `features=D`, precomputed per-frame
features (Vid2Seq reads frozen CLIP ViT-L/14 features) through a Dense layer; a 12-layer
temporal transformer with 100 learned time positions; an encoder-decoder LM (12 decoder layers
of width 768 cross-attending to the frames, T5-Base's size) over the tasks' vocabulary with 100
`<time_k>` tokens. `arch=prefix_lm` puts the frames in the LM's prefix instead. `stage=frozen_vit`
(default, as Vid2Seq freezes its visual backbone) trains everything but the ViT.

Data: registered here from file arguments (every host loads this config):
  dense_files     clips with timed events and transcripts -> dense captioning and grounding
  narrated_files  narrated clips without events (YT-Temporal style) -> transcript span denoising
with the token losses summed 1 : 1 (dense captioning : span denoising), Vid2Seq's weighting,
through `input.task_loss_weights`. A row holds one clip: 100 frame tokens and up to 924 tokens
of transcript and targets.
"""
import ml_collections

from data_mixtures import videos as video_tasks
from vlpjax import config as config_lib
from vlpjax import sharding
from vlpjax.data import tasks
from vlpjax.data import vocab

NUM_FRAMES = 100
IMAGE_SIZE = 224
MIXTURE = "vid2seq_b16_mixture"
RATES = {"vid2seq_b16_dense": 0.4, "vid2seq_b16_grounding": 0.2, "vid2seq_b16_denoising": 0.4}
FREEZE_BY_STAGE = {"frozen_vit": "img/.*", "full": ""}


def register_tasks(arg) -> str:
  """The three tasks over the argument's files and their mixture; returns the mixture name."""
  common = dict(num_frames=NUM_FRAMES, frame_size=IMAGE_SIZE,
                frame_feature_dim=arg.features or None,
                vocabulary=vocab.multimodal_vocabulary(arg.spm) if arg.spm else None)
  video_tasks.register_video_tfrecord_task("vid2seq_b16_dense", {"train": arg.dense_files},
                                           "dense_captions", **common)
  video_tasks.register_video_tfrecord_task("vid2seq_b16_grounding",
                                           {"train": arg.dense_files}, "grounding", **common)
  video_tasks.register_video_tfrecord_task("vid2seq_b16_denoising",
                                           {"train": arg.narrated_files}, "span_denoising",
                                           **common)
  tasks.add_mixture(MIXTURE, list(RATES.items()))
  return MIXTURE


def get_config(arg=None):
  arg = config_lib.parse_arg(
      arg, batch=256, steps=200_000, rules="fsdp", tensor=1, slices=1, arch="encoder_decoder",
      stage="frozen_vit", features=0, spm="",
      dense_files="gs://YOUR_BUCKET/dense/train-*.tfrecord",
      narrated_files="gs://YOUR_BUCKET/narrated/train-*.tfrecord")
  if arg.stage not in FREEZE_BY_STAGE:
    raise config_lib.ConfigError(f"stage {arg.stage!r} is not one of {list(FREEZE_BY_STAGE)}.")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = arg.steps
  c.global_batch_size = arg.batch   # packed rows of 1024 tokens, one clip each

  c.input = dict(
      task=register_tasks(arg), split="train",
      pp='value_range(-1, 1, key="images")' if not arg.features else "",
      image_size=IMAGE_SIZE, shuffle_buffer=10_000,
      row_length=1024, max_images_per_row=NUM_FRAMES, tokens_per_image=0,
      frame_feature_dim=arg.features,
      task_loss_weights={"vid2seq_b16_dense": 1.0, "vid2seq_b16_denoising": 1.0})

  c.family = "video"
  c.model_name = "video"
  width = 768
  c.model = dict(
      image=dict(variant="B/16", posemb="learn", pool_type="map"),
      temporal=dict(depth=12, mlp_dim=3072, num_heads=12, time_positions=NUM_FRAMES),
      llm=dict(vocab_size=32_768,  # a 32k T5-style SentencePiece model + 701 structure ids
               width=width, depth=12, mlp_dim=2048, num_heads=12, tie_embeddings=False),
      projector="linear",
      architecture=arg.arch,
      frame_feature_dim=arg.features,
      scan_layers=True,
  )
  if arg.features:
    c.model.temporal.update(width=width)
  c.compute_dtype = "bfloat16"
  c.remat_policy = "dots_with_no_batch_dims_saveable"

  c.optim = dict(lr=3e-4, b2=0.999, weight_decay=0.0, grad_clip_norm=1.0,
                 freeze="" if arg.features else FREEZE_BY_STAGE[arg.stage])
  c.schedule = dict(type="cosine", warmup_steps=1_000)

  c.mesh, c.sharding_rules = sharding.parallelism(arg.rules, tensor=arg.tensor,
                                                   slices=arg.slices)

  # Held-out evals on your own validation tasks, e.g.
  # c.evals.dense = dict(type="dense_captioning", task=..., split="validation", pp=...,
  #                      batch_size=256, decode=dict(max_decode_len=256), every_steps=10_000)
  # c.evals.grounding = dict(type="temporal_grounding", task=..., split="validation", ...)
  c.evals = {}
  c.log_every_steps = 100
  c.checkpoint = dict(every_steps=2_000, max_to_keep=3, async_save=True)
  return c
