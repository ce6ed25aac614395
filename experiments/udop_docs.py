"""UDOP-style document model on the embedded rendered pages: the CPU document demo.

  python -m vlpjax.train --config experiments/udop_docs.py --workdir /tmp/udop_docs

A tiny ViT reads the 64 px page (patch 8: 64 tokens), an MLP projector puts its tokens into a
tiny Llama-style LM, and every OCR token's embedding gets the embedding of its word's box
(`vlpjax.models.document.LayoutEmbedding`), so text and layout enter the LM together. It
trains on UDOP's three self-supervised objectives (joint text-layout reconstruction, layout
modeling, visual text recognition) and document QA at `qa_rate` times their rate (UDOP mixes
supervised tasks into its pretraining), QA's answer tokens weighted `qa_weight` in the loss.
Answers and boxes come back as text and `<loc_k>` tokens.

Evals on held-out pages: `layout` (layout modeling: each masked group's box, decoded from four
loc tokens; accuracy at IoU >= 0.5 beside the mean-box baseline) and `qa` (exact match and
ANLS beside the most frequent training answer).
"""
import ml_collections

from data_mixtures import documents as document_tasks
from vlpjax import config as config_lib
from vlpjax import sharding

MIXTURE = "udop_docs_mixture"


def register_tasks(image_size: int, qa_rate: float) -> str:
  """The UDOP objectives and QA over the embedded pages at `image_size` px, and their mixture.

  Registered here because the page resolution is an argument (every host loads this config).
  """
  document_tasks.register_documents_udop("udop_docs", image_size=image_size)
  document_tasks.register_documents_qa("udop_docs_qa", image_size=image_size)
  return document_tasks.register_udop_qa_mixture(
      MIXTURE, qa_rate=qa_rate, udop_name="udop_docs", qa_name="udop_docs_qa").name


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, steps=1200, batch=16, rules="data_parallel", eval_every=600,
                             width=128, size=64, patch=8, qa_rate=1.0,
                             qa_weight=3.0)
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.total_steps = arg.steps
  c.global_batch_size = arg.batch   # packed rows
  c.data_modules = ("data_mixtures.documents",)

  c.input = dict(
      task=register_tasks(arg.size, arg.qa_rate), split="train",
      pp='value_range(-1, 1, key="images")',
      image_size=arg.size, shuffle_buffer=5_000,
      # A page: (size / patch)^2 = 64 image tokens + prompt and OCR words (~30-70 tokens) +
      # targets (<= ~25).
      row_length=256, max_images_per_row=3, tokens_per_image=0,
      # A QA answer is 1-4 tokens against ~10-25 for the other objectives: weight its tokens
      # up so that it is not drowned in the gradient.
      task_loss_weights={"udop_docs_qa": arg.qa_weight})

  c.family = "document"
  c.model_name = "document"
  w = arg.width
  c.model = dict(
      image=dict(width=w, depth=2, mlp_dim=4 * w, num_heads=4, patch_size=arg.patch,
                 posemb="learn"),
      llm=dict(vocab_size=1280,  # the multimodal vocabulary's 1213 ids, padded
               width=w, depth=3, mlp_dim=4 * w, num_heads=4, num_kv_heads=2),
      projector="mlp",
      layout_bins=128,
  )
  c.compute_dtype = "float32"  # CPUs have no fast bf16 matmul; pod configs use bfloat16.

  c.optim = dict(lr=2e-3, weight_decay=1e-4, grad_clip_norm=1.0)
  c.schedule = dict(type="cosine", warmup_steps=100)

  c.mesh, c.sharding_rules = sharding.parallelism(arg.rules)

  pp = 'value_range(-1, 1, key="images")'
  c.evals = dict(
      layout=dict(
          type="document_layout", every_steps=arg.eval_every,
          task="udop_docs_layout_modeling", split="validation", pp=pp, batch_size=100,
          decode=dict(method="greedy", max_decode_len=32), max_examples=300,
          prompt_length=192, max_target_length=32),
      qa=dict(
          type="document_qa", every_steps=arg.eval_every, task="udop_docs_qa",
          split="validation", pp=pp, batch_size=100,
          decode=dict(method="greedy", max_decode_len=8), max_examples=500,
          prompt_length=192, max_target_length=8),
  )
  c.log_every_steps = 50
  c.steps_per_call = 10  # steps per compiled call, as in siglip_shapes.py
  c.checkpoint = dict(every_steps=500, max_to_keep=2, async_save=True)
  return c
