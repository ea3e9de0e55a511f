"""Draw an adherence run's JSON (``python -m dalle_space.adherence --json F``) as a PNG for docs/.

    python benchmarks/plot_adherence.py adherence.json adherence.png

Rate against condition scale, one colour per measure; solid lines for prompts of pairs seen in training,
dashed for HELD_OUT pairs, so the gap between a colour's two lines is what generalising to new pairs costs.
The dotted vertical line is the app's default scale; the wide line is all attributes right at once.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

LINE_STYLES = {"seen": "-", "held_out": "--"}
GROUP_LABELS = {"seen": "seen pairs", "held_out": "held-out pairs"}
WIDE = 3.0  # the all-correct line, the one that sums up the others


def plot(result: dict, out: Path) -> None:
    settings = result["settings"]
    measures = settings["measures"]
    colours = {measure: f"C{i}" for i, measure in enumerate(measures)}
    figure, axis = plt.subplots(figsize=(7.5, 4.5), constrained_layout=True)
    for group, style in LINE_STYLES.items():
        rows = sorted((r for r in result["rows"] if r["group"] == group), key=lambda r: r["scale"])
        for measure in measures:
            axis.plot([r["scale"] for r in rows], [r[measure] for r in rows], style, marker="o", markersize=3,
                      color=colours[measure], linewidth=WIDE if measure == "all" else 1.5)
    axis.axvline(settings["default_scale"], color="grey", linestyle=":", linewidth=1)
    scales = sorted({r["scale"] for r in result["rows"]})
    axis.set_xticks(scales, [f"{s:g}" for s in scales])
    axis.set_ylim(0, 1)
    axis.set_xlabel(f"condition scale (dotted: the app's default, {settings['default_scale']:g})")
    axis.set_ylabel("fraction of images right")
    axis.grid(True, alpha=0.3)
    handles = [Line2D([], [], color=colours[m], linewidth=WIDE if m == "all" else 1.5, label=m) for m in measures]
    handles += [Line2D([], [], color="black", linestyle=LINE_STYLES[g], label=GROUP_LABELS[g]) for g in LINE_STYLES]
    axis.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    axis.set_title(f"{settings['model']}: {settings['prompts_per_group']} prompts per group x "
                   f"{settings['images_per_prompt']} images per scale, seed {settings['seed']}"
                   + (f", top-k {settings['top_k']}" if "top_k" in settings else ""))
    figure.savefig(out, dpi=110)


if __name__ == "__main__":
    plot(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))
