"""CoCa on the embedded shapes data: the captioning CPU demo.

  python -m vlpjax.train --config experiments/coca_shapes.py --workdir /tmp/coca_shapes
  python -m vlpjax.train --config experiments/coca_shapes.py:steps=300,loss=sigmoid ...

A tiny ViT (patch 8 on 32 px images: 16 tokens, all of them cross-attended by the captioning
decoder) and a 2 + 2 layer text decoder, trained from scratch with CoCa's two losses
(softmax contrastive + 2 x captioning). Held-out evals every `eval_every` steps and at the
end: greedy captions scored with CIDEr-D against a constant-caption baseline, and zero-shot
classification over the 20 colour x shape classes through the contrastive half.
"""
import ml_collections

from vlpjax import config as config_lib
from vlpjax import sharding
from vlpjax.data import shapes


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, steps=1200, batch=64, size=32, loss="softmax",
                             rules="data_parallel", eval_every=400)
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = arg.steps
  c.global_batch_size = arg.batch

  text_length = 16
  c.input = dict(
      task="shapes_captions", split="train",
      pp=f"random_resized_crop({arg.size}, scale=(0.8, 1.0))|value_range(-1, 1)",
      image_size=arg.size, text_length=text_length, shuffle_buffer=5_000)

  c.family = "coca"
  c.model_name = "coca"
  width = 128
  c.model = dict(
      image=dict(width=width, depth=4, mlp_dim=4 * width, num_heads=4, patch_size=8,
                 posemb="learn"),
      text=dict(vocab_size=512, width=width, unimodal_depth=2, multimodal_depth=2,
                mlp_dim=4 * width, num_heads=4,
                # RoPE has no position table, so max_len only bounds lengths; 32 lets
                # `vlpjax.predict` decode with its default max_decode_len.
                max_len=32),
      embed_dim=width,
      num_caption_queries=0,   # 16 image tokens: no need to pool them for the decoder.
      temperature_init=2.66 if arg.loss == "softmax" else 2.3,   # log(1/0.07) / log(10)
      bias_init=None if arg.loss == "softmax" else -10.0,
  )
  c.loss = arg.loss
  c.loss_weights = dict(contrastive=1.0, caption=2.0)   # the paper's 1:2
  c.compute_dtype = "float32"  # CPUs have no fast bf16 matmul; pod configs use bfloat16.

  c.optim = dict(lr=1e-3, weight_decay=1e-4, grad_clip_norm=1.0)
  c.schedule = dict(type="cosine", warmup_steps=100)

  c.mesh, c.sharding_rules = sharding.parallelism(arg.rules)

  eval_pp = f"resize({arg.size})|value_range(-1, 1)"
  c.evals = dict(
      captioning=dict(type="captioning", every_steps=arg.eval_every, task="shapes_captions",
                      split="validation", pp=eval_pp, batch_size=256,
                      decode=dict(method="greedy", max_decode_len=text_length),
                      # The best constant caption of a grid search over templates, colours,
                      # shapes, sizes and positions (CIDEr-D 0.90 on these 500 examples).
                      max_examples=500, baseline_caption="a small yellow square at the top"),
      zeroshot=dict(type="zeroshot_classification", every_steps=arg.eval_every,
                    task="shapes_captions", split="validation", pp=eval_pp, batch_size=256,
                    class_names=list(shapes.CLASS_NAMES),
                    templates=["a {}", "a picture of a {}", "{}"]),
  )
  c.log_every_steps = 50
  c.steps_per_call = 10  # steps per compiled call, as in siglip_shapes.py
  c.checkpoint = dict(every_steps=400, max_to_keep=2, async_save=True)
  return c
