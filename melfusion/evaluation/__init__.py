"""Measuring generated music as the paper does (section 4.2): FAD, FD, KL and IMSM (eq. 8)."""
