from ...registry import register_method
from .config import OBSIHTConfig
from .solver import obs_sweep, solve

register_method("obs_iht", OBSIHTConfig, solve, kind="one-shot",
                description="Iterative Optimal Brain Surgeon: OBS sweep + curvature-preconditioned IHT steps")

__all__ = ["OBSIHTConfig", "obs_sweep", "solve"]
