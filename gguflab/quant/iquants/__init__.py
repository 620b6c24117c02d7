"""The i-quants (IQ1_S ... IQ4_XS), the ternary types (TQ1_0, TQ2_0) and MXFP4: one module a
type family, each registering its types."""

# each module registers its types: IQ1_S, IQ1_M / IQ2_XXS, IQ2_XS, IQ2_S / IQ3_XXS, IQ3_S /
# IQ4_NL, IQ4_XS / MXFP4 / TQ1_0, TQ2_0
from . import iq1, iq2, iq3, iq4, mxfp4, ternary  # noqa: F401
