"""The benchmark scripts run and report sane numbers (tiny settings)."""
import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # torch.compile looks functions' modules up by name
    spec.loader.exec_module(mod)
    return mod


def test_compile_benchmark_reports_eager_and_compiled(capsys):
    rows = _load("bench_compile").main(["--devices", "2", "--steps", "2", "--backend", "eager"])
    assert [r["mode"] for r in rows] == ["eager", "compiled (eager)"]
    for r in rows:
        assert r["first_call_s"] > 0 and r["steady_ms"] > 0
    # Same program, same data: compiled and eager train identically.
    assert abs(rows[0]["final_loss"] - rows[1]["final_loss"]) < 1e-5
    assert "first call" in capsys.readouterr().out
