"""Charts of diagnoses (diagnose.py --chart draws them): the paper's Fig. 4, a radar chart of accuracy per source x
intervention, one polygon per run. matplotlib is imported only when a chart is drawn.
"""
import numpy as np

import perturb

TASKS = ("image_heavy", "text_heavy")  # the charts' tasks: those that have interference
SIZE = (7, 7)  # inches, at 100 dpi


def radar(path, summaries, names, sources, relative=False):
    """The paper's Fig. 4: a radar chart with one axis per (source, intervention) of the sources in order, orig
    included, the accuracy (relative: divided by the same run's orig accuracy on that source) on the radius,
    and one polygon per run."""
    from matplotlib.figure import Figure  # only the chart needs matplotlib
    axes = [(s, n) for s in sources for n in perturb.APPLIES if any(n in x.get(s, {}) for x in summaries)]
    angles = np.linspace(0, 2 * np.pi, len(axes), endpoint=False).tolist()
    fig = Figure(figsize=SIZE, dpi=100)
    ax = fig.add_subplot(projection="polar")
    ax.set_theta_offset(np.pi / 2)  # the first axis at the top, then clockwise
    ax.set_theta_direction(-1)
    top = 100.0
    for i, (summary, name) in enumerate(zip(summaries, names)):
        values = []
        for source, n in axes:
            cells = summary.get(source, {})
            acc = cells[n]["acc"] if n in cells else np.nan
            if relative:  # a source without orig, or with none right under it, has no ratio
                acc = acc / cells["orig"]["acc"] if cells.get("orig", {}).get("acc") else np.nan
            values.append(100 * acc)
        top = max(top, np.nanmax(values + [0]))
        ax.plot(angles + angles[:1], values + values[:1], color=f"C{i}", lw=2, marker="o", ms=4, label=name)
        if not np.isnan(values).any():  # a missing cell leaves a gap in the line, and no area to fill
            ax.fill(angles, values, color=f"C{i}", alpha=0.1)
    ax.set_xticks(angles, [f"{s}\n{n}" for s, n in axes])
    ax.tick_params(axis="x", pad=14)  # the axis names clear of the outer circle and the points on it
    ax.set_ylim(0, top * 1.05)
    ax.set_rlabel_position(180 / len(axes))  # the radius' numbers between the first two axes
    fig.suptitle("accuracy relative to the source's orig accuracy (%)" if relative else "accuracy (%)", y=0.98)
    fig.legend(loc="lower center", ncol=min(len(names), 4), frameon=False)
    fig.subplots_adjust(left=0.14, right=0.86, top=0.86, bottom=0.14)
    fig.savefig(path)
