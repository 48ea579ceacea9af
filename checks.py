"""Preflight checks of train.py: a flag, an --out or a sample that would waste the run or the user's files is
refused before the model loads, in one line. Each check returns that line (or None), and train.py prints it.
"""
import os

from PIL import Image

import checkpoint
import model as M
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
    if args.max_steps is None and args.epochs <= 0:
        return f"error: --epochs {args.epochs:g} trains nothing: pass a positive number (or --max-steps)"
    return None


def facts(args):
    """(UF's facts in training: the user's file whole, or the built-in train pool; the line refusing them or
    --k-facts, or None)."""
    try:
        facts = perturb.read_facts(args.facts_file) if args.facts_file else perturb.unrelated_facts("train")
    except perturb.DataError as e:
        return None, f"error: --facts-file {e}"
    if args.k_facts < 1 or (args.k_facts > len(facts) and not args.facts_replacement):
        return facts, (f"error: --k-facts {args.k_facts}: UF prepends 1 to {len(facts)} facts ("
                       f"{args.facts_file or f'the train pool of {perturb.FACTS_FILE}'}; more with "
                       f"--facts-replacement)")
    if args.canvas_size is not None and args.canvas_size < 1:
        return facts, f"error: --canvas-size {args.canvas_size}: canvases need at least 1 pixel a side"
    return facts, None


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
    """A mistyped local path, or a model type in no row of model.FAMILIES, fails now, not after the data."""
    try:
        M.checkpoint_family(M.where(args.model))
    except (FileNotFoundError, NotADirectoryError, ValueError) as e:
        return f"error: --model {e}"
    return None


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
