"""The toy world end to end, the built-in default: make the data, train a small LLaVA from scratch the
vanilla way, diagnose it, fine-tune it with the paper's method (preset ours), diagnose it again and
print the before/after table. No download; a few minutes on 2 CPU cores.
  python toy.py                 # out/toy/{base,vanilla,ours}, each with eval/predictions.jsonl
  python toy.py --ablation      # every preset x 3 seeds, heuristic and worst-case columns -> out/toy/ablation.md, .png
  python toy.py --smoke         # tiny data and model, 5 steps of ours, evaluated: the check to run after a change
"""
import argparse
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import time

import attack
import charts
import diagnose
import evaluate
import perturb
from model import make_tiny

HERE = os.path.dirname(os.path.abspath(__file__))
# A model of ~1 M parameters: CLIP on 32 px images in 8 px patches (16 image tokens), Llama of 3 layers.
MODEL = dict(hidden=128, layers=3, heads=4, vision_hidden=64, vision_layers=2)
# The vanilla model learns from scratch, vision tower included (nothing was pretrained); captions of
# image questions are always true in its data, so it learns to trust them (data/toy/prepare.py). Its mix
# leans to images, as instruction data does: 40% image-heavy, 20% text-heavy, 40% VQA per batch.
VANILLA = ["--preset", "fft-aug", "--no-aug", "--no-freeze-vision", "--lr", "1e-3", "--batch-size", "32",
           "--weight-decay", "0", "--ratio-image", "0.4", "--ratio-text", "0.2"]
# Fine-tuning keeps the vision tower frozen, as the paper does, with a toy-sized learning rate.
FINETUNE = ["--lr", "5e-4", "--batch-size", "32"]
# Toy questions are ~10 words: 3 unrelated facts (not the paper's 10) keep UF's share of the text
# close to the paper's and the sequences short.
K_FACTS = "3"
# --ablation's worst-case columns: evaluate.py --attack-eps at these radii, each a share of the attacked row's own
# embedding std (--attack-scale std: text and image tokens differ ~10x in scale), on the first ATTACK_N image- and
# text-heavy test samples. The paper's heuristics alone cannot rank the presets after fft-aug (docs/toy.md).
ATTACK_EPS, ATTACK_N = [0.5, 1.0], 100
# Beyond the paper's presets: its PGD with steps that move delta (sign) in a ball of half each row's embedding std.
# Eq. 7's raw step at the paper's radius hardly leaves its random start (docs/training.md, 'Does PGD attack?').
SIGN = ["--pgd-step", "sign", "--eps-scale", "std", "--eps", "0.5"]
PRESETS = {name: ["--preset", name] for name in ("fft-vqa", "fft-aug", "kl", "js", "rg", "pgd", "ours")}
PRESETS.update({"pgd-sign": ["--preset", "pgd", *SIGN], "ours-sign": ["--preset", "ours", *SIGN]})


def phase(text, t0, done, total):
    left = (time.time() - t0) / done * (total - done) if done else 0
    print(f"[{time.time() - t0:5.0f}s] {text}" + (f"  (about {left / 60:.1f} min left)" if done else ""), flush=True)


def run(*cmd):
    """A step as its own process (train.py is a script, and each run gets a fresh process group)."""
    subprocess.run([sys.executable, *cmd], check=True, cwd=HERE)


# A stage's folder counts only once the step that writes it has succeeded: the marker is written last.
# train.py moves its export into --out file by file and keeps its checkpoints there, so a run killed midway
# leaves model.safetensors without config.json; redoing a stage without the marker resumes from those.
DONE = ".toy-done"


def done(folder, extra=None):
    """Whether a stage's output is complete (else the stage runs again; train.py resumes where it stopped). A model
    trained with other train.py flags than `extra` (the marker records them; an edited PRESETS row) stops the run:
    its numbers would stand under this preset's name."""
    path = os.path.join(folder, DONE)
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        saved = f.read()
    if extra is not None and saved and json.loads(saved) != extra:
        sys.exit(f"{folder} was trained with {json.loads(saved)}, not {extra}: delete it or pass another --out")
    return True


def finish(folder, extra=None):
    with open(os.path.join(folder, DONE), "w") as f:
        f.write(json.dumps(extra) if extra is not None else "")
    return folder


def train(model, out, extra, seed, steps):
    if not done(out, extra):
        # an unfinished stage continues from its checkpoint, or else starts over on its own leftovers
        again = "--resume" if os.path.isdir(out) and any(re.fullmatch(r"ckpt-\d{8}", d) for d in os.listdir(out)) \
            else "--overwrite"
        run("train.py", "--model", model, "--data", os.path.join(args.data, "train.jsonl"), "--out", out,
            "--seed", str(seed), "--k-facts", K_FACTS, "--save-every", "100000", "--max-steps", str(steps), again,
            *extra)
        finish(out, extra)
    return out


def diagnosis(model, seed, worst=None):
    """Evaluate on the test split (held-out UF/MD wordings) and return diagnose's summary; worst: the path of
    attacked_samples(), whose attack rows of ATTACK_EPS join it (eval-attack/). Always afresh
    (overwrite): a redone stage re-exports its model, which evaluate rightly takes for other weights."""
    out = os.path.join(model, "eval")
    evaluate.run(model, [os.path.join(args.data, "test.jsonl")], out, k_facts=int(K_FACTS), seed=seed,
                 batch_size=64, overwrite=True)
    summary = diagnose.diagnose(os.path.join(out, "predictions.jsonl"))
    if worst:
        out = os.path.join(model, "eval-attack")
        evaluate.run(model, [worst], out, ["orig"], seed=seed, batch_size=64, overwrite=True,
                     attack=attack.settings(ATTACK_EPS, scale="std"))
        for source, cells in diagnose.diagnose(os.path.join(out, "predictions.jsonl")).items():
            summary[source].update((n, c) for n, c in cells.items() if n != "orig")
    return summary


def attacked_samples():
    """The first ATTACK_N image- and ATTACK_N text-heavy samples of the test split, in a file beside it."""
    path, taken = os.path.join(args.data, "test-attack.jsonl"), {}
    with open(os.path.join(args.data, "test.jsonl"), encoding="utf-8") as f, open(path + ".tmp", "w") as out:
        for line in f:
            task = json.loads(line)["task"]
            if task in perturb.ATTACKED and taken.get(task, 0) < ATTACK_N:
                taken[task] = taken.get(task, 0) + 1
                out.write(line)
    os.replace(path + ".tmp", path)
    return path


def moved(model):
    """What PGD did during a run, from its metrics.jsonl: mean pgd_move and adv_over_clean over the steps (None
    where the preset has no PGD)."""
    with open(os.path.join(model, "metrics.jsonl")) as f:
        steps = [json.loads(line) for line in f]
    return {k: statistics.mean(s[k] for s in steps) if all(k in s for s in steps) else None
            for k in ("pgd_move", "adv_over_clean")}


SOURCES = {"image_heavy": ["toy-shapes"], "text_heavy": ["toy-stated", "toy-known"], "vqa": ["toy-colors"]}


def row(summary):
    """The numbers of a Table-5 row: clean and worst-perturbation accuracy per task (over its sources,
    weighted by their sizes), VQA accuracy; then the accuracy under each attack radius (the worst case)."""
    out, worst = {}, {}
    for task, sources in SOURCES.items():
        acc = {}
        for name in summary[sources[0]]:
            cells = [summary[s][name] for s in sources]
            acc[name] = 100 * sum(c["n"] * c["acc"] for c in cells) / sum(c["n"] for c in cells)
        out[f"{task} clean"] = acc.pop("orig")
        heuristic = [a for name, a in acc.items() if name in perturb.APPLIES]
        if heuristic:
            out[f"{task} perturbed"] = min(heuristic)
        worst.update((f"{task} {name}", a) for name, a in acc.items() if perturb.attack_radius(name))
    return {**out, **worst}


def before_after(a, b):
    lines = ["| source | intervention | acc vanilla | acc ours | delta_cp vanilla | delta_cp ours |",
             "|---|---|---|---|---|---|"]
    for source in sorted(a):
        for name, ca in a[source].items():
            cb = b[source][name]
            ci = [f"{c['delta_cp']:.3f} [{c['ci'][0]:.2f}, {c['ci'][1]:.2f}]" for c in (ca, cb)]
            lines.append(f"| {source} | {name} | {100 * ca['acc']:.1f} | {100 * cb['acc']:.1f} | {ci[0]} | {ci[1]} |")
        worst = [diagnose.worst(s[source]) for s in (a, b)]
        if worst[0][0]:
            lines.append(f"| {source} | worst | " + " | ".join(f"{100 * acc:.1f} ({name})" for name, acc in worst)
                         + " | | |")
    return "\n".join(lines)


def base_and_vanilla(root, seed, t0, step, total):
    base = os.path.join(root, "base")
    if not done(base):
        words = open(os.path.join(args.data, "vocab.txt"), encoding="utf-8").read().split()
        finish(make_tiny("llava", base, words, seed=seed, **MODEL))
    phase(f"training the vanilla model from scratch (seed {seed})", t0, step, total)
    return train(base, os.path.join(root, "vanilla"), VANILLA, seed, args.vanilla_steps)


p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--out", default=os.path.join(HERE, "out", "toy"))
p.add_argument("--data", default=os.path.join(HERE, "data", "toy"))
p.add_argument("--seed", type=int, default=0)
p.add_argument("--n-train", type=int, default=2000, help="toy samples per task for training")
p.add_argument("--n-test", type=int, default=300, help="toy samples per task for evaluation")
p.add_argument("--vanilla-steps", type=int, default=800)
p.add_argument("--finetune-steps", type=int, default=300)
p.add_argument("--caption-rate", type=float, default=0.8, help="data/toy/prepare.py's share of captioned "
               "image questions in training")
p.add_argument("--ablation", action="store_true", help="every preset x 3 seeds (about 70 min on 2 cores; "
               "--presets fft-aug ours ours-sign, the ones that rank them, 30 min)")
p.add_argument("--presets", nargs="+", choices=list(PRESETS), help="--ablation: these "
               "presets beside vanilla (default all: Table 5's and the sign-step variants pgd-sign, ours-sign)")
p.add_argument("--smoke", action="store_true", help="tiny data and model, 5 steps of ours, evaluated and diagnosed "
               "(under 90 s on 2 cores): the check to run after changing the code")


def same_world(out):
    """Models under --out are reused (an interrupted run goes on; --ablation reuses the quick start's
    seed 0), so they must come from the same world, model and steps: record them, and stop on a mismatch."""
    world = {k: getattr(args, k) for k in ("n_train", "n_test", "vanilla_steps", "finetune_steps", "caption_rate")}
    with open(os.path.join(HERE, "data", "toy", "prepare.py"), "rb") as f:  # an edited world is another world
        world.update(prepare=hashlib.sha256(f.read()).hexdigest()[:12], model=MODEL, vanilla=VANILLA, finetune=FINETUNE)
    path = os.path.join(out, "world.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved != world:
            sys.exit(f"{out} holds models of another toy world {saved}, not {world}: pass another --out or delete it")
    os.makedirs(out, exist_ok=True)
    with open(path + ".tmp", "w") as f:  # renamed when complete: a cut world.json would stop every later run
        json.dump(world, f)
    os.replace(path + ".tmp", path)


def smoke(out, t0):
    """Every stage once, as small as it goes: data, a model, `ours`, evaluate, diagnose. It says that a change
    runs end to end, not how well the method works (5 steps of an untrained model learn nothing)."""
    data, base, ours = (os.path.join(out, name) for name in ("data", "base", "ours"))
    phase("making a tiny toy world and model", t0, 0, 3)
    run(os.path.join("data", "toy", "prepare.py"), "--out", data, "--n-train", "8", "--n-test", "4")
    words = open(os.path.join(data, "vocab.txt"), encoding="utf-8").read().split()
    make_tiny("llava", base, words, seed=args.seed, **MODEL)
    phase("5 steps of preset ours", t0, 1, 3)
    run("train.py", "--model", base, "--data", os.path.join(data, "train.jsonl"), "--out", ours, "--overwrite",
        "--seed", str(args.seed), "--k-facts", K_FACTS, "--max-steps", "5", "--save-every", "5", "--preset", "ours",
        *FINETUNE)
    phase("evaluating and diagnosing it", t0, 2, 3)
    evaluate.run(ours, [os.path.join(data, "test.jsonl")], os.path.join(ours, "eval"), k_facts=int(K_FACTS),
                 seed=args.seed, batch_size=64, overwrite=True)
    summary = diagnose.diagnose(os.path.join(ours, "eval", "predictions.jsonl"))
    print(f"\nsmoke run done in {time.time() - t0:.0f} s: every stage ran ({ours}, its eval/ and metrics.jsonl)\n")
    print("| source | intervention | n | acc | delta_cp |\n|---|---|---|---|---|")
    for source, cells in sorted(summary.items()):
        for name, c in cells.items():
            print(f"| {source} | {name} | {c['n']} | {100 * c['acc']:.1f} | {c['delta_cp']:.3f} |")
    return summary


def main():
    t0 = time.time()
    if args.smoke:
        return smoke(os.path.join(args.out, "smoke"), t0)
    same_world(args.out)
    phase(f"making the toy world ({args.data})", t0, 0, 1)
    run(os.path.join("data", "toy", "prepare.py"), "--out", args.data, "--n-train", str(args.n_train),
        "--n-test", str(args.n_test), "--caption-rate", str(args.caption_rate))
    if args.ablation:
        return ablation(args.out, t0)
    root = os.path.join(args.out, f"seed{args.seed}")
    vanilla = base_and_vanilla(root, args.seed, t0, 0, 5)
    phase("diagnosing the vanilla model", t0, 2, 5)
    before = diagnosis(vanilla, args.seed)
    phase("fine-tuning with preset ours (twins + PGD + JS)", t0, 2.2, 5)
    ours = train(vanilla, os.path.join(root, "ours"), ["--preset", "ours", *FINETUNE], args.seed, args.finetune_steps)
    phase("diagnosing the fine-tuned model", t0, 4.8, 5)
    after = diagnosis(ours, args.seed)
    radar = os.path.join(root, "radar.png")
    charts.radar(radar, [before, after], ["vanilla", "ours"], SOURCES["image_heavy"] + SOURCES["text_heavy"])
    print(f"\ndone in {(time.time() - t0) / 60:.1f} min; predictions and diagnosis.json under {root}, "
          f"the radar chart in {radar}\n")
    print(before_after(before, after))


def ablation(out, t0):
    presets, seeds, results, pgd = ["vanilla", *args.presets], [0, 1, 2], {}, {}
    worst = attacked_samples()  # once: the same questions for every model
    total = len(seeds) * len(presets)
    for i, seed in enumerate(seeds):
        root = os.path.join(out, f"seed{seed}")
        vanilla = base_and_vanilla(root, seed, t0, i * len(presets), total)
        for j, preset in enumerate(presets):
            phase(f"seed {seed}: {preset}", t0, i * len(presets) + j, total)
            model = vanilla if preset == "vanilla" else train(vanilla, os.path.join(root, preset),
                                                              [*PRESETS[preset], *FINETUNE], seed, args.finetune_steps)
            results.setdefault(preset, []).append(row(diagnosis(model, seed, worst)))
            pgd.setdefault(preset, []).append(moved(model) if preset != "vanilla" else {})
    columns = list(results["vanilla"][0])
    header = ["preset", *columns, "pgd_move", "adv_over_clean"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for preset, rows in results.items():
        cells = [f"{statistics.mean(r[c] for r in rows):.1f} ± {statistics.pstdev(r[c] for r in rows):.1f}"
                 for c in columns]
        cells += [f"{statistics.mean(m[k] for m in pgd[preset]):.3g}"
                  if all(m.get(k) is not None for m in pgd[preset]) else "-" for k in ("pgd_move", "adv_over_clean")]
        lines.append(f"| {preset} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    with open(os.path.join(out, "ablation.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out, "ablation.json"), "w") as f:
        json.dump(dict(results=results, pgd=pgd), f, indent=1)
    chart(results, columns, os.path.join(out, "ablation.png"))
    print(f"\ndone in {(time.time() - t0) / 60:.1f} min; {out}/ablation.md and ablation.png\n\n{table}")


# One colour per preset, in the order of the ablation: grey the baseline, blues the plain fine-tuning,
# oranges the consistency terms, greens the noise, red the method
PALETTE = ["#787878", "#aac8e6", "#5a96d2", "#fabe6e", "#f08c3c", "#b4dca0", "#64b464", "#c83232", "#9b7ac8",
           "#5a2d91"]  # and purples the sign-step variants
COLOURS = dict(zip(["vanilla", *PRESETS], PALETTE))  # a preset keeps its colour in a run of some presets


def chart(results, columns, path):
    """Grouped bars: one group per column, one bar per preset at its mean over seeds, with the spread over
    seeds (population standard deviation, as in ablation.md) as an error bar."""
    from matplotlib.figure import Figure  # only the chart needs matplotlib
    fig = Figure(figsize=(max(9, 1.3 * len(columns)), 4.5), dpi=100)
    ax = fig.add_subplot()
    width = 0.8 / len(results)
    for i, (preset, rows) in enumerate(results.items()):
        x = [c + (i - (len(results) - 1) / 2) * width for c in range(len(columns))]
        mean = [statistics.mean(r[c] for r in rows) for c in columns]
        spread = [statistics.pstdev(r[c] for r in rows) for c in columns]
        ax.bar(x, mean, width, yerr=spread, capsize=2, color=COLOURS.get(preset, "black"), label=preset,
               error_kw=dict(lw=0.8))
    labels = [c.replace("_heavy", "").replace(" ", "\n").replace("@", "\n").replace("std", " std") for c in columns]
    ax.set_xticks(range(len(columns)), labels)
    ax.set_xlabel("task: clean accuracy, under its worst intervention (perturbed), under the attack (radius x std)")
    ax.set_ylabel(f"accuracy (%), mean ± spread over {len(next(iter(results.values())))} seeds")
    ax.set_ylim(0, 105)
    ax.grid(axis="y", color="#e1e1e1")
    ax.set_axisbelow(True)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    fig.subplots_adjust(left=0.08, right=0.86, bottom=0.2, top=0.96)
    fig.savefig(path)


def parse(argv):
    """The flags, refusing those that would be ignored: the quick start and --smoke train `ours` alone."""
    a = p.parse_args(argv)
    if a.presets and not a.ablation:
        p.error("--presets chooses the presets of --ablation; the quick start trains `ours` (add --ablation)")
    if a.smoke and a.ablation:
        p.error("--smoke and --ablation are two runs: pick one")
    if not 0 <= a.caption_rate <= 1 or min(a.n_train, a.n_test, a.vanilla_steps, a.finetune_steps) < 1:
        p.error("--caption-rate is a share (0 to 1); --n-train, --n-test and the step counts are at least 1")
    a.presets = list(dict.fromkeys(a.presets or PRESETS))  # a preset named twice runs once
    return a


if __name__ == "__main__":
    args = parse(sys.argv[1:])
    main()
