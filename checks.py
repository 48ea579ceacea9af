"""Preflight checks of train.py and evaluate.py: a flag, an --out or a sample that would waste the run or the user's
files is refused before the model loads, in one line. Each check returns that line (or None), and the script prints it.
"""
import os
import re

from PIL import Image

import checkpoint
import dataloader
import model as M
import paper
import perturb
import prompts as P


def flags(args):
    """The line refusing a flag that would train nothing or cannot work, or None."""
    if args.batch_size < 1 or args.grad_accum < 1:  # every rank's every micro-step needs a row to collate
        return "error: --batch-size and --grad-accum must be at least 1 (1 works: tasks take turns over steps)"
    if args.workers is not None and args.workers < 0:
        return f"error: --workers {args.workers}: pass 0 (batches made between steps) or more"
    if args.keep_checkpoints < 1 or args.save_every < 0:
        return "error: --keep-checkpoints must be at least 1 and --save-every at least 0 (0: no checkpoints)"
    # zero steps would export the untrained model as if it were trained; only the vanilla preset means that
    if args.max_steps is not None and args.max_steps <= 0 and not (args.max_steps == 0 and args.preset == "vanilla"):
        return (f"error: --max-steps {args.max_steps} trains nothing: pass a positive number "
                f"(--preset vanilla exports the base model on purpose)")
    if args.lora < 0 or (args.merge and not args.lora) or (args.lora and not args.freeze_vision):
        return (f"error: --lora {args.lora}{' --merge' * args.merge}"
                f"{' --no-freeze-vision' * (not args.freeze_vision)}: --lora takes a rank (0: off), --merge needs "
                f"one, and the vision encoder trains only without --lora")
    if args.lora and (args.lora_alpha <= 0 or not 0 <= args.lora_dropout < 1):
        return (f"error: --lora-alpha {args.lora_alpha:g} --lora-dropout {args.lora_dropout:g}: alpha scales the "
                f"adapters (at 0 or below they do nothing or the opposite), and dropout is a probability below 1")
    if args.max_steps is None and args.epochs <= 0:
        return f"error: --epochs {args.epochs:g} trains nothing: pass a positive number (or --max-steps)"
    return method(args) or optimisation(args)


def optimisation(args):
    """The line refusing a data mix or an optimiser setting outside its range (a negative --grad-clip flips every
    gradient: torch's clip_grad_norm_ scales by it), or None."""
    r, t = args.ratio_image, args.ratio_text
    shares = dataloader.ratios(args) if 0 <= r <= 1 and 0 <= t <= 1 else None  # the schedule's exact fractions
    if shares is None or shares["image_heavy"] + shares["text_heavy"] > 1:
        return (f"error: --ratio-image {r:g} --ratio-text {t:g}: shares of a step's originals, each 0 to 1 and "
                f"together at most 1 (VQA takes the rest)")
    inf = float("inf")
    rules = {"--lr": 0 < args.lr < inf, "--min-lr": 0 <= args.min_lr <= args.lr, "--warmup": 0 <= args.warmup <= 1,
             "--grad-clip": args.grad_clip > 0, "--weight-decay": 0 <= args.weight_decay < inf,
             "--adam-eps": 0 < args.adam_eps < inf}
    bad = [f"{flag} {getattr(args, flag[2:].replace('-', '_')):g}" for flag, ok in rules.items() if not ok]
    if bad:
        return (f"error: {' '.join(bad)}: lr above 0, min-lr 0 to lr, warmup a share 0 to 1, grad-clip above 0 "
                f"(inf: no clipping), weight decay 0 or more, adam-eps above 0")
    return None


def method(args):
    """The line refusing a size of the objective that would train something else than asked (a negative eps or alpha
    descends, a negative lambda pushes the answers apart, tau 0 divides by 0), or a PGD flag the preset never uses."""
    sizes = dict(eps=args.eps, alpha=args.alpha, sigma=args.sigma, lambda_cons=args.lambda_cons, tau=args.tau,
                 pgd_steps=args.pgd_steps)
    bad = [f"--{k.replace('_', '-')} {v:g}" for k, v in sizes.items()
           if not 0 <= v < float("inf") or (k == "tau" and v == 0)]
    if bad:
        return f"error: {' '.join(bad)}: the objective's sizes must be finite and at least 0, tau above 0"
    if args.adv != "pgd" and (args.pgd_step != "raw" or args.eps_scale != "none"):
        return (f"error: --pgd-step {args.pgd_step} --eps-scale {args.eps_scale} shape PGD, and --adv {args.adv} "
                f"(--preset {args.preset}) runs none: drop them, or pick a preset with PGD (pgd, ours)")
    return None


MAX_CANVAS = 4096  # pixels a side: past every model's input size (a canvas is resized to it), 48 MiB an image


def uf_facts(facts_file, k, replace, canvas_size, pool):
    """(UF's facts: the user's file whole, or the built-in pool; the message refusing them, k or the canvas size,
    or None). train.py and evaluate.py ask the same."""
    try:
        facts = perturb.read_facts(facts_file) if facts_file else perturb.unrelated_facts(pool)
    except perturb.DataError as e:
        return None, f"--facts-file {e}"
    if k < 1 or (k > len(facts) and not replace):
        where = facts_file or f"the {pool} pool of {perturb.FACTS_FILE}"
        return facts, f"--k-facts {k}: UF prepends 1 to {len(facts)} facts ({where}; more with --facts-replacement)"
    if canvas_size is not None and not 1 <= canvas_size <= MAX_CANVAS:
        return facts, (f"--canvas-size {canvas_size}: canvases and random pixels take 1 to {MAX_CANVAS} pixels a side "
                       f"(models resize them to their input, 224 to 448 px)")
    return facts, None


def facts(args):
    """train.py's uf_facts: the train pool, and the line to print."""
    facts, problem = uf_facts(args.facts_file, args.k_facts, args.facts_replacement, args.canvas_size, "train")
    return facts, problem and f"error: {problem}"


def texts(jobs, facts, k, pool, replace):
    """The message naming the first sample UF or MD cannot be applied to (too few facts that name none of its options;
    every wrong option's text would name the answer), or None: found before the model loads, not mid-run."""
    for s, name in jobs:
        if name in ("uf", "md"):
            try:
                perturb.longest(s, name, facts, k, pool, replace)
            except ValueError as e:
                return str(e)
    return None


def evaluation(batch_size, workers, style, scoring, max_new_tokens, repetition_penalty, resume, overwrite):
    """The message refusing evaluate.py's flags, or None."""
    if batch_size < 1:
        return f"--batch-size {batch_size}: must be at least 1"
    if workers is not None and workers < 0:
        return f"--workers {workers}: pass 0 (batches made in this process) or more"
    if style not in P.STYLES or scoring not in ("logits", "generate"):
        return f"--prompt {style} --score {scoring}: pick a prompt of {' '.join(P.STYLES)} and logits or generate"
    if scoring == "generate" and (max_new_tokens < 1 or repetition_penalty <= 0):
        return (f"--max-new-tokens {max_new_tokens}, --repetition-penalty {repetition_penalty}: the first must "
                "be at least 1, the second above 0 (1.0 is no penalty)")
    if resume and overwrite:
        return "--resume continues the predictions in --out and --overwrite replaces them: pass one"
    return None


def out_folder(args):
    """The line refusing an --out that cannot be written, that holds an earlier run this one would mix with,
    or that --resume finds no checkpoint in (a mistyped --out would otherwise start from scratch), or None."""
    parent = os.path.abspath(args.out)
    while not os.path.exists(parent):  # the folder that --out will be made in
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"error: --out {args.out}: {parent} is a file, not a folder: choose another --out"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"error: --out {args.out}: {parent} is not writable: choose another --out"
    earlier = checkpoint.checkpoints(args.out) + checkpoint.exported(args.out)
    if earlier and not args.resume and not args.overwrite:
        return (f"error: {args.out} holds an earlier run ({', '.join(earlier[-2:])}): pass --resume to continue it, "
                f"--overwrite to replace it, or choose another --out")
    if args.resume and not checkpoint.checkpoints(args.out):
        return f"error: --resume: {args.out} holds no checkpoint (ckpt-NNNNNNNN): check --out, or drop --resume"
    return None


def model_name(args):
    """A mistyped local path, a model type in no row of model.FAMILIES, or --lora-targets it lacks, fail now, not
    after the data."""
    try:
        family = M.checkpoint_family(M.where(args.model))
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        return f"error: --model {e}"
    if args.paper_defaults and paper.FAMILY[args.paper_defaults] != family:  # another model of its family: a note
        return (f"error: --paper-defaults {args.paper_defaults} are the authors' settings for that model, and --model "
                f"{args.model} is a {family} model: pick the defaults of a {family} model, if the table has one, or "
                f"drop the flag")
    return lora_targets(args, family) if args.lora else None


def lora_targets(args, family):
    """The line refusing --lora-targets of which one matches no module of the model's language model (its
    architecture on the meta device, no weights read), or None: a typo would train adapters on the others alone."""
    names = [n for n, _ in M.architecture(M.where(args.model), M.FAMILIES[family]["cls"]).named_modules()]
    unmatched = [t for t in args.lora_targets if not any(re.fullmatch(M.lora_pattern([t]), n) for n in names)]
    if not unmatched:
        return None
    found = sorted({n.rsplit(".", 1)[-1] for n in names if re.fullmatch(r"(model\.)?language_model\..*_proj", n)})
    return (f"error: --lora-targets: {' '.join(unmatched)} names no module of {args.model}'s language model "
            f"(its projections: {' '.join(found)})")


# ---- lengths: every row training can make must fit --max-length ------------------------------------------
# collate refuses a longer row (truncating would cut the answer), which mid-run would waste the hours before
# it; here each original is measured at the longest row it can become, from text and image headers only.
def longest_rows(args, processor, size, pools, facts, ri_images, twins, file_of):
    """(originals, [(tokens, variant, image size)] of each original's longest row): itself and, with --aug, the
    longest twin of each kind (perturb.longest), whichever --twins draws: UF with the k longest facts (in tokens)
    that name none of its options (with --facts-replacement the longest k times), an upper bound of what UF draws,
    and a draw it can make, so refusing it is right; MD with the longest text _md can choose (by characters); RI
    with the RI image of most image tokens. FB/FW are at `size`, as the random pixels of the original are. A sample
    no twin can be made of raises ValueError (naming it), as in training."""
    dynamic, headers = M.FAMILIES[processor.family]["dynamic"], {}

    def wh(image):  # the PIL size of what a row carries; LLaVA's and InstructBLIP's image tokens ignore it
        if image is None or not dynamic:
            return (size, size)
        if image not in headers:
            with Image.open(image) as im:
                headers[image] = im.size
            try:  # Qwen2-VL refuses an aspect ratio over 200
                P.n_image_tokens(processor, im.size)
            except ValueError as e:
                raise ValueError(f"{image}: {e} (crop or pad the image)") from e
        return headers[image]

    n_facts = map(len, processor.tokenizer(facts, add_special_tokens=False)["input_ids"])
    by_length = [f for _, f in sorted(zip(n_facts, facts), key=lambda nf: -nf[0])]

    # a text-heavy original and its twins share their text: the one with the image of most tokens is the longest
    text_heavy = ("orig", (size, size))
    if args.aug and ri_images and dynamic:
        ri = max(ri_images, key=lambda path: P.n_image_tokens(processor, wh(path)))
        if P.n_image_tokens(processor, wh(ri)) > P.n_image_tokens(processor, (size, size)):
            text_heavy = ("ri", wh(ri))
    originals = [s for pool in pools.values() for s in pool]
    best = [(0, "", None)] * len(originals)
    for a in range(0, len(originals), 2048):  # in chunks: 600k rows of token ids at once would fill the memory
        rows = []  # (original's index, variant, sample, image size)
        for i, s in enumerate(originals[a:a + 2048], a):
            if s["task"] == "text_heavy":
                rows.append((i, text_heavy[0], s, text_heavy[1]))
                continue
            rows.append((i, "orig", s, wh(s["image"])))
            if args.aug and s["task"] == "image_heavy":
                try:
                    rows += [(i, name, perturb.longest(s, name, by_length, args.k_facts,
                                                       replace=args.facts_replacement), wh(s["image"]))
                             for name in twins["image_heavy"]]
                except ValueError as e:  # perturb's own, naming the sample
                    raise ValueError(f"{file_of[id(s)]}: {e}") from e
        n_rows = P.lengths(processor, [r[2] for r in rows], [r[3] for r in rows], style=args.prompt)
        for (i, variant, _, wh_), n in zip(rows, n_rows):
            best[i] = max(best[i], (n, variant, wh_), key=lambda b: b[0])
    return originals, best


def lengths(args, pools, facts, ri_images, twins, file_of):
    """The line refusing the run, naming the first few samples with a row past --max-length, or None."""
    processor = M.load_processor(args.model)
    try:
        originals, best = longest_rows(args, processor, args.canvas_size or P.image_size(processor), pools, facts,
                                       ri_images, twins, file_of)
    except ValueError as e:  # a sample UF or MD cannot take, or an image the processor cannot
        return f"error: {e}"
    over = sorted([(n, variant, wh, s) for s, (n, variant, wh) in zip(originals, best) if n > args.max_length],
                  key=lambda o: -o[0])
    if not over:
        return None
    named = "; ".join(f"sample {s['id']!r} of {file_of[id(s)]}{'' if v == 'orig' else f', as its {v} twin'}: "
                      f"{n} tokens with its answer, {round(100 * P.n_image_tokens(processor, wh) / n)}% of them "
                      f"image tokens" for n, v, wh, s in over[:3])
    todo = ["raise --max-length", "shorten these samples"] + ["lower --k-facts"] * any(o[1] == "uf" for o in over[:3]) \
        + ["resize their images"] * M.FAMILIES[processor.family]["dynamic"]
    return (f"error: --max-length {args.max_length}: {len(over)} of the {len(originals)} samples can become longer "
            f"rows in training, e.g. {named} ({', '.join(todo[:-1])} or {todo[-1]})")
