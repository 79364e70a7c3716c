"""``make bench``: run every benchmark (each in its own process) and write experiments/benchmarks/RESULTS.md.

    python -m experiments.benchmarks.run_all [--quick] [--only loading,inference] [--out PATH]

Each benchmark also runs alone (``python -m experiments.benchmarks.<name> [--quick]``). Every figure
is a ratio against a baseline measured in the same run; the machine is described at the top of the
file, and each line names the command that reproduces it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from experiments.benchmarks.common import ROOT, fmt, machine_info

BENCHMARKS = (
    "loading", "datapipe", "inputs", "inference", "backends", "memory", "recipe_memory", "training",
    "synthetic", "node", "node_chaos",
)  # fmt: skip
DEFAULT_OUT = Path(__file__).with_name("RESULTS.md")


def run_one(name: str, quick: bool, tmp: Path) -> tuple[list[dict], float, str | None]:
    out = tmp / f"{name}.json"
    cmd = [sys.executable, "-m", f"experiments.benchmarks.{name}", "--json", str(out)]
    if quick:
        cmd.append("--quick")
    print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    dt = time.perf_counter() - t0
    lines = [x for x in proc.stdout.splitlines() if x.startswith(("[", "    ", "wrote", "trained"))]
    print("\n".join(lines), flush=True)
    if proc.returncode != 0 or not out.is_file():
        tail = "\n".join(proc.stdout.splitlines()[-15:])
        print(tail, flush=True)
        return [], dt, f"exit status {proc.returncode}: {tail.splitlines()[-1] if tail else ''}"
    return json.loads(out.read_text())["rows"], dt, None


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _ratio(row: dict) -> str:
    if row["ratio"] is None:
        return "—"
    if row.get("ratio_override") is not None:
        return f"{row['ratio']:.2f}× the baseline"
    text = f"**{row['ratio']:.2f}×**"
    if row["lower_is_better"] and row["unit"] == "s":
        text += " faster" if row["ratio"] >= 1 else f" ({1 / row['ratio']:.1f}× slower)"
    return text


def render(
    rows: list[dict],
    info: dict,
    durations: dict[str, float],
    errors: dict[str, str],
    quick: bool,
    only: str = "",
) -> str:
    """RESULTS.md; ``only``: the benchmarks run, when not all of them."""
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    total = sum(durations.values())
    out = [
        "# Benchmarks",
        "",
        f"Written by {'`make bench` (' if not only else ''}`python -m experiments.benchmarks.run_all"
        f"{' --quick' if quick else ''}{f' --only {only}' if only else ''}`{')' if not only else ''} "
        f"on {when}; the whole run took {total / 60:.1f} min "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in durations.items())}).",
        "",
        f"**Machine**: {info['cpu_model']}, nproc {info['nproc']} ({info['usable_cpus']} usable), "
        f"{info['ram_gib']} GiB RAM; Python {info['python']}, torch {info['torch']} "
        f"({info['torch_threads']} intra-op threads by default), numpy {info['numpy']}; {info['platform']}. "
        f"Load average at the start: {', '.join(map(str, info['load_average']))} — the cores are shared with "
        "other jobs, so absolute times move from run to run: every figure is a ratio against a baseline "
        "measured in the same process run, interleaved with it (A B, B A, …), medians of the repeats.",
        "",
        "Ratio: > 1 favours the figure over its baseline (baseline ÷ figure for times and memory, figure ÷ "
        "baseline for rates); 'N× the baseline' is figure ÷ baseline as such (a peak per volume). GPU lines "
        "are copied from `experiments/benchmarks/gpu_h100.json` (measured on an NVIDIA H100 by the lead with "
        "`experiments/benchmarks/gpu_throughput.py`), not rerun here.",
        "",
        "| # | benchmark | figure | baseline | ratio | goal | met? | command |",
        "|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for i, r in enumerate(rows, start=1):
        met = "—" if r["met"] is None else ("yes" if r["met"] else "**no**")
        base = f"{r['baseline_name']}: {fmt(r['baseline'], r['unit'])}" if r["baseline_name"] else "—"
        figure = f"{r['figure']}: **{fmt(r['value'], r['unit'])}**"
        cells = [str(i), r["benchmark"], figure, base, _ratio(r), r["goal"] or "—", met, f"`{r['command']}`"]
        out.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        if r.get("note"):
            notes.append(f"{i}. {r['note']}")
    for name, why in errors.items():
        out.append(f"| — | {name} | FAILED: {_cell(why)} | — | — | — | **no** | "
                   f"`python -m experiments.benchmarks.{name}` |")  # fmt: skip
    out += ["", "## Notes", "", *notes, ""]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated benchmark names")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n]
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        ap.error(f"unknown benchmarks {sorted(unknown)}; known: {BENCHMARKS}")
    info = machine_info()
    rows, durations, errors = [], {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        for name in names:
            got, durations[name], err = run_one(name, args.quick, Path(tmp))
            rows += got
            if err:
                errors[name] = err
    only = ",".join(names) if set(names) != set(BENCHMARKS) else ""
    args.out.write_text(render(rows, info, durations, errors, args.quick, only))
    print(f"wrote {args.out} ({sum(durations.values()) / 60:.1f} min)")
    if errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
