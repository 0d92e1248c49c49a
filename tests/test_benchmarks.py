"""The benchmark scripts run and report sane numbers (tiny settings)."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # torch.compile looks functions' modules up by name
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_compile_benchmark_reports_eager_and_compiled(capsys):
    rows = _load("bench_compile").main(["--devices", "2", "--steps", "2", "--backend", "eager"])
    assert [r["mode"] for r in rows] == ["eager", "compiled (eager)"]
    for r in rows:
        assert r["first_call_s"] > 0 and r["steady_ms"] > 0
    # Same program, same data: compiled and eager train identically.
    assert abs(rows[0]["final_loss"] - rows[1]["final_loss"]) < 1e-5
    assert "first call" in capsys.readouterr().out


@pytest.mark.subprocess
def test_run_prints_a_table_and_writes_json(tmp_path, capsys):
    import json

    out = _load("run").main(
        [
            "--devices",
            "2",
            "--quick",
            "--compile-backend",
            "none",
            "--no-jax",
            "--no-ddp",
            "--json",
            str(tmp_path / "r.json"),
            "--markdown",
            str(tmp_path / "r.md"),
        ]
    )
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["meta"]["devices"] == [2] and data["results"] == out["results"]
    cases = {(r["case"], r["impl"], r["devices"]) for r in data["results"]}
    for case in ("dispatch", "psum", "bandwidth", "train_first_call", "train_step"):
        assert (case, "torchpmap", 2) in cases
    assert ("train_step", "pytorch_single", 2) in cases
    assert all(r["sec_per_call"] > 0 for r in data["results"])
    table = (tmp_path / "r.md").read_text()
    assert "| psum of (n, 1024) | 2 |" in table and "skipped (--no-jax)" in table
    assert "Measured" in capsys.readouterr().out


def test_the_readme_table_is_the_one_run_py_wrote():
    run = _load("run")
    text = run.README.read_text()
    start, end = text.index(run.README_START), text.index(run.README_END)
    assert text[start + len(run.README_START) : end].strip() == (BENCH / "RESULTS.md").read_text().strip()


def test_update_readme_replaces_only_the_table(tmp_path):
    run = _load("run")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{run.README_START}\nold table\n{run.README_END}\nrest\n")
    run.update_readme(readme, "new table\n")
    assert readme.read_text() == f"intro\n{run.README_START}\n\nnew table\n\n{run.README_END}\nrest\n"
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="markers"):
        run.update_readme(readme, "x")


@pytest.mark.parametrize("case", ["dispatch", "feedback", "psum", "pmean_tree", "mlp"])
def test_count_instructions_cases_run(case):
    # The counting itself needs valgrind and takes a minute: here each case runs as it would be counted.
    out = _load("count_instructions").main([case, "--no-valgrind", "--calls", "2", "--warmup", "1"])
    assert out == {"case": case, "calls": 3}
