"""Graph passes. Importing this package registers every pass, in the order they run."""
from mfconvert.passes import add_attention  # noqa: F401  (registers "add-attention"; runs first)
from mfconvert.passes import moe_mlp  # noqa: F401  (registers "moe-mlp"; claims MLP linears before shift-linear)
from mfconvert.passes import shift_linear  # noqa: F401  (registers "shift-linear")
from mfconvert.passes import adder_conv  # noqa: F401  (registers "adder-conv", "shift-add-conv"; before shift-conv, which takes the convs they leave — and before spatial_shift, whose import of passes.conv registers shift-conv)
from mfconvert.passes import spatial_shift  # noqa: F401  (registers "spatial-shift"; before the conv passes, which take the pointwise convs it scales)
from mfconvert.passes import conv  # noqa: F401  (registers "shift-conv"; after the adder passes, alongside shift-linear)
from mfconvert.passes.registry import PASSES, pass_for  # noqa: F401
