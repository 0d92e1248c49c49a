"""Every benchmark case, side by side with jax.pmap and PyTorch's own options.

    python benchmarks/run.py                     # 1, 2, 4, 8 devices; table + JSON
    python benchmarks/run.py --plot plots/       # also matplotlib plots
    python benchmarks/run.py --devices 2 4 --quick --compile-backend none

Each device count runs in fresh processes (JAX's device count is fixed when it
starts: XLA_FLAGS=--xla_force_host_platform_device_count=N; torchpmap gets
TORCHPMAP_CPU_DEVICES=N), so the numbers of one table come from one run on one
machine. JAX is optional (pip install -e '.[bench]'); without it its columns
say so. Writes the results as JSON and the table as Markdown.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES = [
    ("dispatch", "dispatch: x * 2 on (n, 16)"),
    ("psum", "psum of (n, 1024)"),
    ("pmean_tree", "pmean of a 100-leaf dict of (n, 16)"),
    ("bandwidth", "bandwidth: x * 2 + 1 on (n, 1e6)"),
    ("train_first_call", "MLP train step, first call (s)"),
    ("train_step", "MLP train step, steady state"),
]


def _run_json(cmd: list[str], env: dict, timeout: float) -> tuple[list[dict], str | None]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return [], f"timed out after {timeout:.0f} s"
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return [], f"failed: {tail[0][:200]}"
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("["):
            return json.loads(line), None
    return [], "printed no results"


def _have_jax() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import jax"], capture_output=True)
    return probe.returncode == 0


def collect(
    devices: list[int], quick: bool, compile_backend: str, jax: bool, ddp: bool
) -> tuple[list[dict], list[str]]:
    rows, notes = [], []
    base = {**os.environ, "PYTHONUNBUFFERED": "1"}
    quick_flag = ["--quick"] if quick else []
    for n in devices:
        env = {**base, "TORCHPMAP_CPU_DEVICES": str(n)}
        got, err = _run_json(
            [
                sys.executable,
                str(HERE / "cases_torchpmap.py"),
                "--devices",
                str(n),
                "--compile-backend",
                compile_backend,
                *quick_flag,
            ],
            env,
            900,
        )
        rows += got
        if err:
            notes.append(f"torchpmap, {n} devices: {err}")
        got, err = _run_json(
            [
                sys.executable,
                str(HERE / "cases_pytorch.py"),
                "--devices",
                str(n),
                *quick_flag,
                *([] if ddp else ["--no-ddp"]),
            ],
            env,
            600,
        )
        rows += got
        if err:
            notes.append(f"PyTorch baselines, {n} devices: {err}")
        if jax:
            jenv = {**base, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}
            got, err = _run_json(
                [sys.executable, str(HERE / "cases_jax.py"), "--devices", str(n), *quick_flag], jenv, 600
            )
            rows += got
            if err:
                notes.append(f"jax.pmap, {n} devices: {err}")
    return rows, notes


def _fmt(sec: float | None, case: str) -> str:
    if sec is None:
        return "-"
    if case == "train_first_call":
        return f"{sec:.3f} s"
    return f"{sec * 1e6:.0f} us" if sec < 1e-3 else f"{sec * 1e3:.2f} ms"


# The columns compared with jax.pmap, and their headings.
_RATIOS = [
    ("torchpmap", "torchpmap / jax"),
    ("torchpmap_stacked", "stacked / jax"),
    ("torchpmap_compiled_stacked", "compiled stacked / jax"),
]


def table(rows: list[dict], devices: list[int]) -> str:
    def get(case, impl, n):
        for r in rows:
            if r["case"] == case and r["impl"] == impl and r["devices"] == n:
                return r["sec_per_call"]
        return None

    impls = [
        i
        for i in (
            "torchpmap",
            "torchpmap_stacked",
            "torchpmap_lockstep",
            "torchpmap_compiled",
            "torchpmap_compiled_stacked",
            "torchpmap_compiled_lockstep",
            "jax",
            "pytorch_single",
            "pytorch_ddp_2proc",
        )
        if any(r["impl"] == i for r in rows)
    ]
    head = ["case", "devices", *impls]
    ratios = [(i, label) for i, label in _RATIOS if i in impls] if "jax" in impls else []
    head += [label for _, label in ratios]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case, label in CASES:
        for n in devices:
            values = [get(case, i, n) for i in impls]
            if all(v is None for v in values):
                continue
            cells = [label, str(n), *[_fmt(v, case) for v in values]]
            theirs = get(case, "jax", n)
            for ours_impl, _ in ratios:
                ours = get(case, ours_impl, n)
                cells.append(f"{ours / theirs:.2f}" if ours and theirs else "-")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], devices: list[int], folder: Path) -> list[Path]:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    made = []
    per_call = [c for c in CASES if c[0] != "train_first_call"]
    fig, axes = plt.subplots(1, len(per_call), figsize=(4 * len(per_call), 3.8))
    for ax, (case, label) in zip(axes, per_call):
        for impl in sorted({r["impl"] for r in rows if r["case"] == case}):
            pts = sorted((r["devices"], r["sec_per_call"]) for r in rows if r["case"] == case and r["impl"] == impl)
            ax.plot([p[0] for p in pts], [p[1] * 1e3 for p in pts], marker="o", label=impl)
        ax.set(title=label, xlabel="devices", ylabel="ms per call", xscale="log", yscale="log")
        ax.set_xticks(devices, [str(d) for d in devices])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.legend(fontsize=7)
    fig.tight_layout()
    made.append(folder / "time_vs_devices.png")
    fig.savefig(made[-1])
    sized = [r for r in rows if "size" in r]
    if sized:
        n = max(r["devices"] for r in sized)
        fig, ax = plt.subplots(figsize=(5, 3.8))
        for impl in sorted({r["impl"] for r in sized}):
            pts = sorted((r["size"], r["sec_per_call"]) for r in sized if r["impl"] == impl and r["devices"] == n)
            if len(pts) > 1:
                ax.plot([p[0] for p in pts], [p[1] * 1e3 for p in pts], marker="o", label=impl)
        ax.set(
            title=f"x * 2 + 1 over {n} devices",
            xlabel="elements per device",
            ylabel="ms per call",
            xscale="log",
            yscale="log",
        )
        ax.legend(fontsize=7)
        fig.tight_layout()
        made.append(folder / "time_vs_size.png")
        fig.savefig(made[-1])
    return made


README = HERE.parent / "README.md"
# The README's benchmark table lies between these lines; run.py rewrites what is between them.
README_START = "<!-- benchmarks/run.py writes the table below; do not edit it by hand -->"
README_END = "<!-- end of the table benchmarks/run.py writes -->"


def update_readme(path: Path, report: str) -> None:
    """Replace what lies between the README's benchmark markers with ``report``."""
    text = path.read_text()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise SystemExit(f"run.py: {path} lacks the benchmark markers:\n{README_START}\n{README_END}")
    head = text[: start + len(README_START)]
    path.write_text(head + "\n\n" + report.strip() + "\n\n" + text[end:])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and sizes")
    ap.add_argument("--compile-backend", default="inductor", help="'none' skips the compiled torchpmap column")
    ap.add_argument("--no-jax", action="store_true")
    ap.add_argument("--no-ddp", action="store_true")
    ap.add_argument("--json", default=str(HERE / "results.json"))
    ap.add_argument("--markdown", default=str(HERE / "RESULTS.md"))
    ap.add_argument("--plot", metavar="DIR", help="write matplotlib plots to DIR")
    ap.add_argument(
        "--readme",
        help="also put the table into this README between its benchmark markers "
        "(default: the project's README.md when --markdown is the default RESULTS.md; 'none' skips)",
    )
    args = ap.parse_args(argv)
    readme = args.readme
    if readme is None:
        readme = str(README) if Path(args.markdown).resolve() == (HERE / "RESULTS.md").resolve() else "none"

    jax = not args.no_jax and _have_jax()
    rows, notes = collect(args.devices, args.quick, args.compile_backend, jax, not args.no_ddp)
    if args.no_jax:
        notes.append("jax.pmap columns skipped (--no-jax)")
    elif not jax:
        notes.append("jax is not installed: jax.pmap columns skipped (pip install -e '.[bench]')")
    import torch

    meta = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "devices": args.devices,
        "quick": args.quick,
    }
    if jax:
        meta["jax"] = subprocess.run(
            [sys.executable, "-c", "import jax; print(jax.__version__)"], capture_output=True, text=True
        ).stdout.strip()
    text = table(rows, args.devices)
    header = (
        f"Measured {meta['date']} on {meta['machine']}; Python {meta['python']}, torch {meta['torch']}"
        + (f", jax {meta['jax']}" if jax else "")
        + ". Median time per call, lower is better; "
        "`torchpmap / jax` below 1 means torchpmap is faster."
    )
    report = header + "\n\n" + text + ("\n\nNotes:\n" + "\n".join(f"- {n}" for n in notes) if notes else "") + "\n"
    print(report)
    Path(args.json).write_text(json.dumps({"meta": meta, "notes": notes, "results": rows}, indent=1))
    Path(args.markdown).write_text(report)
    if readme != "none":
        update_readme(Path(readme), report)
        print(f"table written into {readme}")
    if args.plot:
        for p in plot(rows, args.devices, Path(args.plot)):
            print(f"plot: {p}")
    return {"meta": meta, "notes": notes, "results": rows}


if __name__ == "__main__":
    main()
