"""The table of ``experiments/gpu/scale_check.sh``: reads what its three parts left in OUT_DIR
(``lean.json``, ``cache/bench.md``, ``relax.json``, ``failed.txt``) and prints one markdown
summary. A part without its file is reported as missing, never skipped silently.

    python experiments/gpu/scale_summary.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def lean_lines(path: Path) -> list[str]:
    import bench_lean

    res = json.loads(path.read_text())
    lines = ["| measurement | value | details |", "|---|---|---|"]
    for r in bench_lean.rows(res):
        lines.append(f"| {r['what']} | {r['value']} | {r.get('compare', '')} |")
    return lines


def relax_lines(path: Path) -> list[str]:
    res = json.loads(path.read_text())
    return [
        "| crystals | device | one per forward | batched | ratio | max rel. volume diff |",
        "|---|---|---|---|---|---|",
        f"| {len(res['batched'])} | {res['device']} | {res['sequential_s']:.1f} s | "
        f"{res['batched_s']:.1f} s (batch_size {res['batch_size']}) | {res['ratio']:.2f}x | "
        f"{res['max_rel_volume_diff']:.1e} |",
    ]


def summary(out: Path) -> str:
    parts = [f"# GPU scale check ({out})", ""]
    device = out / "device.txt"
    parts += [f"device: {device.read_text().strip() if device.exists() else 'unknown'}", ""]
    failed = out / "failed.txt"
    if failed.exists():
        parts += ["failed parts: " + "; ".join(failed.read_text().split("\n")).strip("; "), ""]
    sections = [
        ("Training step, full vs lean (energy + forces + stress)", out / "lean.json", lean_lines),
        ("Cached-feature builds", out / "cache" / "bench.md", lambda p: p.read_text().splitlines()),
        ("Relaxation, batched vs one crystal per forward", out / "relax.json", relax_lines),
    ]
    for title, path, fmt in sections:
        parts += [f"## {title}", ""]
        parts += fmt(path) if path.exists() else [f"missing: {path} (the part did not finish)"]
        parts.append("")
    return "\n".join(parts)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python experiments/gpu/scale_summary.py OUT_DIR")
    print(summary(Path(sys.argv[1])))
