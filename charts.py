"""Charts of diagnoses (diagnose.py --chart draws them): the paper's Fig. 4, a radar chart of accuracy per source x
intervention, one polygon per run; and the robustness curve of runs with attack rows (evaluate.py --attack-eps):
delta_cp against the attack's radius, one line per run, one panel per task kind. matplotlib is imported only when a
chart is drawn.
  python diagnose.py --chart curve.png out/vanilla/predictions.jsonl out/ours/predictions.jsonl
"""
import os

import numpy as np

import perturb

TASKS = ("image_heavy", "text_heavy")  # the charts' tasks: those that have interference
SIZE, CURVE_SIZE = (7, 7), (10, 4.5)  # inches, at 100 dpi
FORMATS = (".png", ".pdf", ".svg")
KINDS = ("auto", "radar", "curve")


def problem(path, kind=None, relative=False):
    """Why no chart can be written to `path` (None: no --chart) of that kind, or None: asked before anything else
    is written."""
    if path is None:
        return "--chart-kind and --relative are options of --chart" if kind or relative else None
    if relative and kind == "curve":
        return "--relative is an option of the radar chart (--chart-kind radar)"
    if os.path.isdir(path) or os.path.splitext(path)[1].lower() not in FORMATS:
        return f"--chart {path}: name a file ending {', '.join(FORMATS)}"
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        return f"--chart {path}: its folder does not exist"
    return None


def radar(path, summaries, names, sources, relative=False):
    """The paper's Fig. 4: a radar chart with one axis per (source, intervention) of the sources in order, orig
    included, the accuracy (relative: divided by the same run's orig accuracy on that source) on the radius,
    and one polygon per run."""
    from matplotlib.figure import Figure  # only the chart needs matplotlib
    axes = [(s, n) for s in sources for n in perturb.ordered({n for x in summaries for n in x.get(s, {})})]
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


def attacked(rows):
    """Whether a run's rows hold attack rows (evaluate.py --attack-eps)."""
    return any(perturb.attack_radius(r["intervention"]) for r in rows)


def scales(runs):
    """The radius scales of the runs' attack rows: {"none"} absolute, {"std"} relative (--attack-scale std)."""
    return {perturb.attack_scale(r["intervention"]) for rows in runs for r in rows
            if perturb.attack_radius(r["intervention"])}


def which(kind, runs):
    """The chart --chart-kind asks for: auto is the curve when some run holds attack rows, the radar otherwise."""
    return kind if kind in ("radar", "curve") else "curve" if any(map(attacked, runs)) else "radar"


def unfit(paths, runs, kind, relative=False):
    """Why the runs cannot be charted so, or None: the radar's axes are image- and text-heavy sources, the curve's
    points attack rows, and every run must have some (asked before any diagnosis.json is written)."""
    if relative and which(kind, runs) == "curve":
        return "--relative is an option of the radar chart, and these runs hold attack rows: add --chart-kind radar"
    if which(kind, runs) == "curve" and len(scales(runs)) > 1:
        return ("the runs' attack radii are absolute in some rows and relative to the embeddings' std in others "
                "(evaluate.py --attack-scale std): one axis cannot show both; chart them apart")
    for path, rows in zip(paths, runs):
        if which(kind, runs) == "curve" and not attacked(rows):
            return (f"{path}: no attack rows for the robustness curve (evaluate.py --attack-eps), while other runs "
                    "have some: leave it out, or pass --chart-kind radar")
        if not any(r["task"] in TASKS for r in rows):
            return (f"{path}: no image-heavy or text-heavy rows, and the radar chart's axes are their sources x "
                    "interventions (VQA has no interference to chart)")
    return None


def curve_points(runs, summarize):
    """{task kind: [[(radius, delta_cp, ci low, ci high), ...] of each run, by radius]}: each run's attack rows of a
    task kind pooled over its sources (summarize: diagnose's, applied with the task kind as the source)."""
    pooled = [summarize([dict(r, source=r["task"]) for r in rows if r["task"] in TASKS]) for rows in runs]
    return {task: [sorted((perturb.attack_radius(n), c["delta_cp"], *c["ci"]) for n, c in p.get(task, {}).items()
                          if perturb.attack_radius(n)) for p in pooled]
            for task in TASKS if any(perturb.attack_radius(n) for p in pooled for n in p.get(task, {}))}


def curve(path, points, names, scale="none"):
    """delta_cp (its 95% bootstrap interval as error bars) against the attack radius on a log axis: one panel per task
    kind of curve_points, one line per run."""
    from matplotlib.figure import Figure  # only the chart needs matplotlib
    fig = Figure(figsize=CURVE_SIZE, dpi=100)
    axes = fig.subplots(1, len(points), squeeze=False)[0]
    for ax, (task, runs) in zip(axes, points.items()):
        for i, (line, name) in enumerate(zip(runs, names)):
            if line:
                eps, d, lo, hi = map(np.array, zip(*line))
                ax.errorbar(eps, d, yerr=[d - lo, hi - d], color=f"C{i}", marker="o", ms=4, capsize=3, label=name)
        ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(task.replace("_", "-"))
        ax.set_xlabel("attack radius (L-inf, input embeddings" + (", x their std)" if scale == "std" else ")"))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("delta_cp (share of clean answers flipped)")
    handles = {h.get_label(): h for ax in axes for h in ax.get_legend_handles_labels()[0]}
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 4), frameon=False)
    fig.subplots_adjust(left=0.08, right=0.97, top=0.9, bottom=0.25, wspace=0.25)
    fig.savefig(path)


def draw(path, kind, runs, summaries, names, relative, summarize):
    """diagnose.py --chart: the chart `kind` picks (which()) of the runs' rows and summaries; returns what it wrote."""
    if which(kind, runs) == "curve":
        curve(path, curve_points(runs, summarize), names, *scales(runs))
        return f"wrote {path} (robustness curve)"
    tasks = {x["source"]: x["task"] for rows in runs for x in rows if x["task"] in TASKS}
    sources = sorted(tasks, key=lambda s: (TASKS.index(tasks[s]), s))  # image-heavy ones first
    radar(path, summaries, names, sources, relative)
    return f"wrote {path} (radar chart)"
