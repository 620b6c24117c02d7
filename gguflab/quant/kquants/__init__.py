"""The K-quants: 256-weight super-blocks with 6- or 8-bit sub-block scales."""

from . import q2_k, q3_k, q4_k, q5_k, q6_k, q8_k  # noqa: F401  (each registers its type)
