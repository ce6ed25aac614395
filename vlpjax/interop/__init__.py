"""Checkpoint interop with other frameworks (Hugging Face, big_vision)."""
from vlpjax.interop.hf_lm import load_hf_decoder
from vlpjax.interop.hf_siglip import (hf_siglip_from_params,
                                      params_from_hf_siglip,
                                      twotower_kwargs_from_hf_config)

__all__ = ["hf_siglip_from_params", "load_hf_decoder", "params_from_hf_siglip",
           "twotower_kwargs_from_hf_config"]
