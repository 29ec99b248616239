"""Graph passes. Importing this package registers every pass, in the order they run."""
from mfconvert.passes import shift_linear  # noqa: F401  (registers "shift-linear")
from mfconvert.passes.registry import PASSES, pass_for  # noqa: F401
