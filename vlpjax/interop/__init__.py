"""Checkpoint interop with other frameworks (Hugging Face, big_vision)."""
from vlpjax.interop.hf_clip import (hf_clip_config, hf_clip_from_params,
                                    params_from_hf_clip,
                                    twotower_kwargs_from_hf_clip_config)
from vlpjax.interop.hf_lm import load_hf_decoder
from vlpjax.interop.hf_siglip import (hf_siglip_config, hf_siglip_from_params,
                                      params_from_hf_siglip,
                                      twotower_kwargs_from_hf_config)
from vlpjax.interop.posemb import resample_posemb

__all__ = ["hf_clip_config", "hf_clip_from_params", "hf_siglip_config",
           "hf_siglip_from_params", "load_hf_decoder", "params_from_hf_clip",
           "params_from_hf_siglip", "resample_posemb", "twotower_kwargs_from_hf_clip_config",
           "twotower_kwargs_from_hf_config"]
