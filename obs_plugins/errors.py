class CurvatureError(RuntimeError):
    """Curvature could not be used: non-finite statistics, or a factorisation failed after the damping ladder."""


class PruningInputError(ValueError):
    """A user argument is invalid; the message names the argument. The model has not been changed."""


class TiedWeightWarning(UserWarning):
    """A pruned tensor is shared with a module that was not listed (tied embeddings): both will change."""
