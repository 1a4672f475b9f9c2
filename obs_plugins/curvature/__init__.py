from .core import Curvature, default_forward
from .linalg import InverseFactor, damped, greedy_obs, inverse_factor, obs_solve

__all__ = ["Curvature", "default_forward", "InverseFactor", "damped", "greedy_obs", "inverse_factor", "obs_solve"]
