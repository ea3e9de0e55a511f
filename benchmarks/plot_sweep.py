"""Draw a sweep's JSON (``python -m dalle_space.bench --sweep --json F``) as the PNG kept in docs/.

    python benchmarks/plot_sweep.py docs/results/sweep-cpu-mini.json docs/sweep-cpu-mini.png

Three panels, the Benchmark tab's two plots and the floor: seconds per image, memory per image, and the
fraction of the weight-streaming floor each row reaches. matplotlib is a dev dependency: the Space itself
draws these with gradio's native plots.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = [("s_per_image", "seconds per image", "log"), ("memory_per_image_mib", "MiB per image", "linear"),
          ("floor_fraction", "fraction of the weight-streaming floor", "linear")]
COLOURS = {"serial": "tab:blue", "parallel": "tab:orange", "conditional": "tab:green"}


def plot(result: dict, out: Path) -> None:
    figure, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.6), constrained_layout=True)
    modes = list(dict.fromkeys(row["mode"] for row in result["rows"]))
    for axis, (field, title, scale) in zip(axes, PANELS):
        for mode in modes:
            rows = [r for r in result["rows"] if r["mode"] == mode and r[field] is not None]
            label = f"{mode} (scale 1)" if mode == "conditional" else mode
            axis.plot([r["images"] for r in rows], [r[field] for r in rows], "o-", color=COLOURS[mode], label=label)
        axis.set_xscale("log", base=2)
        counts = sorted({r["images"] for r in result["rows"]})
        axis.set_xticks(counts, [str(n) for n in counts])
        axis.set_yscale(scale)
        axis.set_xlabel("images per prompt")
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
    axes[-1].set_ylim(0, 1)
    axes[0].legend()
    machine = result.get("machine", {})
    figure.suptitle(f"{result['settings'].get('preset') or result['settings'].get('model')}, "
                    f"{result['settings']['dtype']}, condition scale {result['condition_scale']:g} · "
                    f"{machine.get('cpu', '')} ({machine.get('backend', '')}) · "
                    f"{result['bandwidth_gbs']:.1f} GB/s measured")
    figure.savefig(out, dpi=110)


if __name__ == "__main__":
    plot(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))
