"""oneMKL's first call of a vector-math op races between threads (_vector_math):
importing torchpmap settles every such op on one thread, so replicas that make
their first call at once compute what one thread computes, bit for bit."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from torchpmap._vector_math import VML_OPS, settle_vector_math

ROOT = Path(__file__).resolve().parent.parent
needs_mkl = pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="PyTorch built without MKL")


class _Recorder(TorchDispatchMode):
    """Which (op, dtype, device) pairs run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, torch.dtype, str]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        first = args[0] if args else None
        if isinstance(first, torch.Tensor):
            self.seen.add((func.overloadpacket.__name__, first.dtype, first.device.type))
        return func(*args, **(kwargs or {}))


def _every_vml_call() -> set[tuple[str, torch.dtype, str]]:
    return {(name, dtype, "cpu") for name in VML_OPS for dtype in (torch.float32, torch.float64)}


# oneMKL's real unary vector-math functions, by their VML name, and the torch op
# that ATen computes with each (None: no torch op does).
_VML_FUNCTIONS = {
    "Abs": "abs", "Acos": "acos", "Acosh": "acosh", "Asin": "asin", "Asinh": "asinh", "Atan": "atan",
    "Atanh": "atanh", "Cbrt": None, "CdfNorm": None, "CdfNormInv": None, "Ceil": "ceil", "Cos": "cos",
    "Cosh": "cosh", "Erf": "erf", "Erfc": "erfc", "ErfcInv": None, "ErfInv": "erfinv", "Exp": "exp",
    "Exp2": "exp2", "Exp10": None, "Expm1": "expm1", "Floor": "floor", "Frac": "frac", "Inv": "reciprocal",
    "InvCbrt": None, "InvSqrt": "rsqrt", "LGamma": "lgamma", "Ln": "log", "Log10": "log10", "Log1p": "log1p",
    "Log2": "log2", "NearbyInt": None, "Rint": None, "Round": "round", "Sin": "sin", "Sinh": "sinh",
    "Sqr": "square", "Sqrt": "sqrt", "Tan": "tan", "Tanh": "tanh", "TGamma": None, "Trunc": "trunc",
}  # fmt: skip


def _torch_cpu_library() -> ctypes.CDLL | None:
    lib = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    return ctypes.CDLL(str(lib)) if lib.exists() else None  # already loaded by torch: this only finds it


@needs_mkl
def test_every_vector_math_kernel_the_wheel_links_is_settled():
    # The wheel links oneMKL statically and exports exactly the VML kernels ATen calls:
    # a PyTorch that sends one more op to VML must find it in VML_OPS (erfinv was missing).
    lib = _torch_cpu_library()
    if lib is None:
        pytest.skip("no libtorch_cpu.so (not a Linux wheel)")
    linked = {name for name in _VML_FUNCTIONS if hasattr(lib, f"vms{name}")}
    assert linked, "found no VML kernel in libtorch_cpu: the probe is broken"
    unknown = sorted(name for name in linked if _VML_FUNCTIONS[name] is None)
    assert not unknown, f"libtorch_cpu links VML's {unknown}: which torch ops use them? settle those"
    missing = sorted({_VML_FUNCTIONS[name] for name in linked} - set(VML_OPS))
    assert not missing, f"VML_OPS misses {missing}"


@needs_mkl
def test_settling_calls_every_vector_math_op_in_both_precisions_on_the_cpu():
    recorder = _Recorder()
    # Under a default device that is not the CPU's, it still settles the CPU's ops.
    with torch.device("meta"), recorder:
        settle_vector_math()
    missing = _every_vml_call() - recorder.seen
    assert not missing, f"not settled: {sorted((n, str(d)) for n, d, _ in missing)}"


@needs_mkl
@pytest.mark.subprocess
def test_importing_torchpmap_settles_them_before_anything_else_runs():
    # The recorder is written out here: importing this file would import torchpmap first.
    code = textwrap.dedent(
        """
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        class Recorder(TorchDispatchMode):
            seen = set()

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if args and isinstance(args[0], torch.Tensor) and args[0].device.type == "cpu":
                    self.seen.add((func.overloadpacket.__name__, str(args[0].dtype)))
                return func(*args, **(kwargs or {}))

        with Recorder():
            import torchpmap
        print(sorted(Recorder.seen))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    seen = set(eval(out.stdout.strip().splitlines()[-1]))  # a list of (name, dtype) tuples we printed
    missing = {(n, str(d)) for n, d, _ in _every_vml_call()} - seen
    assert not missing, f"the import did not settle {sorted(missing)}"
