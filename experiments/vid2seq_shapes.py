"""Vid2Seq-style video model on the embedded moving-shape clips: the CPU video demo.

  python -m vlpjax.train --config experiments/vid2seq_shapes.py --workdir /tmp/vid2seq_shapes
  python -m vlpjax.train --config experiments/vid2seq_shapes.py:grounding=head ...
  python -m vlpjax.train --config experiments/vid2seq_shapes.py:arch=encoder_decoder ...

Every one of a clip's 16 frames goes through a tiny ViT (patch 8 on 32 px, pooled to one token
per frame), then a temporal transformer with learned time positions, then a tiny Llama-style
LM over a vocabulary with 100 `<time_k>` tokens. It trains on `videos_vid2seq`, the mixture of
Vid2Seq's objectives on these clips -- dense captioning (timed transcript in, timed events
out), transcript span denoising, and temporal grounding (a caption in, its `<time_s><time_e>`
out) -- with the token losses weighted by `input.task_loss_weights`.

Evals on held-out clips: `dense_captioning` (localisation precision / recall / F1 at tIoU
0.3-0.9 and CIDEr of the matched captions, beside the best fixed-equal-segments baseline) and
`temporal_grounding` (R1@0.5 / R1@0.7 / mIoU beside random windows). `grounding=head` adds
UniVTG's clip-level head and grounds with it instead of generating time tokens.
"""
import ml_collections

from vlpjax import config as config_lib
from vlpjax import sharding

MIXTURE = "videos_vid2seq"


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, steps=1200, batch=16, arch="prefix_lm", grounding="generate",
                             rules="data_parallel", eval_every=600, width=128)
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = arg.steps
  c.global_batch_size = arg.batch   # packed rows
  c.data_modules = ("data_mixtures.videos",)

  c.input = dict(
      task=MIXTURE, split="train",
      pp='value_range(-1, 1, key="images")',
      image_size=32, shuffle_buffer=2_000,
      # A clip: 16 frame tokens + a timed transcript (~40 tokens) + timed events (~40);
      # a grounding example: 16 + a query (~10) + 3. Two clips' frames fit a row.
      row_length=192, max_images_per_row=32, tokens_per_image=0,
      # Vid2Seq sums its objectives with weights; span denoising is the auxiliary one.
      task_loss_weights={f"{MIXTURE}_span_denoising": 0.5})

  c.family = "video"
  c.model_name = "video"
  w = arg.width
  c.model = dict(
      image=dict(width=w, depth=2, mlp_dim=4 * w, num_heads=4, patch_size=8, posemb="learn",
                 pool_type="gap"),
      temporal=dict(depth=2, time_positions=100),
      llm=dict(vocab_size=1280,  # the multimodal vocabulary's 1213 ids, padded
               width=w, depth=3, mlp_dim=4 * w, num_heads=4, num_kv_heads=2),
      projector="mlp",
      architecture=arg.arch,
      grounding_head=arg.grounding == "head",
  )
  c.compute_dtype = "float32"  # CPUs have no fast bf16 matmul; pod configs use bfloat16.

  c.optim = dict(lr=2e-3, weight_decay=1e-4, grad_clip_norm=1.0)
  c.schedule = dict(type="cosine", warmup_steps=100)

  c.mesh, c.sharding_rules = sharding.parallelism(arg.rules)

  decode = dict(method="greedy", max_decode_len=64)
  c.evals = dict(
      dense_captioning=dict(
          type="dense_captioning", every_steps=arg.eval_every,
          task=f"{MIXTURE}_dense_captions", split="validation",
          pp='value_range(-1, 1, key="images")', batch_size=50, decode=decode,
          max_examples=200, prompt_length=96, max_target_length=96),
      grounding=dict(
          type="temporal_grounding", every_steps=arg.eval_every, task=f"{MIXTURE}_grounding",
          split="validation", pp='value_range(-1, 1, key="images")', batch_size=100,
          decode=dict(method="greedy", max_decode_len=3), max_examples=500, prompt_length=48,
          max_target_length=4, mode=arg.grounding),
  )
  c.log_every_steps = 50
  c.steps_per_call = 10  # steps per compiled call, as in siglip_shapes.py
  c.checkpoint = dict(every_steps=500, max_to_keep=2, async_save=True)
  return c
