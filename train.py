"""Fine-tunes a multimodal LLM against modality interference (arXiv 2505.19616, eq. 10):
L = L_sft + L_adv + lambda_cons * L_cons over image-heavy, text-heavy (each with a heuristically
perturbed twin) and VQA samples, with masked PGD on the task-irrelevant modality's embeddings.
One process, or FSDP2 under torchrun; every default below is a flag, and --preset sets a few.
  python train.py --model out/toy/base --data data/toy/train.jsonl --preset ours --out out/toy/ours
  python train.py --paper-defaults qwen2.5-vl-7b --data data/caltech101 data/mmlu ... --out out/qwen7b-paper
  torchrun --nproc_per_node 4 train.py --model llava-1.5-7b --data data/caltech101 data/mmlu ... --out out/7b
"""
import argparse
import errno
import functools
import hashlib
import json
import math
import os
import random
import re
import resource
import shutil
import socket
import sys
import time
from fractions import Fraction

import peft
import torch
import torch.distributed as dist
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

import losses
import model as M
import perturb
from evaluate import progress

PRESETS = {  # the rows of the paper's ablation (Table 5); flags given explicitly win
    "vanilla": dict(max_steps=0),  # no training: the base model, exported for evaluation
    "fft-vqa": dict(ratio_image=0.0, ratio_text=0.0, aug=False, cons="none", adv="none"),
    "fft-aug": dict(aug=True, cons="none", adv="none"),
    "kl": dict(aug=True, cons="kl", adv="none"),
    "js": dict(aug=True, cons="js", adv="none"),
    "rg": dict(aug=True, cons="none", adv="rg"),
    "pgd": dict(aug=True, cons="none", adv="pgd"),
    "ours": dict(aug=True, cons="js", adv="pgd"),
}
TWINS = {"image_heavy": ("uf", "md"), "text_heavy": ("ri", "fb", "fw")}  # heuristic perturbations to train on
# The authors' training settings per model (--paper-defaults), from their repository (luisrui/Modality-
# Interference-in-MLLMs at 911003a), configs/model_train/. Their alpha 0.1, tau 1, batch 8, warm-up 0.03, AdamW
# eps 1e-6 and weight decay 1e-4 are our defaults already. The consistency kind stays the preset's (ours: JS).
PAPER = {
    # llava-v1.5-7b/args_full_KL_PGD.yaml, as Table 8: their args_full_JS_PGD.yaml says pgd_steps 1, but it trains
    # on another file (trail_5.json), its run name says epsilon 1e-4, and it lacks the image/text ratios that
    # src/llava/llava_consistent.py reads, so it cannot have made the paper's runs as written
    "llava-1.5-7b": dict(eps=1e-3, pgd_steps=2, lambda_cons=0.01, lr=2e-5, ratio_image=0.25, ratio_text=0.25),
    # instructBlip-7b/args_full_KL_PGD.yaml (there is no JS+PGD config for InstructBLIP)
    "instructblip-vicuna-7b": dict(eps=0.05, pgd_steps=4, lambda_cons=0.01, lr=2e-5, ratio_image=0.25,
                                   ratio_text=0.25),
    # qwen2.5-vl-3b/args_full_KL_PGD.yaml: their args_full_JS_PGD.yaml sets consistency_type KL, eps 1e-3,
    # lr 1e-6, batch 10 and 0.2 / 0.2 while its save_dir names eps 1e-2 and 2:2:4, so the KL file is the coherent one
    "qwen2.5-vl-3b": dict(eps=1e-2, pgd_steps=2, lambda_cons=1e-3, lr=1e-5, ratio_image=0.25, ratio_text=0.25),
    # qwen2.5-vl-7b/args_full_JS_PGD.yaml (mix 1:1:6)
    "qwen2.5-vl-7b": dict(eps=1e-3, pgd_steps=1, lambda_cons=1e-3, lr=1e-5, ratio_image=0.125, ratio_text=0.125),
}
# and their data protocol: every twin every step (LlavaDataset.py), UF's facts drawn with replacement
# (modules/prompt/text_interfere.py), canvases and random pixels at 336 px for every family (modules/utils/aug_utils.py)
PAPER = {m: dict(model=m, **row, twins="all", facts_replacement=True, canvas_size=336, prompt="authors",
                pgd_scope="template")
         for m, row in PAPER.items()}


def flags(row):
    """A row of PAPER as the flags it stands for, as --help prints them."""
    def flag(k, v):
        name = "--" + k.replace("_", "-")
        return name if v is True else f"{name} {v:g}" if isinstance(v, float) else f"{name} {v}"
    return " ".join(flag(k, v) for k, v in row.items())


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, and the description and the table of --paper-defaults printed as written."""

p = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter, epilog=(
    "--paper-defaults MODEL sets the authors' settings for MODEL (flags given explicitly win, and a --preset's "
    "own flags too):\n" + "".join(f"  {m}: {flags(row)}\n" for m, row in PAPER.items()) +
    "The plain defaults are the paper's Table 8."))
p.add_argument("--preset", choices=list(PRESETS), default="ours")
p.add_argument("--paper-defaults", choices=list(PAPER), default=None, metavar="MODEL",
               help="the authors' training settings for MODEL (listed below), each from their configs")
# I/O
p.add_argument("--model", default="llava-1.5-7b", help="alias, hub id or local folder")
p.add_argument("--data", nargs="+", default=["data/toy/train.jsonl"], help="JSONL files or folders with train.jsonl")
p.add_argument("--out", default="out/train", help="the output Hugging Face folder, checkpoints and metrics.jsonl")
p.add_argument("--save-every", type=int, default=500, help="steps between resumable checkpoints (0: none)")
p.add_argument("--export", action=argparse.BooleanOptionalAction, default=True,
               help="write the trained model to --out as a Hugging Face folder at the end")
p.add_argument("--keep-checkpoints", type=int, default=2,
               help="checkpoints kept in --out: more than one, so a damaged newest one leaves the one before it")
p.add_argument("--resume", action="store_true",
               help="continue from the newest intact checkpoint in --out, with the same settings")
p.add_argument("--overwrite", action="store_true",
               help="let a fresh run replace the earlier run in --out: its checkpoints and exported model")
# data
p.add_argument("--ratio-image", type=float, default=0.25, help="share of image-heavy originals per batch")
p.add_argument("--ratio-text", type=float, default=0.25, help="share of text-heavy originals; VQA takes the rest")
p.add_argument("--aug", action=argparse.BooleanOptionalAction, default=True, help="add perturbed twins of originals")
p.add_argument("--twins", choices=["one", "all"], default="one",
               help="one: a twin per original drawn from its task's interventions (image-heavy UF, MD; text-heavy "
                    "RI, FB, FW); all: one of each, every step, as the authors train")
p.add_argument("--k-facts", type=int, default=10, help="unrelated facts prepended by UF")
p.add_argument("--facts-file", default=None,
               help="UF's facts, one a line, used whole (default: the train pool of data/unrelated_facts.txt)")
p.add_argument("--facts-replacement", action="store_true",
               help="draw UF's k facts with replacement, as the authors do (then --k-facts may exceed the facts)")
p.add_argument("--ri-folder", default=None, help="real images for RI twins (default: the data's image-heavy images)")
p.add_argument("--canvas-size", type=int, default=None,
               help="side in pixels of the FB/FW canvases and text-heavy random pixels (default: the model's "
                    "input size; the authors use 336 for every family)")
p.add_argument("--max-length", type=int, default=2048, help="a longer sample is an error, never truncated")
p.add_argument("--prompt", choices=M.STYLES, default="ours",
               help="how prompts and answers are written (model.PROMPTS): ours, or the authors' (their option "
                    "lines, system prompt and bare answer letter)")
# method
p.add_argument("--cons", choices=["none", "kl", "js", "mse"], default="js",
               help="consistency loss (eq. 9 for kl; mse: on the answer logits, see losses.consistency)")
p.add_argument("--lambda-cons", type=float, default=0.01)
p.add_argument("--tau", type=float, default=1.0)
p.add_argument("--adv", choices=["none", "pgd", "rg"], default="pgd", help="adversarial term: PGD or random Gaussian")
p.add_argument("--eps", type=float, default=None, help="PGD L-inf radius (default 1e-3; 1e-4 for 13B models)")
p.add_argument("--alpha", type=float, default=0.1, help="PGD step size (eq. 7)")
p.add_argument("--pgd-steps", type=int, default=2)
p.add_argument("--pgd-sign", action="store_true", help="sign-gradient steps instead of eq. 7's raw gradient")
p.add_argument("--pgd-scope", choices=["sample", "template"], default="sample",
               help="what PGD may touch in an image-heavy row: the sample's own text (question, options, "
               "instruction), or every non-answer text position, the chat template's too (the authors')")
p.add_argument("--shortcuts", choices=["on", "off"], default="on",
               help="exact shortcuts: under --pgd-scope sample, PGD's passes over image-heavy rows start at their "
               "first perturbed position, on the clean prefix's keys and values (same numbers; off: whole rows)")
p.add_argument("--sigma", type=float, default=0.05, help="std of the RG noise")
# optimisation
p.add_argument("--lr", type=float, default=2e-5)
p.add_argument("--min-lr", type=float, default=0.0)
p.add_argument("--warmup", type=float, default=0.03, help="share of steps with linear warm-up, then cosine")
p.add_argument("--epochs", type=float, default=1.0)
p.add_argument("--epoch-end", choices=["smallest", "largest"], default="smallest",
               help="an epoch is one pass over the pool that runs out first (as the authors' sampler) or the last")
p.add_argument("--max-steps", type=int, default=None, help="overrides --epochs")
p.add_argument("--batch-size", type=int, default=8, help="originals per GPU per micro-step (twins come on top)")
p.add_argument("--grad-accum", type=int, default=1)
p.add_argument("--weight-decay", type=float, default=1e-4)
p.add_argument("--adam-eps", type=float, default=1e-6)
p.add_argument("--grad-clip", type=float, default=1.0)
# LoRA: low-rank adapters on the LLM instead of its full weights (one GPU); the projector is trained in full
p.add_argument("--lora", type=int, default=0, metavar="R",
               help="rank of the adapters (0: full fine-tuning, the paper's)")
p.add_argument("--lora-alpha", type=float, default=None,
               help="updates are B @ A * alpha / R (default 2R: the authors' ratio, r 128 and alpha 256, at any R)")
p.add_argument("--lora-dropout", type=float, default=0.0,
               help="dropout on the adapters' input (the authors' 0.1 would make L_cons compare two dropout masks "
                    "as well as two inputs)")
p.add_argument("--lora-targets", nargs="+", default=list(M.LORA_TARGETS),
               help="projections of the language model's blocks that get adapters (the authors': q_proj k_proj v_proj "
                    "o_proj); the vision tower and Q-Former never do")
p.add_argument("--merge", action="store_true",
               help="with --lora: export the merged model (base + adapters) to --out, the adapter to --out/adapter")
# system
p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="compute dtype (default: bf16 on GPU)")
p.add_argument("--cpu-offload", choices=["auto", "on", "off"], default="auto", help="auto: on for GPU and > 3B params")
p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
               help="recompute activations in backward (default: on for GPU, as the authors trained)")
p.add_argument("--seed", type=int, default=2024)
p.add_argument("--max-bad-steps", type=int, default=10, help="stop after this many non-finite losses in a row")
p.add_argument("--profile", action="store_true",
               help="time each phase of a step (synchronising the GPU) and record peak memory in metrics.jsonl")
p.add_argument("--workers", type=int, default=None,
               help="processes preparing the next steps' batches (images, twins, processor) while a step trains "
                    "(default: 2 on GPU; 0 on CPU, whose cores do the compute); any number gives the same batches")
p.add_argument("--freeze-vision", action=argparse.BooleanOptionalAction, default=True,
               help="keep the vision encoder (InstructBLIP: and Q-Former) fixed, as the paper; off to pretrain one")
known = p.parse_known_args()[0]
p.set_defaults(**PAPER.get(known.paper_defaults, {}))
p.set_defaults(**PRESETS[known.preset])  # after: a preset's own flags (fft-vqa's ratios) define its ablation row
args = p.parse_args()
if args.eps is None:
    args.eps = 1e-4 if "13b" in args.model.lower() else 1e-3
if args.lora_alpha is None:
    args.lora_alpha = 2 * args.lora

# ---- refusals: a flag or an --out that would waste the run or the user's files fails here, in one line -----
CKPT = re.compile(r"ckpt-\d{8}")  # the only folders resume reads and pruning deletes: a user's ckpt-best is theirs
EXPORT = ("config.json", "model.safetensors", "model.safetensors.index.json", "adapter_config.json")


def checkpoints():
    """This run's checkpoint folders, oldest first (8 digits: names sort as steps)."""
    if not os.path.isdir(args.out):
        return []
    return sorted(d for d in os.listdir(args.out) if CKPT.fullmatch(d) and os.path.isdir(os.path.join(args.out, d)))


if args.batch_size < 1 or args.grad_accum < 1:  # every rank's every micro-step needs a row to collate
    sys.exit("error: --batch-size and --grad-accum must be at least 1 (1 works: tasks take turns over steps)")
if args.workers is not None and args.workers < 0:
    sys.exit(f"error: --workers {args.workers}: pass 0 (batches made between steps) or more")
if args.keep_checkpoints < 1 or args.save_every < 0:
    sys.exit("error: --keep-checkpoints must be at least 1 and --save-every at least 0 (0: no checkpoints)")
# zero steps would export the untrained model as if it were trained; only the vanilla preset means that
if args.max_steps is not None and args.max_steps <= 0 and not (args.max_steps == 0 and args.preset == "vanilla"):
    sys.exit(f"error: --max-steps {args.max_steps} trains nothing: pass a positive number "
             f"(--preset vanilla exports the base model on purpose)")
if args.lora < 0 or (args.merge and not args.lora) or (args.lora and not args.freeze_vision):
    sys.exit(f"error: --lora {args.lora}{' --merge' * args.merge}{' --no-freeze-vision' * (not args.freeze_vision)}: "
             f"--lora takes a rank (0: off), --merge needs one, and the vision encoder trains only without --lora")
if args.max_steps is None and args.epochs <= 0:
    sys.exit(f"error: --epochs {args.epochs:g} trains nothing: pass a positive number (or --max-steps)")
try:  # the facts UF draws from in training: the user's file whole, or the built-in train pool
    facts = perturb.read_facts(args.facts_file) if args.facts_file else perturb.unrelated_facts("train")
except perturb.DataError as e:
    sys.exit(f"error: --facts-file {e}")
if args.k_facts < 1 or (args.k_facts > len(facts) and not args.facts_replacement):
    sys.exit(f"error: --k-facts {args.k_facts}: UF prepends 1 to {len(facts)} facts ("
             f"{args.facts_file or f'the train pool of {perturb.FACTS_FILE}'}; more with --facts-replacement)")
if args.canvas_size is not None and args.canvas_size < 1:
    sys.exit(f"error: --canvas-size {args.canvas_size}: canvases need at least 1 pixel a side")
parent = os.path.abspath(args.out)
while not os.path.exists(parent):  # the folder that --out will be made in
    parent = os.path.dirname(parent)
if not os.path.isdir(parent):
    sys.exit(f"error: --out {args.out}: {parent} is a file, not a folder: choose another --out")
if not os.access(parent, os.W_OK | os.X_OK):
    sys.exit(f"error: --out {args.out}: {parent} is not writable: choose another --out")
old_export = [f for f in EXPORT if os.path.exists(os.path.join(args.out, f))]
earlier = checkpoints() + old_export
if earlier and not args.resume and not args.overwrite:
    sys.exit(f"error: {args.out} holds an earlier run ({', '.join(earlier[-2:])}): pass --resume to continue it, "
             f"--overwrite to replace it, or choose another --out")
if args.resume and not checkpoints():  # a mistyped --out would otherwise start from scratch without a word
    sys.exit(f"error: --resume: {args.out} holds no checkpoint (ckpt-NNNNNNNN): check --out, or drop --resume")
replacing = args.overwrite and not args.resume
try:  # a mistyped local path, or a model type in no row of model.FAMILIES, fails now, not after the data
    M.checkpoint_family(M.where(args.model))
except (FileNotFoundError, NotADirectoryError, ValueError) as e:
    sys.exit(f"error: --model {e}")

# ---- distributed setup: torchrun's environment decides -----------------------------------------------------
if "RANK" not in os.environ:  # plain `python train.py`: a group of one, so that one code path serves both
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
if device.type == "cuda":
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)  # bound to its GPU: barrier() then does not guess one
else:
    dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
master = rank == 0
dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
torch.manual_seed(args.seed)  # the same initial state everywhere; per-sample noise is seeded by sample id


def log(*a):
    if master:
        print(*a, flush=True)


def all_sum(t):
    dist.all_reduce(t)
    return t


# ---- data: bad files fail here, before any model is loaded ------------------------------------------------
paths = [perturb.data_file(d, "train") for d in args.data]
try:
    loaded = [(path, perturb.load_samples(path, decode=True)) for path in paths]  # a broken image too
except (perturb.DataError, FileNotFoundError) as e:  # messages written for people: file, line, what to do
    sys.exit(f"error: {e}")
samples = [s for _, part in loaded for s in part]
file_of = {id(s): path for path, part in loaded for s in part}  # for errors naming a sample's file
# exact fractions: in floats ceil(100 * 0.55) is 56, and the schedule would drift from the ratios
image, text = (Fraction(r).limit_denominator(10**6) for r in (args.ratio_image, args.ratio_text))
ratios = {"image_heavy": image, "text_heavy": text, "vqa": max(Fraction(0), 1 - image - text)}
pools = {t: [s for s in samples if s["task"] == t] for t in ratios if ratios[t] > 0}
pools = {t: pool for t, pool in pools.items() if pool}
if not pools:
    sys.exit(f"error: no training samples for the tasks with a positive ratio "
             f"{ {t: float(r) for t, r in ratios.items()} } in {paths}")
G = args.batch_size * world * args.grad_accum  # originals per optimizer step, all ranks
share = {t: ratios[t] / sum(ratios[t] for t in pools) for t in pools}
# steps for one pass over each pool; the authors' sampler ends an epoch when the first pool runs out
# (their 10-hour runs), where waiting for the largest (LLaVA-Instruct's 624k) would take 20-40 times longer
passes = {t: math.ceil(len(pools[t]) / (G * share[t])) for t in pools}
steps_per_epoch = (min if args.epoch_end == "smallest" else max)(passes.values())
max_steps = args.max_steps if args.max_steps is not None else math.ceil(args.epochs * steps_per_epoch)
ri_images = None
if args.aug and "text_heavy" in pools:
    if args.ri_folder is None and not any(s["task"] == "image_heavy" for s in samples):
        sys.exit("error: text-heavy twins need real images for RI: pass --ri-folder or add image-heavy data")
    ri_images = perturb.ri_pool(samples, args.ri_folder)
log(f"{len(samples)} samples from {len(paths)} files; originals per step "
    f"{', '.join(f'{t} {float(G * share[t]):g}' for t in pools)} "
    f"({('+ twins' if args.twins == 'one' else '+ every twin of each') if args.aug else 'no twins'}); "
    f"one pass over the smallest pool takes {min(passes.values())} steps, over the largest "
    f"{max(passes.values())}; {max_steps} steps ({steps_per_epoch}/epoch, --epoch-end {args.epoch_end})")


# ---- lengths: every row training can make must fit --max-length, checked before the model loads ------------
# collate refuses a longer row (truncating would cut the answer), which mid-run would waste the hours before
# it; here each original is measured at the longest row it can become, from text and image headers only.
def longest_rows(processor, size):
    """(tokens, variant, image size) of each original's longest row: itself and, with --aug, the longest twin
    of each kind (perturb.longest), whichever --twins draws: UF with the k longest facts (in tokens) that name
    none of its options (with --facts-replacement the longest k times), an upper bound of what UF draws, and a
    draw it can make, so refusing it is right; MD with the longest text _md can choose (by characters); RI with
    the RI image of most image tokens. FB/FW are at `size`, as the random pixels of the original are. A sample no
    twin can be made of raises ValueError (naming it), as in training."""
    dynamic, headers = M.FAMILIES[processor.family]["dynamic"], {}

    def wh(image):  # the PIL size of what a row carries; LLaVA's and InstructBLIP's image tokens ignore it
        if image is None or not dynamic:
            return (size, size)
        if image not in headers:
            with Image.open(image) as im:
                headers[image] = im.size
            try:  # Qwen2-VL refuses an aspect ratio over 200
                M.n_image_tokens(processor, im.size)
            except ValueError as e:
                raise ValueError(f"{image}: {e} (crop or pad the image)") from e
        return headers[image]

    n_facts = map(len, processor.tokenizer(facts, add_special_tokens=False)["input_ids"])
    by_length = [f for _, f in sorted(zip(n_facts, facts), key=lambda nf: -nf[0])]

    # a text-heavy original and its twins share their text: the one with the image of most tokens is the longest
    text_heavy = ("orig", (size, size))
    if args.aug and ri_images and dynamic:
        ri = max(ri_images, key=lambda path: M.n_image_tokens(processor, wh(path)))
        if M.n_image_tokens(processor, wh(ri)) > M.n_image_tokens(processor, (size, size)):
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
                             for name in TWINS["image_heavy"]]
                except ValueError as e:  # perturb's own, naming the sample
                    raise ValueError(f"{file_of[id(s)]}: {e}") from e
        n_rows = M.lengths(processor, [r[2] for r in rows], [r[3] for r in rows], style=args.prompt)
        for (i, variant, _, wh_), n in zip(rows, n_rows):
            best[i] = max(best[i], (n, variant, wh_), key=lambda b: b[0])
    return originals, best


def too_long():
    """One line that refuses the run, naming the first few samples with a row past --max-length, or None."""
    processor = M.load_processor(args.model)
    try:
        originals, best = longest_rows(processor, args.canvas_size or M.image_size(processor))
    except ValueError as e:  # a sample UF or MD cannot take, or an image the processor cannot
        return f"error: {e}"
    over = sorted([(n, variant, wh, s) for s, (n, variant, wh) in zip(originals, best) if n > args.max_length],
                  key=lambda o: -o[0])
    if not over:
        return None
    named = "; ".join(f"sample {s['id']!r} of {file_of[id(s)]}{'' if v == 'orig' else f', as its {v} twin'}: "
                      f"{n} tokens with its answer, {round(100 * M.n_image_tokens(processor, wh) / n)}% of them "
                      f"image tokens" for n, v, wh, s in over[:3])
    todo = ["raise --max-length", "shorten these samples"] + ["lower --k-facts"] * any(o[1] == "uf" for o in over[:3]) \
        + ["resize their images"] * M.FAMILIES[processor.family]["dynamic"]
    return (f"error: --max-length {args.max_length}: {len(over)} of the {len(originals)} samples can become longer "
            f"rows in training, e.g. {named} ({', '.join(todo[:-1])} or {todo[-1]})")


verdict = [too_long() if master and max_steps > 0 else None]  # rank 0 measures, every rank stops
dist.broadcast_object_list(verdict, 0)
if verdict[0]:
    sys.exit(verdict[0] if master else 1)


@functools.lru_cache(maxsize=16)  # one shuffle per pass over a pool, not one per sample drawn from it
def permutation(task, cycle):
    return random.Random(f"{args.seed}/{task}/{cycle}").sample(range(len(pools[task])), len(pools[task]))


def slot(n):
    """The task of the n-th original overall (the slots of all steps in a row) and its index in that
    task's stream. The first task takes slot n where ceil(n * share) steps up, the next does the same
    among the slots left, and so on: after any n slots every task holds n * share of them within 2, at
    every batch size, and n alone decides, so any split over ranks and micro-steps gives the same step."""
    left = Fraction(1)
    for t in pools:
        q = share[t] / left  # its share of the slots the earlier tasks left; 1 for the last task
        k = math.ceil(n * q)  # its slots before n
        if math.ceil((n + 1) * q) > k:
            return t, k
        n, left = n - k, left - share[t]


def originals(step):
    """The global batch of `step`: each pool is an endless stream of reshuffled passes, so the batch
    depends on (seed, step) only and a resumed run sees exactly the batches it would have seen."""
    out = []
    for t, j in map(slot, range(step * G, (step + 1) * G)):
        out.append(pools[t][permutation(t, j // len(pools[t]))[j % len(pools[t])]])
    return out


def perturbed(s, name, rng):
    """s under a training intervention: the train pool of wordings, the run's facts and canvas size."""
    return perturb.perturb(s, name, rng, size=size, pool="train", ri_images=ri_images, k=args.k_facts, facts=facts,
                           replace=args.facts_replacement)


def twins_of(s, step):
    """s's heuristically perturbed twins at `step`, as (row id, sample): --twins one draws one of its task's
    training interventions, --twins all makes each, each from its own seed."""
    if not args.aug or s["task"] not in TWINS:
        return []
    if args.twins == "one":
        rng = random.Random(f"{args.seed}/{step}/{s['id']}/twin")
        return [(f"{s['id']}/twin", perturbed(s, rng.choice(TWINS[s["task"]]), rng))]
    return [(f"{s['id']}/{name}", perturbed(s, name, random.Random(f"{args.seed}/{step}/{s['id']}/{name}")))
            for name in TWINS[s["task"]]]


def micro_batches(step):
    """This rank's micro-batches: originals, then their twins; `pairs` links each twin row to its original.
    Or the line that stops the run, which the loop prints: this may run in a --workers process. CPU only,
    and nothing of the model: a forked worker must not touch CUDA."""
    mine = originals(step)
    out = []
    for m in range(args.grad_accum):
        part = mine[m * world + rank::world * args.grad_accum]
        twins = [(i, row_id, t) for i, s in enumerate(part) for row_id, t in twins_of(s, step)]
        rows = [perturb.perturb(s, "orig", 0, size=size) for s in part] + [t for _, _, t in twins]
        try:
            batch = M.collate(processor, rows, train=True, max_length=args.max_length, style=args.prompt)
        except ValueError as e:  # the exact check, should a row be longer than measured before the model loaded
            return f"error: {e}"
        batch["ids"] = [s["id"] for s in part] + [row_id for _, row_id, _ in twins]  # seeds of each row's noise
        batch["pairs"] = [(i, len(part) + j) for j, (i, _, _) in enumerate(twins)]
        out.append(batch)
    return out


# ---- which checkpoint to resume: decided before the model loads ------------------------------------------
# Flags that cannot change the losses; the rest must match the checkpoint's run, or a resume would
# continue a different run (data and model are compared by content, in `inputs`)
FREE = {"save_every", "keep_checkpoints", "profile", "resume", "overwrite", "max_bad_steps", "export", "out",
        "activation_checkpointing", "cpu_offload", "workers", "data", "model", "facts_file", "shortcuts", "merge"}

# Flags added since, with the value that gives what a checkpoint written before them computed
EARLIER = {"pgd_scope": "template", "lora": 0}


def shown(v):
    if isinstance(v, list):
        return "[" + ", ".join(map(shown, v)) + "]"
    return "unset" if v is None else v[:12] if isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) else str(v)


def read_state(folder):
    """(state.json, None), or (None, what is damaged): a missing file, or one of another size than written."""
    try:
        with open(f"{folder}/state.json") as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        return None, f"state.json: {e}"
    for name, size in state.get("files", {}).items():
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            return None, f"{name} is missing"
        if os.path.getsize(path) != size:
            return None, f"{name} has {os.path.getsize(path)} bytes, {size} were written"
    return state, None


def resume_point():
    """(the newest intact checkpoint, None) or (None, why none may be resumed); rank 0 decides for all."""
    for name in reversed(checkpoints()):
        folder = os.path.join(args.out, name)
        state, damage = read_state(folder)
        if damage:
            print(f"warning: {folder} is damaged ({damage}); trying the checkpoint before it", file=sys.stderr)
            continue
        if state["world"] != world:
            return None, (f"error: {folder} was written by {state['world']} processes: resume with as many "
                          f"(now {world}), since each holds its own shards")
        then = EARLIER | {k: v for k, v in state["args"].items() if k not in FREE} | state.get("inputs", {})
        now = {k: v for k, v in vars(args).items() if k not in FREE} | inputs
        changed = [f"{k if k.startswith('-') else '--' + k.replace('_', '-')} {shown(then[k])} then, "
                   f"{shown(now[k])} now" for k in then if k in now and then[k] != now[k]]
        if changed:
            return None, (f"error: {folder} was trained with other settings: {'; '.join(changed)} (resume with "
                          f"the same, or start a fresh run in another --out)")
        return folder, None
    return None, f"error: {args.out}: every checkpoint is damaged (see the warnings above): start a fresh run"


# what decides the losses besides the flags: a checkpoint records it, and a resume must find it unchanged
inputs = {"--data sha256": [perturb.sha256(path) for path in paths],
          **({"--facts-file sha256": perturb.sha256(args.facts_file)} if args.facts_file else {}),
          **{"--model" + ("" if k == "model" else " " + k): v for k, v in M.identity(args.model).items()}} \
    if master else {}
resume_from = None
if args.resume:
    choice = [resume_point() if master else None]
    dist.broadcast_object_list(choice, 0)
    resume_from, problem = choice[0]
    if problem:
        sys.exit(problem if master else 1)  # once, not once per rank


# ---- model: frozen vision encoder, FSDP2 per layer, then the root ----------------------------------------
# Only rank 0 reads the weights; the others build the architecture on the meta device and receive their
# shards from it below, so host memory holds one full copy of the model, not one per rank.
hf_model, processor = M.load(args.model, dtype=torch.float32, meta=not master)
size = args.canvas_size or M.image_size(processor)  # canvases and random pixels: the encoder's input size
if args.freeze_vision:
    M.freeze(hf_model)
if args.lora:  # adapters inserted in hf_model itself, before sharding: FSDP2 shards each block with them inside
    peft_model = peft.get_peft_model(hf_model, M.lora_config(hf_model, args.lora, args.lora_alpha, args.lora_dropout,
                                                             args.lora_targets))  # all else frozen
    base = M.where(args.model)  # the adapter's base: a local folder by its absolute path, so any folder can load it
    peft_model.peft_config["default"].base_model_name_or_path = os.path.abspath(base) if os.path.isdir(base) else base
    with torch.no_grad():  # frozen weights are only read, in the compute dtype: store them so (7B in bf16: 13 GiB,
        for q in hf_model.parameters():  # not 26); FSDP2 asks one dtype of the trained ones alone
            if not q.requires_grad:
                q.data = q.data.to(dtype)
if args.activation_checkpointing or (args.activation_checkpointing is None and device.type == "cuda"):
    hf_model.activation_checkpointing_enable({"use_reentrant": False})
M.train_mode(hf_model) if args.freeze_vision else hf_model.train()


class Step(torch.nn.Module):
    """Routes both halves of a pass through one root forward, so FSDP2 gathers the root's own weights
    (embedding table, projector, lm head) around each: step(batch) embeds, step(batch, embeds) gives logits,
    step(batch, embeds, stop=P) the keys and values of the first P positions (M.prefix)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, batch, embeds=None, keep=None, past=None, stop=None, grad=False):
        if embeds is None:
            return M.embed(self.model, batch)
        if stop is not None:
            return M.prefix(self.model, embeds, batch, stop, grad)
        return M.logits(self.model, embeds, batch, keep, past)


step_model = Step(hf_model)
n_params = sum(q.numel() for q in hf_model.parameters())
offload = args.cpu_offload == "on" or (args.cpu_offload == "auto" and device.type == "cuda" and n_params > 3e9)
policy = dict(mesh=init_device_mesh(device.type, (world,)),
              mp_policy=MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32))
if offload:
    policy["offload_policy"] = CPUOffloadPolicy()
full = dict(step_model.state_dict()) if master else {}  # rank 0's full tensors, for the broadcast below
for block in M.blocks(hf_model):  # every transformer block of the vision tower and the LLM, the torchtune way
    fully_shard(block, **policy)
fully_shard(step_model, **policy)
if not master:
    step_model.to_empty(device="cpu" if offload else device)  # storage for this rank's shards
with torch.no_grad():
    for mod in step_model.modules():  # buffers (rotary frequencies, position ids) are not in state dicts
        for name, b in mod.named_buffers(recurse=False):
            mod._buffers[name] = b.to(device) if master else torch.empty_like(b, device=device)
            dist.broadcast(mod._buffers[name], 0)
set_model_state_dict(step_model, full,
                     options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
del full
trainable = [(n, q) for n, q in step_model.named_parameters() if q.requires_grad]
decay = [q for n, q in trainable if q.ndim >= 2]
no_decay = [q for n, q in trainable if q.ndim < 2]  # biases and norms, as the Hugging Face Trainer does
optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}],
                              lr=args.lr, eps=args.adam_eps)
log(f"{n_params / 1e6:.1f}M parameters, {sum(q.numel() for _, q in trainable) / 1e6:.1f}M trained; "
    f"FSDP2 over {world} rank{'s' if world > 1 else ''} on {device}, {dtype}"
    f"{', CPU offload' if offload else ''}; preset {args.preset}"
    + (f"; LoRA r {args.lora}, alpha {args.lora_alpha:g} on {' '.join(args.lora_targets)}" if args.lora else ""))


def get_lr(step):
    """Linear warm-up, then cosine to min_lr; a function of the step, so resuming needs no state."""
    warm = max(1, int(args.warmup * max_steps))
    if step < warm:
        return args.lr * (step + 1) / warm
    progress_ = (step - warm) / max(1, max_steps - warm)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(1.0, progress_)))


# ---- checkpoints: per-rank shards in a temporary folder, renamed when complete ----------------------------

def local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def written(save, obj, path):
    """save(obj, path), or one line naming the file: a full disk is no traceback, and the checkpoint
    before this one is intact (this one is still a .tmp folder)."""
    try:
        save(obj, path)
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save on a full disk: "unexpected pos"
        full = getattr(e, "errno", None) == errno.ENOSPC or "unexpected pos" in str(e) or "No space" in str(e)
        sys.exit(f"error: {path}: {'no space left on device' if full else e}; the checkpoints before it are "
                 f"intact: make room, then pass --resume")


def save_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def save_checkpoint(step):
    tmp, final = os.path.join(args.out, f".tmp-ckpt-{step:08d}"), os.path.join(args.out, f"ckpt-{step:08d}")
    if master:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    written(save_file, {n: local(q).detach().cpu().contiguous() for n, q in trainable},
            f"{tmp}/model.rank{rank}.safetensors")
    state = optimizer.state_dict()
    state["state"] = {i: {k: local(v).cpu() for k, v in s.items()} for i, s in state["state"].items()}
    written(torch.save, state, f"{tmp}/optim.rank{rank}.pt")
    written(torch.save, {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
                         "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else torch.zeros(0)},
            f"{tmp}/rng.rank{rank}.pt")
    dist.barrier()
    if master:
        files = {name: os.path.getsize(os.path.join(tmp, name)) for name in os.listdir(tmp)}  # resume checks them
        written(save_json, {"step": step, "world": world, "args": vars(args), "inputs": inputs, "files": files},
                f"{tmp}/state.json")
        shutil.rmtree(final, ignore_errors=True)  # a damaged checkpoint of this step, skipped by the resume
        os.replace(tmp, final)  # a kill before this line leaves only a .tmp folder, which resume ignores
        older = [c for c in checkpoints() if c < os.path.basename(final)]  # newer ones are damaged: kept to report
        for old in older[:max(0, len(older) - (args.keep_checkpoints - 1))]:
            shutil.rmtree(os.path.join(args.out, old))
    dist.barrier()


def load_checkpoint(folder):
    with open(f"{folder}/state.json") as f:
        state = json.load(f)
    weights = load_file(f"{folder}/model.rank{rank}.safetensors")
    with torch.no_grad():
        for n, q in trainable:
            local(q).copy_(weights[n])
    opt = torch.load(f"{folder}/optim.rank{rank}.pt", weights_only=True)
    params = [q for group in optimizer.param_groups for q in group["params"]]
    for i, s in opt["state"].items():
        q = params[int(i)]
        for k, v in s.items():
            if hasattr(q, "to_local") and v.shape == local(q).shape and v.ndim > 0:
                s[k] = DTensor.from_local(v.to(local(q).device), q.device_mesh, q.placements,
                                          shape=q.shape, stride=q.stride())
    optimizer.load_state_dict(opt)
    rng = torch.load(f"{folder}/rng.rank{rank}.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    random.setstate((3, tuple(rng["python"]), None))
    if device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"])
    return state["step"]


start = 0
if resume_from:
    start = load_checkpoint(resume_from)
    log(f"resumed from {resume_from} at step {start}")
if master:
    os.makedirs(args.out, exist_ok=True)
    if replacing:  # --overwrite: the earlier run's checkpoints would be resumed and pruned as this run's
        for name in checkpoints():
            shutil.rmtree(os.path.join(args.out, name))
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    kept = []
    if args.resume and os.path.exists(metrics_path):
        with open(metrics_path) as f:
            kept = [line for line in f if line.endswith("\n") and json.loads(line)["step"] < start]
    with open(metrics_path, "w") as f:
        f.writelines(kept)


# ---- the objective (eq. 10) -------------------------------------------------------------------------------
phases, mark = {}, 0.0  # --profile: seconds per phase of the current step (bench.py's breakdown)
# --profile: positions PGD's passes ran over and those of the whole rows, and whether the adversarial copies ran on
# the clean prefix too (bench.py's floor)
shortcut = {"covered": 0, "whole": 0, "final": False}


def lap(name=None):
    """Adds the seconds since the previous lap to phases[name], once the GPU has finished its queue."""
    global mark
    if args.profile:
        if device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        if name:
            phases[name] = phases.get(name, 0.0) + now - mark
        mark = now


def to_device(batch):
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def rows_of(batch, rows):
    """The language-path entries of a batch restricted to some rows (one image per sample)."""
    idx = torch.tensor(list(rows), dtype=torch.long, device=batch["input_ids"].device)
    keys = set(M.FAMILIES[M.family(hf_model)]["lm_keys"]) | {"labels", "input_ids", "attention_mask"}
    return {k: batch[k][idx] for k in keys if k in batch}


def noise_like(embeds, ids, step, kind):
    """Standard normal noise per sample, seeded by (seed, step, sample id): the same values whatever the
    padding, rank or process count, so one process and many compute the same step."""
    noise = torch.zeros_like(embeds)
    for r, sid in enumerate(ids):
        key = hashlib.sha256(f"{args.seed}/{step}/{sid}/{kind}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(key[:8], "little"))
        noise[r] = torch.randn(embeds.shape[1:], generator=g).to(embeds.device, embeds.dtype)
    return noise


def peak_memory():
    """Bytes: the GPU's peak allocation in this step, or on CPU the process's peak resident size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def adversarial_rows(mask):
    """The rows with a task-irrelevant modality to perturb (none without --adv): their adversarial copies
    follow the clean rows, in this order, in the final pass."""
    return [r for r in range(len(mask)) if mask[r].any()] if args.adv != "none" else []


def consistency_pairs(batch, adv):
    """(original, other) row pairs of L_cons, numbered as in the final pass [clean; adversarial]: each original
    against each of its twins, its own adversarial copy (once, however many twins) and each twin's."""
    where, twins = {r: len(batch["labels"]) + j for j, r in enumerate(adv)}, {}
    for o, t in batch["pairs"]:
        twins.setdefault(o, []).append(t)
    return [(o, q) for o, ts in twins.items() for q in (*ts, where.get(o), *map(where.get, ts)) if q is not None]


def perturbable(batch, image_mask):
    """losses.modality_mask of the batch under --pgd-scope."""
    return losses.modality_mask(batch["tasks"], image_mask, batch["labels"], batch["attention_mask"],
                                batch["sample_mask"] if args.pgd_scope == "sample" else None)


def pgd_passes(batch, attack, mask):
    """How the passes over the attacked rows (positions in `attack`) split: [(rows, start, weight)], the same kinds
    on every rank. Under --pgd-scope sample an image-heavy row's perturbed text follows its image and the template's
    head, and causal attention keeps the positions before it clean whatever delta is: with --shortcuts on its passes
    start at the first perturbed position of its kind (the first entry), on the clean prefix's keys and values
    (M.prefix). A text-heavy row perturbs its image, which follows only the template's head: its passes are whole
    (start 0). A kind that another rank has and this one lacks is passed once more on a row of weight 0, as FSDP's
    collectives need."""
    tasks = [batch["tasks"][r] for r in attack]
    share = args.shortcuts == "on" and args.pgd_scope == "sample"
    kinds = [[i for i, t in enumerate(tasks) if share and t == "image_heavy"]]
    kinds.append([i for i in range(len(attack)) if i not in kinds[0]])
    present = torch.tensor([float(len(k) > 0) for k in kinds], device=device)
    anywhere = all_sum(present) if world > 1 else present
    passes = []
    for reuse, rows, used in zip((share, False), kinds, anywhere.tolist()):
        if used:
            first = [int(mask[i].float().argmax()) for i in rows if mask[i].any()]
            start = min(first, default=1) if reuse else 0
            if reuse and start == 0:
                raise RuntimeError(f"{M.family(hf_model)}: a template that starts with the sample's text leaves "
                                   f"nothing to share (pass --shortcuts off)")
            passes.append((rows or [0], start, float(len(rows) > 0)))
    return passes


def token_counts(batch):
    """Answer tokens entering each loss term, for normalising by the global count (all ranks, micro-steps)."""
    labels = batch["labels"]
    answers = (labels[:, 1:] != losses.IGNORE).sum(1)
    image_mask = batch["input_ids"] == hf_model.config.image_token_id
    adv = adversarial_rows(perturbable(batch, image_mask))
    cons = 0
    if args.cons != "none":  # a pair compares the answer tokens both rows have (the same answer: all of them)
        source = list(range(len(labels))) + adv  # the clean row each row of the final pass is
        cons = sum(int(min(answers[o], answers[source[q]])) for o, q in consistency_pairs(batch, adv))
    return torch.tensor([float(answers.sum()), float(answers[adv].sum()), float(cons)])


def answer_positions(labels):
    """Positions whose next token is an answer token in some row: the only logits any loss needs."""
    return (labels[:, 1:] != losses.IGNORE).any(0).nonzero().flatten()


def loss_parts(batch, step, totals):
    """L_sft, L_adv and L_cons of one micro-batch, each a sum divided by its global count."""
    embeds, image_mask = step_model(batch)
    lap("embed")
    labels, n = batch["labels"], len(batch["labels"])
    keep = answer_positions(labels)
    targets = labels[:, keep + 1]  # aligned with the kept logits
    mask = perturbable(batch, image_mask)
    adv = adversarial_rows(mask)
    attack = adv
    # every rank must run as many passes, or FSDP's collectives wait forever: a rank whose micro-batch has
    # nothing to attack (all VQA, at a small batch) while another's has attacks its first row under an empty
    # mask (delta stays 0) and drops the result
    if args.adv != "none" and world > 1 and all_sum(torch.tensor([float(len(adv))], device=device)).item() > 0:
        attack = adv or [0]
    if not attack:
        return losses_of(batch, step_model(batch, embeds, keep), targets, [], totals)
    sub, base, sub_mask = rows_of(batch, attack), embeds[attack].detach(), mask[attack]
    noise = noise_like(base, [batch["ids"][r] for r in attack], step, args.adv)
    lap("noise")
    passes = pgd_passes(batch, attack, sub_mask)
    prefix = None
    if passes[0][1] and not hf_model.is_activation_checkpointing:
        # the clean pass in two: its prefix, inside the graph, also serves the image-heavy rows' adversarial copies
        # (delta starts after it) and, detached, PGD's passes over them. Activation checkpointing drops a cache in
        # training (M.unchecked): under it PGD computes the prefix alone and the copies run whole.
        start = min(passes[0][1], int(keep.min()))
        prefix, last = step_model(rows_of(batch, range(n)), embeds, stop=start, grad=True)
        passes[0] = (passes[0][0], start, passes[0][2])
    width = sub["input_ids"].shape[1]
    shortcut["covered"] += sum(len(rows) * (width - start) for rows, start, weight in passes if weight)
    shortcut["whole"] += len(adv) * width
    shortcut["final"] |= prefix is not None
    if args.adv == "pgd":  # gradients w.r.t. delta only: the attack leaves parameter .grad alone
        pasts = []  # the clean prefix's keys and values, each kind's: delta cannot reach them
        for rows, start, _ in passes:
            src = [attack[i] for i in rows]
            pasts.append(None if not start else step_model(rows_of(sub, rows), base[rows], stop=start)
                         if prefix is None else [(k.detach()[src], v.detach()[src]) for k, v in prefix])
        lap("prefix")
        calls = iter(range(1, args.pgd_steps + 1))

        def attacked(d):
            """L_adv's own normalisation (the global batch mean, as the authors' per-batch mean):
            each sample's step is then the same however the batch is split over ranks."""
            i = next(calls)
            if i > 1:
                lap(f"pgd{i - 1}")  # the previous step's forward and backward w.r.t. delta
            loss = 0
            for (rows, start, weight), past in zip(passes, pasts):
                part = rows_of(sub, rows)
                keep_ = answer_positions(part["labels"])  # from `start` on: answers follow the sample's text
                out = step_model(part, (base + d)[rows, start:], keep_ - start, past)
                loss = loss + weight * losses.sft_loss(out, part["labels"][:, keep_ + 1], "sum", shift=False)
            return loss / totals[1]

        delta = losses.pgd(attacked, base, sub_mask, args.eps, args.alpha, args.pgd_steps, args.pgd_sign,
                           noise=noise)
        lap(f"pgd{args.pgd_steps}")
    else:
        delta = losses.gaussian_noise(base, sub_mask, args.sigma, noise=noise)
    delta = dict(zip(attack, delta))
    targets = torch.cat([targets, targets[adv]])

    def with_copies(copies):  # the clean rows' embeddings, then the copies' perturbed (the clean graph kept:
        return torch.cat([embeds, *((embeds[r] + delta[r])[None] for r in copies)])  # L_adv trains the projector)

    if prefix is None:  # one pass over [clean; adversarial]
        rows = list(range(n)) + adv
        return losses_of(batch, step_model(rows_of(batch, rows), with_copies(adv), keep), targets, adv, totals)
    # the clean rows and the image-heavy rows' adversarial copies on the clean prefix; the other copies whole
    start = passes[0][1]
    shared = [attack[i] for i in passes[0][0]] if passes[0][2] else []  # weight 0: a stand-in, not this kind
    rest = [r for r in adv if r not in shared]
    rows = list(range(n)) + shared
    logits = [step_model(rows_of(batch, rows), with_copies(shared)[:, start:], keep - start,
                         [(k[rows], v[rows]) for k, v in prefix])]
    if len(passes) > 1:  # whole rows (one of weight 0 where this rank has none and another has)
        whole = rest or [0]
        logits.append(step_model(rows_of(batch, whole), torch.stack([embeds[r] + delta.get(r, 0) for r in whole]),
                                 keep))
    out = torch.cat(logits)
    order = list(range(n)) + [n + shared.index(r) if r in shared else len(rows) + rest.index(r) for r in adv]
    sft, adv_loss, cons = losses_of(batch, out[order], targets, adv, totals)
    return sft + (out.sum() + last.sum()) * 0, adv_loss, cons  # every pass in the graph, used or not


def losses_of(batch, logits, targets, adv, totals):
    """L_sft, L_adv and L_cons from the kept logits of the [clean; adversarial] rows."""
    n = len(batch["labels"])
    sft = losses.sft_loss(logits[:n], targets[:n], "sum", shift=False) / totals[0].clamp(min=1)
    adv_loss = losses.sft_loss(logits[n:], targets[n:], "sum", shift=False) / totals[1].clamp(min=1) if adv \
        else logits.sum() * 0
    cons = logits.sum() * 0
    if args.cons != "none" and batch["pairs"]:
        answer, answer_mask = losses.answer_logits(logits, targets, shift=False)
        o, q = map(list, zip(*consistency_pairs(batch, adv)))
        cons = losses.consistency(answer[o], answer[q], args.cons, args.tau, answer_mask[o] & answer_mask[q],
                                  "sum") / totals[2].clamp(min=1)
    lap("forward")
    return sft, adv_loss, cons


# ---- the loop ---------------------------------------------------------------------------------------------
# A step's batches depend on (seed, step) and the data alone, so --workers processes make the next ones, in
# order, from the resume point on, while this step trains. Forked (spawn would run this script again in each),
# after CUDA started, as DataLoader's workers are on Linux: micro_batches touches neither CUDA nor the model.
# A generator of its own, or the loader would draw its workers' seed from the RNG state checkpoints restore.
workers = args.workers if args.workers is not None else 2 * (device.type == "cuda")
data = iter(torch.utils.data.DataLoader(range(start, max_steps), batch_size=None, collate_fn=micro_batches,
                                        num_workers=workers, multiprocessing_context="fork" if workers else None,
                                        generator=torch.Generator()))
bad, t0, tokens_seen = 0, time.time(), 0  # tokens: every rank's, real (not padding)
for step in range(start, max_steps):
    phases.clear()
    shortcut.update(covered=0, whole=0, final=False)
    lap()
    if args.profile and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    lr = get_lr(step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    batches = next(data)  # --profile's "data": the time this step waited for them, moved them and counted tokens
    if isinstance(batches, str):
        sys.exit(batches)
    batches = [to_device(b) for b in batches]
    totals = all_sum(sum(token_counts(b) for b in batches).to(device))
    lap("data")
    parts = torch.zeros(4, device=device)  # sft, adv, cons, tokens
    skipped = False
    for batch in batches:
        sft, adv_loss, cons = loss_parts(batch, step, totals)
        loss = (sft + adv_loss + args.lambda_cons * cons) * world  # FSDP averages gradients over ranks
        finite = all_sum(torch.tensor([float(torch.isfinite(loss))], device=device))
        if finite.item() < world:  # every rank must agree, or the collectives of backward would hang
            skipped = True
            break
        loss.backward()
        lap("backward")
        parts += torch.stack([sft, adv_loss, cons, batch["attention_mask"].sum().float()]).detach()
    if skipped:
        optimizer.zero_grad(set_to_none=True)
        bad += 1
        log(f"\nwarning: step {step}: non-finite loss, step skipped ({bad} in a row)")
        if bad >= args.max_bad_steps:
            sys.exit(f"stopping: {bad} non-finite losses in a row (lower --lr, check the data)")
        continue
    bad = 0
    grad_norm = torch.nn.utils.clip_grad_norm_([q for _, q in trainable], args.grad_clip)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    lap("optimizer")
    parts = all_sum(parts)
    sft, adv_loss, cons, tokens = parts.tolist()
    tokens_seen += tokens
    total = sft + adv_loss + args.lambda_cons * cons
    if master:
        with open(metrics_path, "a") as f:
            f.write(json.dumps({"step": step, "lr": lr, "loss": total, "sft": sft, "adv": adv_loss, "cons": cons,
                                "grad_norm": grad_norm, "time": time.time() - t0, "tokens": int(tokens),
                                **({"phases": phases, "peak_mem": peak_memory(), "shortcut": shortcut}
                                   if args.profile else {})}) + "\n")
        progress(step + 1 - start, max_steps - start, t0, "steps",
                 f"| loss {total:.4f} (sft {sft:.4f} adv {adv_loss:.4f} cons {cons:.4f}) | "
                 f"{tokens_seen / (time.time() - t0):.0f} tok/s")
    if args.save_every and ((step + 1) % args.save_every == 0 or step + 1 == max_steps):
        save_checkpoint(step + 1)
del data  # its workers end here, not with the process

# ---- the output: a Hugging Face folder that plain transformers loads --------------------------------------
# (of a LoRA run, the adapter folder in PEFT's format, which names its base; with --merge the merged model too)
full = get_model_state_dict(step_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                 ignore_frozen_params=args.lora > 0)) \
    if args.export else {}
if master and args.export:
    full = {k.removeprefix("model."): v for k, v in full.items()}
    tmp = os.path.join(args.out, ".tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    if args.lora:
        adapter = os.path.join(tmp, "adapter") if args.merge else tmp
        M.save(peft_model, processor, adapter, state_dict={"base_model.model." + k: v for k, v in full.items()})
        if args.merge:  # in float32, as training holds the weights: a bf16 base plus a small B @ A would round it off
            M.save(*M.load(adapter, dtype=torch.float32), tmp)
    else:
        M.save(hf_model, processor, tmp, state_dict=full)
    if replacing and old_export:  # the earlier model's files go, or two models (of two families, say) would mix
        for name in os.listdir(args.out):  # folders stay: checkpoints, a user's eval/
            if os.path.isfile(os.path.join(args.out, name)) and name != "metrics.jsonl":
                os.remove(os.path.join(args.out, name))
        shutil.rmtree(os.path.join(args.out, "adapter"), ignore_errors=True)  # a --merge run's adapter
    for name in os.listdir(tmp):
        if os.path.isdir(os.path.join(args.out, name)):  # an earlier export's folder (InstructBLIP's qformer_tokenizer)
            shutil.rmtree(os.path.join(args.out, name))
        os.replace(os.path.join(tmp, name), os.path.join(args.out, name))
    os.rmdir(tmp)
    log(f"wrote {args.out}")
dist.barrier()
dist.destroy_process_group()
