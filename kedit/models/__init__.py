"""Model loading and architecture knowledge."""

from kedit.models.arch import ARCHS, Arch, UnsupportedArchitecture, arch_of, get_module
from kedit.models.loading import DEFAULT_MODEL, OFFLINE_MODELS, ModelNotFound, cache_dir, load_model
from kedit.models.registry import register

__all__ = ["ARCHS", "Arch", "DEFAULT_MODEL", "ModelNotFound", "OFFLINE_MODELS", "UnsupportedArchitecture", "arch_of",
           "cache_dir", "get_module", "load_model",
           "register"]
