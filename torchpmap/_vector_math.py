"""Settle MKL's vector-math kernels on one thread before replicas run at once.

On x86, PyTorch computes contiguous float32 and float64 unary ops (``tanh``,
``exp``, ``log``, ``sin``, ``sqrt``, ...) with oneMKL's vector math library
(VML), asking for its high-accuracy kernels. oneMKL picks the kernel lazily,
on first use, and the oneMKL in PyTorch's wheels (2024.2) races there: when
several threads make that first call at the same moment, one of them can run
the low-accuracy AVX2 kernel instead, for that one call, and return results
off by up to ~1e-4 relative, with no error (pytorch/pytorch#188792).

The threads executor starts every replica at once, so the first call of a
fresh process was exposed: a 2 x 2 training test saw one replica's first
``tanh`` come out this way about once in 120 runs (it matched oneMKL's AVX2
low-accuracy kernel bit for bit). Calling each such op once, here, on the
importing thread, settles the dispatch before any replica (or any intra-op
thread of the stacked executor) can race for it. (The choice is shared by
VML's ops: settling the others settled ``erfinv`` too, before it was listed.
Each is called all the same, in case another oneMKL keeps one per op.)
"""

from __future__ import annotations

import torch

# The unary ops ATen sends to VML for float32 and float64 (aten/src/ATen/cpu/vml.h;
# the wheel's libtorch_cpu exports exactly the VML kernels it links, and a test
# checks every one of them is here). An op PyTorch computes itself (abs, expm1 and
# log1p in torch 2.13, sent to VML by other versions) only costs a microsecond.
VML_OPS = (
    "abs",
    "acos",
    "asin",
    "atan",
    "cos",
    "erf",
    "erfc",
    "erfinv",
    "exp",
    "expm1",
    "log",
    "log10",
    "log1p",
    "log2",
    "sin",
    "sqrt",
    "tan",
    "tanh",
    "trunc",
)


def settle_vector_math() -> None:
    """Call every VML-backed op once per precision on this thread (a no-op
    without MKL, e.g. on ARM)."""
    if not torch.backends.mkl.is_available():
        return
    with torch.no_grad():
        for dtype in (torch.float32, torch.float64):
            # In (0, 1): inside every op's domain (erfinv's is (-1, 1)). Explicitly on the CPU: a
            # ``with torch.device(...)`` around the import must not move it.
            x = torch.full((1,), 0.5, dtype=dtype, device="cpu")
            for name in VML_OPS:
                getattr(torch, name)(x)
