"""The paper's causal diagnostic: how often an intervention on the task-irrelevant modality changes the
answer. delta_cp = mean over samples of [argmax P != argmax P'], P under `orig`, P' under the
intervention, with a 95% bootstrap interval; also accuracy, mean total variation |P - P'|_TV and the
worst-perturbation accuracy per source; where rows carry a "question_id" (MMBench's CircularEval passes),
also circular_acc: the share of questions whose every pass is right. Writes diagnosis.json beside the
predictions (SPEC section 5), one per input: NAME.diagnosis.json for a file NAME.jsonl not named predictions.jsonl.
  python diagnose.py out/eval/predictions.jsonl                     # one run
  python diagnose.py out/vanilla/predictions.jsonl out/ours/predictions.jsonl    # two runs side by side
  python diagnose.py --model out/toy/vanilla --data data/toy/test.jsonl --out out/eval   # evaluate first
"""
import argparse
import json
import os
import sys

import numpy as np

import perturb
from perturb import DataError

KEYS = ("id", "task", "source", "intervention", "probs", "pred", "answer")


def read(path):
    """Rows of a predictions file, checked; every problem names the file and line."""
    rows, first, seen = [], {}, set()
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
                raise DataError(f"{where}: missing {', '.join(missing)} (each line is one SPEC section 5 object)")
            name, probs = r["intervention"], r["probs"]
            if name not in perturb.APPLIES or r["task"] not in perturb.APPLIES[name]:
                raise DataError(f"{where}: intervention {name!r} does not apply to task {r['task']!r}")
            if not isinstance(probs, list) or len(probs) < 2 or abs(sum(probs) - 1) > 1e-3 or min(probs) < 0:
                raise DataError(f"{where}: probs must be a distribution over >= 2 options (sum {sum(probs):.4f})")
            for k in ("pred", "answer"):
                if not isinstance(r[k], int) or isinstance(r[k], bool) or not 0 <= r[k] < len(probs):
                    raise DataError(f"{where}: {k} {r[k]!r} is not an option index below {len(probs)}")
            if probs[r["pred"]] < max(probs):
                raise DataError(f"{where}: pred {r['pred']} is not an argmax of probs")
            ident = (r["task"], r["source"], r["answer"], len(probs), r.get("question_id"))
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
    """CircularEval: a question is right only if every pass of it (rows sharing a question_id) is right."""
    right = {}
    for r in cell.values():
        q = r.get("question_id", r["id"])
        right[q] = right.get(q, True) and r["pred"] == r["answer"]
    return float(np.mean(list(right.values())))


def summarize(rows, n_boot=1000, seed=0):
    """{source: {intervention: {n, acc, delta_cp, ci, tv[, circular_acc]}}} in intervention order."""
    by = {}
    for r in rows:
        by.setdefault(r["source"], {}).setdefault(r["intervention"], {})[r["id"]] = r
    out = {}
    for source in sorted(by):
        orig = by[source].get("orig", {})
        out[source] = {}
        for name in [n for n in perturb.APPLIES if n in by[source]]:
            cell = by[source][name]
            acc = float(np.mean([r["pred"] == r["answer"] for r in cell.values()]))
            pairs = [(orig[i], r) for i, r in cell.items()]
            flips = [a["pred"] != b["pred"] for a, b in pairs]
            tv = [0.5 * float(np.abs(np.subtract(a["probs"], b["probs"])).sum()) for a, b in pairs]
            out[source][name] = {"n": len(cell), "acc": acc, "delta_cp": float(np.mean(flips)),
                                 "ci": [0.0, 0.0] if name == "orig" else bootstrap_ci(flips, n_boot, seed),
                                 "tv": float(np.mean(tv))}
            if any("question_id" in r for r in cell.values()):
                out[source][name]["circular_acc"] = circular_acc(cell)
    return out


def worst(cells):
    """The lowest accuracy under any intervention but orig (the paper's "Perturbed" column), and which."""
    perturbed = {n: c["acc"] for n, c in cells.items() if n != "orig"}
    return min(perturbed.items(), key=lambda kv: kv[1]) if perturbed else (None, None)


def table(summary):
    circ = any("circular_acc" in c for cells in summary.values() for c in cells.values())
    lines = ["| source | intervention | n | acc | delta_cp | 95% CI | TV |" + (" circular acc |" if circ else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if circ else "")]
    for source, cells in summary.items():
        for name, c in cells.items():
            lines.append(f"| {source} | {name} | {c['n']} | {100 * c['acc']:.1f} | {c['delta_cp']:.3f} | "
                         f"[{c['ci'][0]:.3f}, {c['ci'][1]:.3f}] | {c['tv']:.3f} |"
                         + ((f" {100 * c['circular_acc']:.1f} |" if "circular_acc" in c else " |") if circ else ""))
        name, acc = worst(cells)
        if name:
            lines.append(f"| {source} | worst ({name}) | | {100 * acc:.1f} | | | |" + (" |" if circ else ""))
    return "\n".join(lines)


def compare(a, b, names=("A", "B")):
    """Two runs side by side: accuracy, delta_cp and n per source x intervention (like Table 5's rows)."""
    head = [f"{k} {n}" for k in ("acc", "delta_cp", "n") for n in names]
    lines = ["| source | intervention | " + " | ".join(head) + " |", "|---" * (len(head) + 2) + "|"]
    for source in sorted(set(a) | set(b)):
        for name in perturb.APPLIES:
            ca, cb = a.get(source, {}).get(name), b.get(source, {}).get(name)
            if ca or cb:
                cols = [f"{100 * c['acc']:.1f}" if c else "-" for c in (ca, cb)]
                cols += [f"{c['delta_cp']:.3f}" if c else "-" for c in (ca, cb)]
                cols += [str(c["n"]) if c else "0" for c in (ca, cb)]
                lines.append(f"| {source} | {name} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def labels(paths):
    """The shortest path parts telling the files apart: .../vanilla/eval/predictions.jsonl and
    .../ours/eval/predictions.jsonl are "vanilla" and "ours"."""
    parts = [os.path.abspath(q).split(os.sep) for q in paths]
    while len(parts[0]) > 1 and len(parts[1]) > 1 and parts[0][0] == parts[1][0]:
        parts = [q[1:] for q in parts]
    while len(parts[0]) > 1 and len(parts[1]) > 1 and parts[0][-1] == parts[1][-1]:
        parts = [q[:-1] for q in parts]
    names = ["/".join(q) for q in parts]
    return names if names[0] != names[1] else ["A", "B"]


def sample_differences(a, b, names):
    """Per source, the sample ids only one run has: their numbers are not over the same questions."""
    ids = [{}, {}]
    for side, rows in zip(ids, (a, b)):
        for r in rows:
            side.setdefault(r["source"], set()).add(r["id"])
    out = []
    for source in sorted(set(ids[0]) | set(ids[1])):
        for i in (0, 1):
            only = sorted(ids[i].get(source, set()) - ids[1 - i].get(source, set()))
            if only:
                out.append(f"{source}: {len(only)} samples only in {names[i]} ({', '.join(only[:5])}"
                           + (", ..." if len(only) > 5 else "") + ")")
    return out


def output_path(path):
    """diagnosis.json beside predictions.jsonl (SPEC section 5); NAME.diagnosis.json beside any other NAME.jsonl."""
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
    p.add_argument("predictions", nargs="*", help="one predictions.jsonl, or two to compare")
    p.add_argument("--model", help="evaluate this model first (with --data and --out)")
    p.add_argument("--data", nargs="+")
    p.add_argument("--out")
    p.add_argument("--overwrite", action="store_true", help="with --model: replace predictions of other settings")
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="of the bootstrap and of the interventions")
    args = p.parse_args(argv)
    paths = args.predictions
    if args.model:
        import evaluate
        if not (args.data and args.out) or paths:
            p.error("--model needs --data and --out, and no predictions file")
        rank, device, dtype = evaluate.setup()
        try:
            evaluate.run(args.model, args.data, args.out, seed=args.seed, device=device, dtype=dtype,
                         overwrite=args.overwrite)
        except (evaluate.RunError, DataError) as e:
            sys.exit(f"error: {e}")
        if rank != 0:  # under torchrun, rank 0 alone diagnoses what all ranks scored
            return
        paths = [os.path.join(args.out, "predictions.jsonl")]
    if len(paths) not in (1, 2):
        p.error("give one predictions file, two to compare, or --model with --data and --out")
    try:
        rows = [read(path) for path in paths]
    except DataError as e:
        sys.exit(f"error: {e}")
    summaries = [diagnose(path, args.n_boot, args.seed, r) for path, r in zip(paths, rows)]
    for path, summary in zip(paths, summaries):
        print(f"{path} -> {output_path(path)}\n{table(summary)}\n")
    if len(paths) == 2:
        names = labels(paths)
        print(compare(*summaries, names=names))
        differ = sample_differences(*rows, names)
        if differ:
            print("warning: the runs cover different samples, so their numbers differ by that too:\n  "
                  + "\n  ".join(differ), file=sys.stderr)


if __name__ == "__main__":
    main()
