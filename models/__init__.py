"""Mamba and DeciMamba language models (see models/mamba_lm.py)."""
from models.config import MambaConfig
from models.mamba_lm import DecimatingMambaModel, LMOutput, MambaLMHeadModel
from modules.decimation import DecimationConfig

__all__ = ["MambaConfig", "MambaLMHeadModel", "DecimatingMambaModel", "DecimationConfig", "LMOutput"]
