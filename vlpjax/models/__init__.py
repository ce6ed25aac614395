"""Model registry: configs name a model family by string."""
from vlpjax.models.coca import CoCa
from vlpjax.models.decoder import Decoder
from vlpjax.models.document import DocumentModel
from vlpjax.models.text import TextEncoder
from vlpjax.models.two_tower import TwoTower
from vlpjax.models.video import VideoModel
from vlpjax.models.vit import ViT
from vlpjax.models.vlm import VLM
from vlpjax.registry import Registry

MODELS = Registry("model")
MODELS.register("two_tower")(TwoTower)
MODELS.register("vit")(ViT)
MODELS.register("text")(TextEncoder)
MODELS.register("decoder")(Decoder)
MODELS.register("coca")(CoCa)
MODELS.register("vlm")(VLM)
MODELS.register("document")(DocumentModel)
MODELS.register("video")(VideoModel)


def get_model(name: str):
  """The model class registered as `name` (error lists the nearest names)."""
  return MODELS.get(name)
