"""One folder per method (PEFT style). Importing this package registers every method."""
from . import magnitude, obs_iht  # noqa: F401

try:  # added by its own issue; keep the core importable while it is being written
    from . import continuous_sparsification  # noqa: F401
except ImportError as _e:  # pragma: no cover
    if "continuous_sparsification" not in str(_e):
        raise

try:  # added by its own issue (BiP); keep the core importable while it is being written
    from . import bip  # noqa: F401
except ImportError as _e:  # pragma: no cover
    if "bip" not in str(_e):
        raise
