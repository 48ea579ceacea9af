"""The paper's causal diagnostic: delta_cp = mean over samples of [argmax P != argmax P'], P under `orig`, P' under an
intervention on the task-irrelevant modality, with a 95% bootstrap interval; also accuracy, total variation, the
worst intervention and MMBench's CircularEval accuracy. Writes diagnosis.json beside the predictions
(docs/evaluation.md).
  python diagnose.py out/eval/predictions.jsonl                     # one run
  python diagnose.py out/vanilla/predictions.jsonl out/ours/predictions.jsonl    # two runs side by side
  python diagnose.py --model out/toy/vanilla --data data/toy/test.jsonl --out out/eval   # evaluate first
  python diagnose.py --chart radar.png out/vanilla/predictions.jsonl out/ours/predictions.jsonl   # Fig. 4 (or curve)
"""
import argparse
import json
import os
import sys

import numpy as np

import charts
import perturb
from perturb import DataError

KEYS = ("id", "task", "source", "intervention", "probs", "pred", "answer")
# How evaluate.py chose each answer: the option letters' logits (files from before --score have no "score"
# key), or parsing a generated text (probs null, pred null when no option could be read from it).
SCORES = ("logits", "generate")


def distribution(probs):
    return (isinstance(probs, list) and len(probs) >= 2 and all(isinstance(p, (int, float)) for p in probs)
            and abs(sum(probs) - 1) <= 1e-3 and min(probs) >= 0)


def read(path):
    """Rows of a predictions file, checked; every problem names the file and line."""
    rows, first, seen, scored = [], {}, set(), None
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file (pass the predictions.jsonl that evaluate.py wrote)")
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e})") from None
            missing = [k for k in KEYS if k not in r] if isinstance(r, dict) else list(KEYS)
            if missing:
                raise DataError(f"{where}: missing {', '.join(missing)} (each line is one prediction: "
                                "docs/format.md, 'Predictions')")
            name, probs, score = r["intervention"], r["probs"], r.get("score", "logits")
            if score not in SCORES:
                raise DataError(f"{where}: score {score!r} is not one of {', '.join(SCORES)}")
            scored = scored or (score, lineno)
            if score != scored[0]:
                raise DataError(f"{where}: a {score!r}-scored row after {scored[0]!r}-scored ones (line {scored[1]}): "
                                "one file holds one run, scored one way")
            if r["task"] not in perturb.applies(name):  # attack rows too ("attack@0.01": evaluate --attack-eps)
                raise DataError(f"{where}: intervention {name!r} does not apply to task {r['task']!r}")
            generated = score == "generate"
            if not distribution(probs) and not (generated and probs is None):
                raise DataError(f"{where}: probs must be a distribution over >= 2 options"
                                + (" or null (a generated answer)" if generated else "") + f", not {probs!r:.60}")
            n = len(probs) if probs else r.get("n_options")  # a generated answer: its n_options, where written
            if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 2):
                raise DataError(f"{where}: n_options {n!r} is not a number of options (2 or more)")
            for k in ("pred", "answer"):
                if r[k] is None and k == "pred" and generated:
                    continue  # the parser read no option from the text: a wrong answer, and one of its own
                if not isinstance(r[k], int) or isinstance(r[k], bool) or r[k] < 0 or (n and r[k] >= n):
                    raise DataError(f"{where}: {k} {r[k]!r} is not an option index" + (f" below {n}" if n else ""))
            if not generated and probs[r["pred"]] < max(probs):  # a generated answer need not be the argmax
                raise DataError(f"{where}: pred {r['pred']} is not an argmax of probs")
            ident = (r["task"], r["source"], r["answer"], n, r.get("question_id"))
            if first.setdefault(r["id"], (ident, lineno))[0] != ident:
                raise DataError(f"{where}: id {r['id']!r} has task/source/answer/options/question_id {ident} here "
                                f"but {first[r['id']][0]} on line {first[r['id']][1]}")
            if (r["id"], name) in seen:
                raise DataError(f"{where}: a second {name!r} row for id {r['id']!r}")
            seen.add((r["id"], name))
            rows.append((lineno, r))
    if not rows:
        raise DataError(f"{path}: no predictions")
    for lineno, r in rows:
        if (r["id"], "orig") not in seen:
            raise DataError(f"{path}:{lineno}: {r['intervention']!r} row of id {r['id']!r} has no 'orig' row "
                            "to compare with")
    return [r for _, r in rows]


def bootstrap_ci(flips, n_boot=1000, seed=0):
    """95% percentile interval of the mean, resampling samples with replacement (fixed seed)."""
    flips = np.asarray(flips, dtype=float)
    idx = np.random.default_rng(seed).integers(0, len(flips), size=(n_boot, len(flips)))
    lo, hi = np.percentile(flips[idx].mean(1), [2.5, 97.5])
    return [float(lo), float(hi)]


def circular_acc(cell):
    """CircularEval: (the share of questions whose every pass is right, None if no question is whole; how many
    questions were left out). A question is its rows sharing a question_id, one pass per option when whole: one that
    misses passes could only look better, so it is not counted."""
    passes = {}
    for r in cell.values():
        passes.setdefault(r.get("question_id", r["id"]), []).append(r)
    whole = [rs for rs in passes.values() if len(rs) == rs[0].get("n_options", len(rs[0]["probs"] or ()))
             or "question_id" not in rs[0]]
    right = [all(r["pred"] == r["answer"] for r in rs) for rs in whole]
    return (float(np.mean(right)) if right else None), len(passes) - len(whole)


def summarize(rows, n_boot=1000, seed=0):
    """{source: {intervention: {n, acc, delta_cp, ci[, tv][, unparsed][, circular_acc]}}} in intervention
    order. An unparsed answer (pred None) is wrong, and an answer of its own for delta_cp: parsed under orig and
    unparsed under the intervention is a change, unparsed under both is not. tv is over the pairs with probs."""
    by = {}
    for r in rows:
        by.setdefault(r["source"], {}).setdefault(r["intervention"], {})[r["id"]] = r
    out = {}
    for source in sorted(by):
        orig = by[source].get("orig", {})
        out[source] = {}
        for name in perturb.ordered(by[source]):
            cell = by[source][name]
            acc = float(np.mean([r["pred"] == r["answer"] for r in cell.values()]))
            pairs = [(orig[i], r) for i, r in cell.items()]
            flips = [a["pred"] != b["pred"] for a, b in pairs]
            tv = [0.5 * float(np.abs(np.subtract(a["probs"], b["probs"])).sum()) for a, b in pairs
                  if a["probs"] is not None and b["probs"] is not None]
            out[source][name] = {"n": len(cell), "acc": acc, "delta_cp": float(np.mean(flips)),
                                 "ci": [0.0, 0.0] if name == "orig" else bootstrap_ci(flips, n_boot, seed)}
            if tv:
                out[source][name]["tv"] = float(np.mean(tv))
            unparsed = sum(r["pred"] is None for r in cell.values())
            if unparsed:
                out[source][name]["unparsed"] = unparsed
            if any("question_id" in r for r in cell.values()):
                acc, left_out = circular_acc(cell)
                out[source][name].update(circular_acc=acc, **({"circular_incomplete": left_out} if left_out else {}))
    return out


def worst(cells):
    """The lowest accuracy under any heuristic intervention but orig (the paper's "Perturbed" column), and which."""
    perturbed = {n: c["acc"] for n, c in cells.items() if n != "orig" and n in perturb.APPLIES}  # no attack
    return min(perturbed.items(), key=lambda kv: kv[1]) if perturbed else (None, None)


# Columns a table shows only when some cell has them: (heading, the cell's text).
EXTRA = {"unparsed": ("unparsed", lambda c: str(c.get("unparsed", 0))),
         "circular_acc": ("circular acc", lambda c: "" if "circular_acc" not in c else ("-" if c["circular_acc"] is None
                          else f"{100 * c['circular_acc']:.1f}") + (f" ({c['circular_incomplete']} incomplete "
                          "questions left out)" if c.get("circular_incomplete") else ""))}


def table(summary):
    extra = [k for k in EXTRA if any(k in c for cells in summary.values() for c in cells.values())]
    head = ["source", "intervention", "n", "acc", "delta_cp", "95% CI", "TV"] + [EXTRA[k][0] for k in extra]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for source, cells in summary.items():
        for name, c in cells.items():
            cols = [source, name, str(c["n"]), f"{100 * c['acc']:.1f}", f"{c['delta_cp']:.3f}",
                    f"[{c['ci'][0]:.3f}, {c['ci'][1]:.3f}]", f"{c['tv']:.3f}" if "tv" in c else "-"]
            lines.append("| " + " | ".join(cols + [EXTRA[k][1](c) for k in extra]) + " |")
        name, acc = worst(cells)
        if name:
            lines.append(f"| {source} | worst ({name}) | | {100 * acc:.1f} | | | |" + " |" * len(extra))
    return "\n".join(lines)


def compare(*summaries, names):
    """Runs side by side: accuracy, delta_cp and n per source x intervention (like Table 5's rows)."""
    head = [f"{k} {n}" for k in ("acc", "delta_cp", "n") for n in names]
    lines = ["| source | intervention | " + " | ".join(head) + " |", "|---" * (len(head) + 2) + "|"]
    for source in sorted(set().union(*summaries)):
        for name in perturb.ordered({n for s in summaries for n in s.get(source, {})}):
            cells = [s.get(source, {}).get(name) for s in summaries]
            if any(cells):
                cols = [f"{100 * c['acc']:.1f}" if c else "-" for c in cells]
                cols += [f"{c['delta_cp']:.3f}" if c else "-" for c in cells]
                cols += [str(c["n"]) if c else "0" for c in cells]
                lines.append(f"| {source} | {name} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def labels(paths):
    """The shortest path parts telling the files apart: .../vanilla/eval/predictions.jsonl and
    .../ours/eval/predictions.jsonl are "vanilla" and "ours". One file is named by its path as given."""
    if len(paths) == 1:
        return list(paths)
    parts = [os.path.abspath(q).split(os.sep) for q in paths]
    while min(map(len, parts)) > 1 and len({q[0] for q in parts}) == 1:
        parts = [q[1:] for q in parts]
    while min(map(len, parts)) > 1 and len({q[-1] for q in parts}) == 1:
        parts = [q[:-1] for q in parts]
    names = ["/".join(q) for q in parts]
    return names if len(set(names)) == len(names) else [chr(ord("A") + i) for i in range(len(names))]


def sample_differences(runs, names):
    """Per source, the sample ids some run lacks: the runs' numbers are not over the same questions."""
    ids = [{} for _ in runs]
    for side, rows in zip(ids, runs):
        for r in rows:
            side.setdefault(r["source"], set()).add(r["id"])
    out = []
    for source in sorted(set().union(*ids)):
        every = set().union(*(side.get(source, set()) for side in ids))
        for side, name in zip(ids, names):
            missing = sorted(every - side.get(source, set()))
            if missing:
                out.append(f"{source}: {len(missing)} samples missing from {name} ({', '.join(missing[:5])}"
                           + (", ..." if len(missing) > 5 else "") + ")")
    return out


def output_path(path):
    """diagnosis.json beside predictions.jsonl (docs/format.md, 'Predictions'); NAME.diagnosis.json beside any
    other NAME.jsonl."""
    folder, name = os.path.split(os.path.abspath(path))
    if name == "predictions.jsonl":
        return os.path.join(folder, "diagnosis.json")
    return os.path.join(folder, (name[:-len(".jsonl")] if name.endswith(".jsonl") else name) + ".diagnosis.json")


def diagnose(path, n_boot=1000, seed=0, rows=None):
    """Summarize one predictions file and write its diagnosis beside it (see output_path)."""
    summary = summarize(rows or read(path), n_boot, seed)
    out = output_path(path)
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    os.replace(out + ".tmp", out)
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("predictions", nargs="*", help="one predictions.jsonl, two to compare (with --chart, any number)")
    p.add_argument("--model", help="evaluate this model first (with --data and --out)")
    p.add_argument("--data", nargs="+")
    p.add_argument("--out")
    p.add_argument("--overwrite", action="store_true", help="with --model: replace predictions of other settings")
    p.add_argument("--protocol", default="ours", choices=["ours", "authors"], help="with --model: evaluate.py's "
                   "--protocol (authors: their prompt, generated answers parsed for an option, 336 px canvases)")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="of the bootstrap and of the interventions")
    p.add_argument("--chart", metavar="FILE.png", help="also draw a chart: the robustness curve when a run holds "
                   "attack rows (evaluate.py --attack-eps: delta_cp and its 95%% CI against the radius, a panel per "
                   "task kind, a line per run), else a radar chart (the paper's Fig. 4: an axis per image- or "
                   "text-heavy source x intervention, accuracy on the radius, a polygon per run)")
    p.add_argument("--chart-kind", choices=charts.KINDS, help="with --chart: which one (default auto, as above)")
    p.add_argument("--relative", action="store_true", help="with --chart: accuracy relative to the same run's "
                   "orig accuracy on that source")
    args = p.parse_args(argv)
    paths = args.predictions
    problem = charts.problem(args.chart, args.chart_kind, args.relative)
    if args.n_boot < 1:
        problem = f"--n-boot {args.n_boot}: the interval needs at least 1 bootstrap resample (1000 by default)"
    if problem:  # before any diagnosis.json is written
        p.error(problem)
    if args.model:
        import evaluate
        if not (args.data and args.out) or paths:
            p.error("--model needs --data and --out, and no predictions file")
        rank, device, dtype = evaluate.setup()
        try:
            evaluate.run(args.model, args.data, args.out, seed=args.seed, device=device, dtype=dtype,
                         overwrite=args.overwrite, **evaluate.PROTOCOLS[args.protocol])
        except (evaluate.RunError, DataError) as e:
            sys.exit(f"error: {e}")
        if rank != 0:  # under torchrun, rank 0 alone diagnoses what all ranks scored
            return
        paths = [os.path.join(args.out, "predictions.jsonl")]
    if not paths or (len(paths) > 2 and not args.chart):
        p.error("give one predictions file, two to compare (any number with --chart), or --model with --data and --out")
    try:
        rows = [read(path) for path in paths]
    except DataError as e:
        sys.exit(f"error: {e}")
    problem = args.chart and charts.unfit(paths, rows, args.chart_kind, args.relative)
    if problem:
        sys.exit(f"error: {problem}")
    summaries = [diagnose(path, args.n_boot, args.seed, r) for path, r in zip(paths, rows)]
    for path, summary in zip(paths, summaries):
        print(f"{path} -> {output_path(path)}\n{table(summary)}\n")
    names = labels(paths)
    if len(paths) > 1:
        print(compare(*summaries, names=names))
        differ = sample_differences(rows, names)
        if differ:
            print("warning: the runs cover different samples, so their numbers differ by that too:\n  "
                  + "\n  ".join(differ), file=sys.stderr)
        scores = [r[0].get("score", "logits") for r in rows]
        if len(set(scores)) > 1:
            print("warning: the runs were scored differently (" + ", ".join(f"{n}: {s}" for n, s in zip(names, scores))
                  + "), so their numbers differ by that too", file=sys.stderr)
    if args.chart:
        print(charts.draw(args.chart, args.chart_kind, rows, summaries, names, args.relative,
                          lambda r: summarize(r, args.n_boot, args.seed)))


if __name__ == "__main__":
    main()
