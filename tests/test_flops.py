"""Analytic model FLOPs (`vlpjax.flops`) against hand arithmetic, the published ViT-B/16
figure, and a second implementation: the matmuls of each family's traced forward pass.

The traced count (`flops.matmul_flops` of `jax.make_jaxpr(family.features)`) runs every
attention product in full, while the analytic count halves causal attention; each check adds
that masked half back by hand (`causal_excess`): 2 * L^2 * (heads x head_dim) per causal layer
and sequence. Nothing is compiled: params and batches are shapes only.
"""
import glob
import os

import jax
import pytest
from flax import linen as nn

from vlpjax import config as config_lib
from vlpjax import families
from vlpjax import flops
from vlpjax.models import vit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = os.path.join(REPO, "experiments")
CONFIGS = sorted(glob.glob(os.path.join(EXPERIMENTS, "*.py")))
BATCH = 2


# ------------------------------------------------------------------------------ helpers


def traced_forward_flops(family, batch_size: int = BATCH) -> float:
  """Matmul FLOPs of the family's traced `features` (its training forward pass)."""
  specs = family.input_specs(batch_size)
  params = nn.meta.unbox(jax.eval_shape(family.init, jax.random.PRNGKey(0), specs))
  jaxpr = jax.make_jaxpr(family.features)(params, specs, jax.random.PRNGKey(1))
  return flops.matmul_flops(jaxpr)


def causal_excess(tokens: int, q_dim: int, depth: int) -> float:
  """What the traced count has beyond the analytic one for a causal stack: the masked half."""
  return 2.0 * tokens ** 2 * q_dim * depth


def q_dim(dims) -> int:
  """heads x head_dim of a decoder's settings (head_dim defaults to width / heads)."""
  return dims["num_heads"] * (dims.get("head_dim") or dims["width"] // dims["num_heads"])


def tiny_config(experiment: str, arg: str = "", **sections):
  """An experiment config with `sections` merged in: {"model.image": {...}, "input": {...}}."""
  config = config_lib.load(os.path.join(EXPERIMENTS, experiment) + f":batch={BATCH},{arg}")
  for dotted, values in sections.items():
    node = config
    for key in dotted.split("."):
      node = node[key]
    for key, value in values.items():
      node[key] = value
  config.evals = {}
  return config_lib.finalize(config)


def assert_matches_trace(family, excess: float = 0.0):
  """forward_flops + the hand-derived `excess` == the traced matmuls; a step is 3x forward."""
  forward = family.forward_flops(BATCH)
  assert all(v > 0 for v in forward.values()), forward
  analytic = sum(forward.values())
  assert traced_forward_flops(family) == pytest.approx(analytic + excess, rel=1e-9)
  step = flops.step_model_flops(family, BATCH)
  assert step["total"] == pytest.approx(3 * analytic, rel=1e-12)
  assert set(step) == set(forward) | {"total"}


# ------------------------------------------------------------------------- hand numbers


def test_building_blocks_by_hand():
  assert flops.dense(5, 3, 7) == 2 * 5 * 3 * 7
  assert flops.attention(4, 6, 8) == 2 * (2 * 4 * 6 * 8)           # QK^T + AV
  assert flops.attention(6, 6, 8, causal=True) == 2 * 6 * 6 * 8     # half of 4 * 6 * 6 * 8
  # LoRA rank 2 on a 3 -> 7 map: x @ a (3 -> 2) and (.) @ b (2 -> 7) on top of the kernel.
  assert flops.lora_dense(5, 3, 7, 2) == 2 * 5 * (3 * 7 + 3 * 2 + 2 * 7)


def test_tiny_vit_by_hand():
  # 8 px images, patch 4: 4 patches of 4*4*3 values; width 8, 2 layers, MLP 16, MAP, proj 3.
  dims = dict(width=8, depth=2, mlp_dim=16, num_heads=2, patch_size=4)
  patch_embedding = 2 * 4 * (4 * 4 * 3) * 8
  projections = 4 * (2 * 4 * 8 * 8)       # q, k, v, out on 4 tokens
  attention = 2 * (2 * 4 * 4 * 8)         # QK^T and AV, 4 x 4 tokens
  mlp = 2 * 4 * 8 * 16 + 2 * 4 * 16 * 8
  map_head = (2 * 1 * 8 * 8 + 2 * (2 * 4 * 8 * 8) + 2 * (2 * 1 * 4 * 8) + 2 * 1 * 8 * 8
              + 2 * 1 * 8 * 16 + 2 * 1 * 16 * 8)   # probe q, k/v of 4 tokens, attn, out, MLP
  proj = 2 * 8 * 3
  want = patch_embedding + 2 * (projections + attention + mlp) + map_head + proj
  assert flops.vit_forward(dims, 8, pool_type="map", head_dim_out=3) == want
  # Global average pooling has no matmul; FLIP at 0.5 keeps 2 of the 4 patches in training.
  gap = patch_embedding + 2 * (projections + attention + mlp)
  assert flops.vit_forward(dims, 8, pool_type="gap") == gap
  kept = patch_embedding + 2 * (2 * 2 * 8 * 8 * 4 + 4 * 2 * 2 * 8 + (2 * 2 * 8 * 16) * 2)
  assert flops.vit_forward(dims, 8, pool_type="gap", patch_dropout=0.5, train=True) == kept


def test_tiny_decoder_by_hand():
  # 6 tokens, width 8, 4 heads of 4 (q 16) sharing 2 kv heads (kv 8), gated MLP 12, vocab 10.
  llm = dict(width=8, depth=1, mlp_dim=12, num_heads=4, num_kv_heads=2, head_dim=4,
             vocab_size=10)
  q, kv, o = 2 * 6 * 8 * 16, 2 * (2 * 6 * 8 * 8), 2 * 6 * 16 * 8
  causal_attention = 4 * 6 * 6 * 16 / 2
  gated_mlp = 3 * (2 * 6 * 8 * 12)
  logits = 2 * 6 * 8 * 10
  assert flops.decoder_forward(llm, 6) == q + kv + causal_attention + o + gated_mlp + logits
  # Cross-attention over 5 encoded tokens of width 3: q/o on the 6 tokens, k/v on the 5.
  cross = 2 * 6 * 8 * 16 + 2 * (2 * 5 * 3 * 8) + 4 * 6 * 5 * 16 + 2 * 6 * 16 * 8
  assert flops.decoder_forward(llm, 6, cross_tokens=5, cross_width=3) == (
      q + kv + causal_attention + o + cross + gated_mlp + logits)


def test_vit_b16_matches_the_published_17_6_gmacs():
  # ViT-B/16 at 224 px (class token, as in the paper): 17.6 GMACs = 35.2 GFLOPs forward.
  dims = vit.resolve_dims("B/16")
  forward = flops.vit_forward(dims, 224, pool_type="tok")
  assert forward / 2 == pytest.approx(17.6e9, rel=0.02)


def test_step_model_flops_is_three_forward_passes_and_checks_its_input():
  class Family:
    def forward_flops(self, batch_size):
      return {"image_encoder": 2.0 * batch_size, "decoder": 5.0 * batch_size}

  assert flops.step_model_flops(Family(), 4) == {"image_encoder": 24.0, "decoder": 60.0,
                                                 "total": 84.0}
  with pytest.raises(ValueError, match="batch_size > 0"):
    flops.step_model_flops(Family(), 0)
  with pytest.raises(TypeError, match="forward_flops"):
    flops.step_model_flops(object(), 4)


# ------------------------------------------------------- second implementation: the trace


def test_two_tower_with_heads_and_a_causal_text_tower_matches_the_trace():
  # embed_dim 16 differs from both widths: the ViT gets a `proj`, the text a `head`.
  config = tiny_config(
      "siglip_shapes.py", "size=16",
      **{"model.image": dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8),
         "model.text": dict(width=24, depth=1, mlp_dim=48, num_heads=2, max_len=8,
                            causal=True),
         "model": dict(embed_dim=16), "input": dict(text_length=8)})
  assert_matches_trace(families.get_family(config),
                       excess=BATCH * causal_excess(8, 24, depth=1))


def test_two_tower_with_flip_patch_dropout_matches_the_trace():
  # 32 px, patch 8: 16 patches, 8 kept in training, plus the class token.
  config = tiny_config(
      "siglip_shapes.py", "size=32,flip=0.5",
      **{"model.image": dict(width=32, depth=1, mlp_dim=64, num_heads=2, pool_type="tok"),
         "model.text": dict(width=32, depth=1, mlp_dim=64, num_heads=2, max_len=8),
         "model": dict(embed_dim=32), "input": dict(text_length=8)})
  family = families.get_family(config)
  assert_matches_trace(family)
  no_flip = families.get_family(tiny_config(
      "siglip_shapes.py", "size=32",
      **{"model.image": dict(width=32, depth=1, mlp_dim=64, num_heads=2, pool_type="tok"),
         "model.text": dict(width=32, depth=1, mlp_dim=64, num_heads=2, max_len=8),
         "model": dict(embed_dim=32), "input": dict(text_length=8)}))
  assert (family.forward_flops(BATCH)["image_encoder"]
          < no_flip.forward_flops(BATCH)["image_encoder"])


@pytest.mark.parametrize("num_caption_queries,patch_dropout", [(2, 0.5), (0, 0.0)])
def test_coca_matches_the_trace(num_caption_queries, patch_dropout):
  text = dict(vocab_size=64, width=24, unimodal_depth=1, multimodal_depth=2, mlp_dim=48,
              num_heads=4, num_kv_heads=2, max_len=8)
  config = tiny_config(
      "coca_shapes.py", "size=16",
      **{"model.image": dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8,
                             patch_dropout=patch_dropout),
         "model.text": text,
         "model": dict(embed_dim=16, num_caption_queries=num_caption_queries),
         "input": dict(text_length=6)})
  # Unimodal: [BOS, text] + cls = 7 positions; multimodal: 6; both causal.
  excess = BATCH * (causal_excess(7, q_dim(text), 1) + causal_excess(6, q_dim(text), 2))
  assert_matches_trace(families.get_family(config), excess)


def vlm_sections(**llm):
  llm = dict(dict(vocab_size=64, width=32, depth=2, mlp_dim=64, num_heads=4), **llm)
  return {"model.image": dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8),
          "model.llm": llm, "model": dict(image_token_id=60),
          "input": dict(task="", image_size=16, row_length=24, max_images_per_row=3)}


@pytest.mark.parametrize("experiment,projector,llm", [
    ("vlm_shapes.py", "linear", dict(num_kv_heads=2, lora_rank=2, tie_embeddings=False)),
    ("vlm_shapes.py", "mlp", dict(head_dim=6)),
    ("vlm_shapes.py", "mlp", dict(depth=3, scan_layers=True)),
    # Layout embeddings are lookups: the document model's matmuls are the VLM's.
    ("udop_docs.py", "mlp", dict(num_kv_heads=2)),
])
def test_vlm_and_document_match_the_trace(experiment, projector, llm):
  sections = vlm_sections(**llm)
  sections["model"]["projector"] = projector
  config = tiny_config(experiment, **sections)
  llm = sections["model.llm"]
  excess = BATCH * causal_excess(24, q_dim(llm), llm["depth"])
  assert_matches_trace(families.get_family(config), excess)


def video_sections(image=None, temporal=None, model=None, frame_feature_dim=0):
  llm = dict(vocab_size=1280, width=32, depth=2, mlp_dim=64, num_heads=4, num_kv_heads=2)
  return {"model.image": dict(dict(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=8),
                              **(image or {})),
          "model.temporal": dict(dict(depth=1), **(temporal or {})),
          "model.llm": llm, "model": dict(frame_feature_dim=frame_feature_dim, **(model or {})),
          "input": dict(task="", image_size=16, row_length=24, max_images_per_row=4,
                        task_loss_weights={}, frame_feature_dim=frame_feature_dim)}


@pytest.mark.parametrize("sections", [
    # Encoder-decoder, every patch of a frame kept (4 tokens per frame to cross-attend to).
    video_sections(image=dict(pool_type="none"), model=dict(architecture="encoder_decoder")),
    # Precomputed frame features, a temporal encoder of its own width, MLP projector.
    video_sections(temporal=dict(width=16, mlp_dim=24, num_heads=2), frame_feature_dim=12,
                   model=dict(architecture="prefix_lm", projector="mlp")),
], ids=["encoder_decoder_patches", "frame_features"])
def test_video_matches_the_trace(sections):
  config = tiny_config("vid2seq_shapes.py", **sections)
  excess = BATCH * causal_excess(24, q_dim(sections["model.llm"]), 2)
  assert_matches_trace(families.get_family(config), excess)


def test_video_with_map_pooling_and_grounding_head_matches_the_trace():
  sections = video_sections(image=dict(pool_type="map"),
                            model=dict(architecture="prefix_lm", grounding_head=True))
  config = tiny_config("vid2seq_shapes.py", **sections)
  rows, frames, length, width = BATCH, 4, 24, 32
  # Bookkeeping products that are gathers in disguise, not model work: the one-hot pick of
  # each frame's LM state ([B,L,N] x [B,L,D]) and the loss's two moment sums ([B,N,L] x [B,L]).
  bookkeeping = 2 * rows * frames * length * width + 2 * (2 * rows * frames * length)
  excess = rows * causal_excess(length, q_dim(sections["model.llm"]), 2) + bookkeeping
  family = families.get_family(config)
  assert "grounding_head" in family.forward_flops(BATCH)
  assert_matches_trace(family, excess)


# ------------------------------------------------------------------- experiment configs


def load_experiment(path: str, batch: int):
  config = config_lib.finalize(config_lib.load(f"{path}:batch={batch}"))
  return config, families.get_family(config)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_experiment_step_flops_are_positive_and_add_up(path):
  _, family = load_experiment(path, 8)
  step = flops.step_model_flops(family, 8)
  parts = {k: v for k, v in step.items() if k != "total"}
  assert len(parts) >= 2 and all(v > 0 for v in parts.values()), step
  assert step["total"] == pytest.approx(sum(parts.values()), rel=1e-12)
  assert step["total"] == pytest.approx(3 * sum(family.forward_flops(8).values()), rel=1e-12)
  # Linear in the batch: every count is per example (or packed row).
  assert flops.step_model_flops(family, 16)["total"] == pytest.approx(2 * step["total"])


def config_causal_excess(config, batch: int) -> float:
  """The masked causal half of a config's attention, read off the config by hand."""
  model = config.model
  if config.family == "two_tower":
    return 0.0 if not model.text.get("causal", False) else batch * causal_excess(
        config.input.text_length, model.text.width, model.text.depth)
  if config.family == "coca":
    text, length = model.text, config.input.text_length
    return batch * (causal_excess(length + 1, q_dim(text), text.unimodal_depth)
                    + causal_excess(length, q_dim(text), text.multimodal_depth))
  llm = model.llm
  return batch * causal_excess(config.input.row_length, q_dim(llm), llm.depth)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_experiment_forward_flops_match_the_trace(path):
  # The real-scale configs too: tracing needs shapes only (seconds, whatever the model's size).
  config, family = load_experiment(path, BATCH)
  assert not config.model.get("grounding_head", False)  # else add its bookkeeping products
  assert_matches_trace(family, config_causal_excess(config, BATCH))
