"""obs-plugins: second-order (Optimal Brain Surgeon) and learned-mask pruning for the tools you already use.

Core (this package) imports nothing but torch.  Host adapters live in ``obs_plugins.integrations``; the
torch.nn.utils.prune methods are re-exported here lazily for convenience (``from obs_plugins import OBSIHT``).
"""
from . import methods as _methods  # noqa: F401  (registers the methods)
from .curvature import Curvature
from .errors import CurvatureError, PruningInputError, TiedWeightWarning, UnprunedWeightsWarning
from .masks import PrunePlan
from .methods.magnitude import MagnitudeConfig, WandaConfig
from .methods.obs_iht import OBSIHTConfig
from .registry import (config_from_dict, config_to_dict, get_method, list_methods, register_method,
                       unregister_method)
from .targets import Target, prunable_linear_targets, resolve_targets

__version__ = "0.1.0"

_LAZY = {
    "OBSIHT": "obs_plugins.integrations.torch_prune",
    "ContinuousSparsification": "obs_plugins.integrations.torch_prune",
    "ContinuousSparsifier": "obs_plugins.methods.continuous_sparsification",
    "CSConfig": "obs_plugins.methods.continuous_sparsification",
    "BiP": "obs_plugins.integrations.torch_prune",
    "BiPTrainer": "obs_plugins.methods.bip",
    "BiPConfig": "obs_plugins.methods.bip",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'obs_plugins' has no attribute {name!r}")


__all__ = ["Curvature", "CurvatureError", "PruningInputError", "TiedWeightWarning", "UnprunedWeightsWarning", "PrunePlan", "MagnitudeConfig", "WandaConfig",
           "OBSIHTConfig", "config_from_dict", "config_to_dict", "get_method", "list_methods", "register_method",
           "unregister_method", "Target", "prunable_linear_targets", "resolve_targets", *_LAZY]
