"""The K-quants: 256-weight super-blocks with 6- or 8-bit sub-block scales."""
