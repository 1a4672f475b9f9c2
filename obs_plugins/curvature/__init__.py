from .batching import batch_loss, default_forward
from .core import Curvature
from .linalg import InverseFactor, damped, greedy_obs, inverse_factor, obs_solve

__all__ = ["Curvature", "batch_loss", "default_forward", "InverseFactor", "damped", "greedy_obs", "inverse_factor", "obs_solve"]
