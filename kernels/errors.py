"""The one domain error of `kernels`: a caller asked for something the kernels do not support."""

from __future__ import annotations


class QuantizationError(ValueError):
    """A caller mistake: bad bits, group size, axis, backend, shape, dtype, device or layout.

    The message names the bad value and what is allowed. Broken invariants inside the package
    are `assert`s instead.
    """
