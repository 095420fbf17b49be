"""`torch.compile` with a way back: where compiling fails, the model runs as it is, with one warning.

Compiling needs a working toolchain (a C++ compiler for the CPU, Triton for GPUs) and meets graphs its
backend cannot handle; each surfaces as an error of its own type at the first call, not at
`torch.compile`. Issue 5 asks for the plain path then, never a crash or wrong numbers.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional

import torch


class CompiledOrEager:
    """Calls `torch.compile(fn)`. When that raises and `fn` itself does not, it warns once and calls `fn`
    from then on; an error that `fn` raises as well is the caller's, raised as `fn` raises it. Other
    attributes are `fn`'s (so `no_sync()` of a DistributedDataParallel works through it)."""

    def __init__(self, fn: Callable, **compile_options: Any) -> None:
        self.eager = fn
        self.compiled: Optional[Callable] = torch.compile(fn, **compile_options)
        self.fallback: Optional[str] = None  # why compiling failed, once it has

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.compiled is None:
            return self.eager(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        # No one type: Dynamo's, Inductor's, a C++ compiler's or Triton's errors all end up here.
        except Exception as error:
            result = self.eager(*args, **kwargs)
            # Dynamo wraps the compiler's own error (its message then starts "backend='inductor' raised:").
            cause = getattr(error, "inner_exception", None) or error
            lines = str(cause).strip().splitlines()
            self.compiled, self.fallback = None, f"{type(cause).__name__}: {lines[0] if lines else ''}".rstrip(": ")
            warnings.warn(f"torch.compile failed ({self.fallback}); running without it.", stacklevel=2)
            return result

    def __getattr__(self, name: str) -> Any:
        if name == "eager":  # not set yet (while unpickling, say): no recursion
            raise AttributeError(name)
        return getattr(self.eager, name)
