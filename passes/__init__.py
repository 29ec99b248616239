"""Graph passes. Importing this package registers every pass; they run in passes.registry.ORDER."""
from mfconvert.passes import add_attention  # noqa: F401  (registers "add-attention")
from mfconvert.passes import moe_mlp  # noqa: F401  (registers "moe-mlp")
from mfconvert.passes import shift_linear  # noqa: F401  (registers "shift-linear")
from mfconvert.passes import adder_conv  # noqa: F401  (registers "adder-conv", "shift-add-conv")
from mfconvert.passes import spatial_shift  # noqa: F401  (registers "spatial-shift")
from mfconvert.passes import conv  # noqa: F401  (registers "shift-conv")
from mfconvert.passes.registry import PASSES, pass_for, put_in_order

put_in_order()
