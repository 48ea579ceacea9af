"""Fine-tunes a multimodal LLM against modality interference (arXiv 2505.19616, eq. 10):
    L = L_sft + L_adv + lambda_cons * L_cons
over image-heavy, text-heavy (each with a heuristically perturbed twin) and VQA samples, where L_adv is the loss
of adversarial copies made by masked PGD on the task-irrelevant modality's input embeddings (eq. 7) and L_cons
compares the answer distributions of each original and its perturbed rows (eq. 9). One process, or FSDP2 under
torchrun; every default is a flag (docs/training.md explains them), and --preset sets a few.
  python train.py --model out/toy/base --data data/toy/train.jsonl --preset ours --out out/toy/ours
  python train.py --paper-defaults qwen2.5-vl-7b --data data/caltech101 data/mmlu ... --out out/qwen7b-paper
  torchrun --nproc_per_node 4 train.py --model llava-1.5-7b --data data/caltech101 data/mmlu ... --out out/7b
"""
import argparse
import json
import math
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

import checkpoint
import checks
import dataloader
import losses
import model as M
import prompts as P
from paper import PAPER, applied, epilog
from profiling import Profile, progress

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


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown; the description and the table of --paper-defaults as written."""


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Formatter, epilog=epilog())
    arg = p.add_argument
    arg("--preset", choices=list(PRESETS), default="ours")
    arg("--paper-defaults", choices=list(PAPER), metavar="MODEL", help="the authors' settings for MODEL (below)")
    # I/O
    arg("--model", default="llava-1.5-7b", help="alias, hub id or local folder")
    arg("--data", nargs="+", default=["data/toy/train.jsonl"], help="JSONL files or folders with train.jsonl")
    arg("--out", default="out/train", help="the exported model, checkpoints and metrics.jsonl")
    arg("--save-every", type=int, default=500, help="steps between resumable checkpoints (0: none)")
    arg("--export", action=argparse.BooleanOptionalAction, default=True, help="write the model to --out at the end")
    arg("--keep-checkpoints", type=int, default=2, help="checkpoints kept (more than one: the newest may be damaged)")
    arg("--resume", action="store_true", help="continue from the newest intact checkpoint in --out")
    arg("--overwrite", action="store_true", help="let a fresh run replace the earlier run in --out")
    # data
    arg("--ratio-image", type=float, default=0.25, help="share of image-heavy originals per batch")
    arg("--ratio-text", type=float, default=0.25, help="share of text-heavy originals; VQA takes the rest")
    arg("--aug", action=argparse.BooleanOptionalAction, default=True, help="add perturbed twins of originals")
    arg("--twins", choices=["one", "all"], default="one", help="one twin per original, or one of each (the authors')")
    arg("--k-facts", type=int, default=10, help="unrelated facts prepended by UF")
    arg("--facts-file", help="UF's facts, one a line (default: the train pool of data/unrelated_facts.txt)")
    arg("--facts-replacement", action="store_true", help="draw UF's facts with replacement (the authors')")
    arg("--ri-folder", help="real images for RI twins, instead of the data's image-heavy images")
    arg("--canvas-size", type=int, help="side of FB/FW canvases and random pixels (default: the model's input size)")
    arg("--max-length", type=int, default=2048, help="a longer sample is an error, never truncated")
    arg("--prompt", choices=P.STYLES, default="ours", help="prompt and answer style (prompts.PROMPTS)")
    # method
    arg("--cons", choices=["none", *losses.CONSISTENCY], default="js", help="consistency loss (eq. 9: kl)")
    arg("--lambda-cons", type=float, default=0.01)
    arg("--tau", type=float, default=1.0)
    arg("--adv", choices=["none", "pgd", "rg"], default="pgd", help="adversarial term: PGD or random Gaussian")
    arg("--eps", type=float, help="PGD L-inf radius (default 1e-3; 1e-4 for 13B models)")
    arg("--alpha", type=float, default=0.1, help="PGD step size (eq. 7)")
    arg("--pgd-steps", type=int, default=2)
    arg("--pgd-step", choices=list(losses.STEPS), default="raw", help="eq. 7's raw gradient, its sign, or L2-normalised")
    arg("--pgd-sign", dest="pgd_step", action="store_const", const="sign", help="--pgd-step sign")
    arg("--eps-scale", choices=["none", "std"], default="none", help="std: eps x each row's embedding std")
    arg("--pgd-scope", choices=["sample", "template"], default="sample",
        help="PGD on an image-heavy row's own text, or on all its non-answer text (the authors')")
    arg("--shortcuts", choices=["on", "off"], default="on", help="exact shortcuts (shortcuts.py): same numbers")
    arg("--sigma", type=float, default=0.05, help="std of the RG noise")
    # optimisation
    arg("--lr", type=float, default=2e-5)
    arg("--min-lr", type=float, default=0.0)
    arg("--warmup", type=float, default=0.03, help="share of steps with linear warm-up, then cosine")
    arg("--epochs", type=float, default=1.0)
    arg("--epoch-end", choices=["smallest", "largest"], default="smallest", help="an epoch ends when the first pool "
        "runs out (the authors') or the last")
    arg("--max-steps", type=int, help="overrides --epochs")
    arg("--batch-size", type=int, default=8, help="originals per GPU per micro-step (twins come on top)")
    arg("--grad-accum", type=int, default=1)
    arg("--weight-decay", type=float, default=1e-4)
    arg("--adam-eps", type=float, default=1e-6)
    arg("--grad-clip", type=float, default=1.0)
    # LoRA: low-rank adapters on the LLM instead of its full weights; the projector is trained in full
    arg("--lora", type=int, default=0, metavar="R", help="rank of the adapters (0: full fine-tuning)")
    arg("--lora-alpha", type=float, help="adapter scale alpha / R (default alpha 2R)")
    arg("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input")
    arg("--lora-targets", nargs="+", default=list(M.LORA_TARGETS), help="the LLM's projections that get adapters")
    arg("--merge", action="store_true", help="export base + adapters merged, the adapter to --out/adapter")
    # system
    arg("--dtype", choices=["float32", "bfloat16"], help="compute dtype (default: bf16 on GPU)")
    arg("--cpu-offload", choices=["auto", "on", "off"], default="auto", help="auto: on for GPU and > 3B params")
    arg("--activation-checkpointing", action=argparse.BooleanOptionalAction, help="default: on for GPU")
    arg("--seed", type=int, default=2024)
    arg("--max-bad-steps", type=int, default=10, help="stop after this many non-finite losses in a row")
    arg("--profile", action="store_true", help="time each phase of a step, in metrics.jsonl")
    arg("--workers", type=int, help="processes making the next batches (default: 2 on GPU, 0 on CPU)")
    arg("--freeze-vision", action=argparse.BooleanOptionalAction, default=True, help="keep the vision encoder fixed")
    known = p.parse_known_args(argv)[0]
    p.set_defaults(**PAPER.get(known.paper_defaults, {}))
    p.set_defaults(**PRESETS[known.preset])  # after: a preset's own flags (fft-vqa's ratios) define its ablation row
    args = p.parse_args(argv)
    args.eps = (1e-4 if "13b" in args.model.lower() else 1e-3) if args.eps is None else args.eps
    args.lora_alpha = 2 * args.lora if args.lora_alpha is None else args.lora_alpha
    return args


# ---- distributed setup: torchrun's environment decides ---------------------------------------------------
def setup():
    """(device, rank, world) of this process, its process group started."""
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
    return device, dist.get_rank(), dist.get_world_size()


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def all_sum(t):  # summed over the ranks, in place (all_reduce returns None)
    return dist.all_reduce(t) or t


# ---- the model: frozen vision encoder, FSDP2 per layer, then the root -------------------------------------
class Step(torch.nn.Module):
    """step(batch): embeddings; step(batch, embeds): logits; step(batch, embeds, stop=P): the first P positions' keys
    and values. One root forward for each, so FSDP2 gathers the root's weights (embeddings, projector, head)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.keys = model, M.FAMILIES[M.family(model)]["lm_keys"]  # keys: what a pass on embeds reads

    def forward(self, batch, embeds=None, keep=None, past=None, stop=None, grad=False):
        if embeds is None:
            return M.embed(self.model, batch)
        if stop is not None:
            return M.prefix(self.model, embeds, batch, stop, grad)
        return M.logits(self.model, embeds, batch, keep, past)


def build(args, device, dtype, master):
    """(hf_model, peft_model or None, processor, step_model, offload): the model to train, sharded. Only rank 0
    reads the weights; the others build the architecture on the meta device and receive their shards from it, so
    host memory holds one full copy of the model, not one per rank."""
    hf_model, processor = M.load(args.model, dtype=torch.float32, meta=not master)
    if args.freeze_vision:
        M.freeze(hf_model)
    peft_model = M.add_lora(hf_model, args.model, args.lora, args.lora_alpha, args.lora_dropout, args.lora_targets,
                            dtype) if args.lora else None
    if args.activation_checkpointing or (args.activation_checkpointing is None and device.type == "cuda"):
        hf_model.activation_checkpointing_enable({"use_reentrant": False})
    M.train_mode(hf_model) if args.freeze_vision else hf_model.train()

    step_model = Step(hf_model)
    n_params = sum(q.numel() for q in hf_model.parameters())
    offload = args.cpu_offload == "on" or (args.cpu_offload == "auto" and device.type == "cuda" and n_params > 3e9)
    policy = dict(mesh=init_device_mesh(device.type, (world_size(),)),
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
    set_model_state_dict(step_model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return hf_model, peft_model, processor, step_model, offload


# ---- the objective (eq. 10) -------------------------------------------------------------------------------
def consistency_pairs(batch, adv):
    """The (original, other) row pairs L_cons compares, numbered as rows of the final pass [clean; adversarial]."""
    copy = {r: len(batch["labels"]) + j for j, r in enumerate(adv)}  # a clean row -> the row of its adversarial copy
    twins = {}
    for original, twin in batch["pairs"]:
        twins.setdefault(original, []).append(twin)
    pairs = []
    for original, its_twins in twins.items():
        pairs += [(original, twin) for twin in its_twins]  # against each heuristic twin
        if original in copy:
            pairs.append((original, copy[original]))  # against its own adversarial copy (once, however many twins)
        pairs += [(original, copy[twin]) for twin in its_twins if twin in copy]  # and each twin's adversarial copy
    return pairs


def perturbable(batch, image_mask, scope):
    """losses.modality_mask of the batch: an image-heavy row's text (under --pgd-scope sample only the sample's
    own), a text-heavy row's image tokens, nothing of a VQA row's; never an answer token."""
    return losses.modality_mask(batch["tasks"], image_mask, batch["labels"], batch["attention_mask"],
                                batch["sample_mask"] if scope == "sample" else None)


def adversarial_rows(mask, adv):
    """The rows to perturb (none without --adv): their adversarial copies follow the clean rows, in this order."""
    return [r for r in range(len(mask)) if mask[r].any()] if adv != "none" else []


def attack_rows(adv, args, device):
    """The rows PGD (or RG) perturbs: `adv`. Every rank must run as many passes, or FSDP's collectives wait forever:
    a rank with none while another has some attacks its first row under an empty mask (delta stays 0)."""
    if args.adv == "none" or world_size() == 1:
        return adv
    anyone = all_sum(torch.tensor([float(len(adv))], device=device)).item()  # a collective: every rank calls it
    return adv or [0] * (anyone > 0)


def token_counts(batch, image_token_id, args):
    """Answer tokens entering L_sft, L_adv and L_cons: each term is a sum divided by its count over the global
    batch (all ranks and micro-steps), so how the batch is split changes nothing."""
    labels = batch["labels"]
    answers = (labels[:, 1:] != losses.IGNORE).sum(1)
    adv = adversarial_rows(perturbable(batch, batch["input_ids"] == image_token_id, args.pgd_scope), args.adv)
    cons = 0
    if args.cons != "none":  # a pair compares the answer tokens both rows have (the same answer: all of them)
        source = list(range(len(labels))) + adv  # the clean row each row of the final pass is
        cons = sum(int(min(answers[o], answers[source[q]])) for o, q in consistency_pairs(batch, adv))
    return torch.tensor([float(answers.sum()), float(answers[adv].sum()), float(cons)])


def losses_of(batch, logits, targets, adv, totals, args, prof):
    """L_sft, L_adv and L_cons (eq. 9 over consistency_pairs) from the final pass's logits [clean; adversarial]."""
    n = len(batch["labels"])
    sft = losses.sft_loss(logits[:n], targets[:n], "sum", shift=False) / totals[0].clamp(min=1)
    adv_sum = losses.sft_loss(logits[n:], targets[n:], "sum", shift=False) if adv else logits.sum() * 0
    adv_loss = adv_sum / totals[1].clamp(min=1)
    if adv:  # what the attack did, in metrics.jsonl: the adversarial rows' loss over the same rows' clean loss
        prof.note("adv_over_clean", adv_sum / losses.sft_loss(logits[adv].detach(), targets[adv], "sum", shift=False))
    cons = logits.sum() * 0
    if args.cons != "none" and batch["pairs"]:
        answer, answer_mask = losses.answer_logits(logits, targets, shift=False)
        o, q = map(list, zip(*consistency_pairs(batch, adv)))
        cons = losses.consistency(answer[o], answer[q], args.cons, args.tau, answer_mask[o] & answer_mask[q],
                                  "sum") / totals[2].clamp(min=1)
    prof.lap("forward")
    return sft, adv_loss, cons


def loss_parts(step_model, batch, step, totals, args, prof):
    """L_sft, L_adv and L_cons of one micro-batch, each a sum over its rows divided by its global count (totals).
    The plain reference path; shortcuts.loss_parts computes the same numbers with less work."""
    keys = step_model.keys
    embeds, image_mask = step_model(batch)  # embed once: inputs_embeds with the projected image features merged
    prof.lap("embed")
    n, keep = len(batch["labels"]), losses.answer_positions(batch["labels"])
    targets = batch["labels"][:, keep + 1]  # aligned with the kept logits
    mask = perturbable(batch, image_mask, args.pgd_scope)  # the task-irrelevant modality of each row
    adv = adversarial_rows(mask, args.adv)
    attack = attack_rows(adv, args, embeds.device)
    delta = {}
    if attack:
        sub, base = M.rows_of(batch, attack, keys), embeds[attack].detach()
        noise = dataloader.noise_like(base, [batch["ids"][r] for r in attack], args.seed, step, args.adv)
        prof.lap("noise")
        if args.adv == "pgd":  # eq. (7) on the masked positions; gradients w.r.t. delta only, not the weights
            calls = iter(range(1, args.pgd_steps + 1))

            def attacked(d):
                """L_adv of the attacked rows under delta d, normalised as L_adv is (the global batch mean)."""
                i = next(calls)
                if i > 1:
                    prof.lap(f"pgd{i - 1}")  # the previous step's forward and backward w.r.t. delta
                keep_ = losses.answer_positions(sub["labels"])
                out = step_model(sub, base + d, keep_)
                return losses.sft_loss(out, sub["labels"][:, keep_ + 1], "sum", shift=False) / totals[1]

            eps = losses.radius(base, mask[attack], args.eps, args.eps_scale)
            d = losses.pgd(attacked, base, mask[attack], eps, args.alpha, args.pgd_steps, args.pgd_step, noise=noise,
                           stats=prof.notes)
            prof.lap(f"pgd{args.pgd_steps}")
        else:  # RG: random Gaussian noise on the same positions, the paper's baseline for PGD
            d = losses.gaussian_noise(base, mask[attack], args.sigma, noise=noise)
        delta = dict(zip(attack, d))
    rows = list(range(n)) + adv  # one pass over [clean; adversarial]; the copies keep the graph (L_adv trains it all)
    embeds = torch.cat([embeds, *((embeds[r] + delta[r])[None] for r in adv)])
    logits = step_model(M.rows_of(batch, rows, keys), embeds, keep)
    return losses_of(batch, logits, torch.cat([targets, targets[adv]]), adv, totals, args, prof)


# ---- optimisation ------------------------------------------------------------------------------------
def adamw(args, trainable):  # no weight decay on biases and norms, as the Hugging Face Trainer does
    fused = all(q.device.type in ("cpu", "cuda") for _, q in trainable) or None  # else torch's default (performance.md)
    return torch.optim.AdamW([{"params": [q for _, q in trainable if q.ndim >= 2], "weight_decay": args.weight_decay},
                              {"params": [q for _, q in trainable if q.ndim < 2], "weight_decay": 0.0}],
                             lr=args.lr, eps=args.adam_eps, fused=fused)


def get_lr(args, step, max_steps):
    """Linear warm-up, then cosine to min_lr; a function of the step, so resuming needs no state."""
    warm = max(1, int(args.warmup * max_steps))
    if step < warm:
        return args.lr * (step + 1) / warm
    progress_ = (step - warm) / max(1, max_steps - warm)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * min(1.0, progress_)))


# ---- the run ----------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse(argv)
    facts, problem = checks.facts(args)
    problem = checks.flags(args) or problem
    problem = problem or checkpoint.hold(args.out) or checks.out_folder(args) or checks.model_name(args)
    if problem:  # (hold: rank 0 holds --out, OUT/.lock, until the run ends; a second run into it is refused)
        sys.exit(checkpoint.release(args.out) or problem)

    device, rank, world = setup()
    master = rank == 0
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.manual_seed(args.seed)  # the same initial state everywhere; per-sample noise is seeded by sample id

    log = (lambda *a: print(*a, flush=True)) if master else (lambda *a: None)  # rank 0 speaks for all
    paths, samples, file_of = dataloader.read(args)  # bad files fail here, before any model is loaded
    schedule = dataloader.Schedule(args, samples, world, paths)
    ri_images, max_steps = dataloader.ri_images(args, samples, schedule), schedule.max_steps
    log(f"{len(samples)} samples from {len(paths)} files; {schedule.summary(args)}; {max_steps} steps "
        f"({schedule.steps_per_epoch}/epoch, --epoch-end {args.epoch_end})")

    def agreed(decide):  # rank 0 decides (reading the files once), every rank acts on it
        answer = [decide() if master else None]
        dist.broadcast_object_list(answer, 0)
        return answer[0]

    problem = agreed(lambda: checks.lengths(args, schedule.pools, facts, ri_images, dataloader.TWINS, file_of)
                     if max_steps > 0 else None)
    inputs = checkpoint.inputs(args, paths, world) if master else {}  # what a resume must find unchanged, too
    resume_from, problem = (None, problem) if problem or not args.resume else \
        agreed(lambda: checkpoint.resume_point(args, inputs))
    if problem:
        sys.exit(checkpoint.release(args.out) or problem if master else 1)  # once, not once per rank

    hf_model, peft_model, processor, step_model, offload = build(args, device, dtype, master)
    size = args.canvas_size or P.image_size(processor)  # canvases and random pixels: the encoder's input size
    trainable = [(n, q) for n, q in step_model.named_parameters() if q.requires_grad]
    optimizer = adamw(args, trainable)
    log(f"{sum(q.numel() for q in hf_model.parameters()) / 1e6:.1f}M parameters, "
        f"{sum(q.numel() for _, q in trainable) / 1e6:.1f}M trained; FSDP2 over {world} rank{'s' if world > 1 else ''} "
        f"on {device}, {dtype}{', CPU offload' if offload else ''}; preset {args.preset}{applied(args)}"
        + (f"; LoRA r {args.lora}, alpha {args.lora_alpha:g} on {' '.join(args.lora_targets)}" if args.lora else ""))
    batches = dataloader.Batches(args, schedule, processor, size, facts, ri_images, rank, world)
    start = 0
    if resume_from:
        start = checkpoint.load(resume_from, step_model, optimizer)
        log(f"resumed from {resume_from} at step {start}")
    metrics_path = checkpoint.start(args, start) if master else None

    # ---- the loop -------------------------------------------------------------------------------------------
    import shortcuts  # (here: it imports this file) the same numbers as loss_parts, with less work
    parts_of = shortcuts.loss_parts if args.shortcuts == "on" and args.pgd_scope == "sample" else loss_parts
    prof = Profile(args.profile, device)
    # A step's batches depend on (seed, step) and the data alone, so --workers processes make the next ones while a step
    # trains: forked as DataLoader's are on Linux (Batches touches neither CUDA nor the model), their own generator.
    workers = args.workers if args.workers is not None else 2 * (device.type == "cuda")
    data = iter(torch.utils.data.DataLoader(range(start, max_steps), batch_size=None, collate_fn=batches,
                                            num_workers=workers, multiprocessing_context="fork" if workers else None,
                                            generator=torch.Generator()))
    bad, t0, tokens_seen = 0, time.time(), 0  # tokens: every rank's, real (not padding)
    for step in range(start, max_steps):
        prof.new_step()
        lr = get_lr(args, step, max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = next(data)  # --profile's "data": the time this step waited for them, moved them and counted tokens
        if isinstance(micro, str):
            sys.exit(micro)
        micro = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()} for b in micro]
        totals = all_sum(sum(token_counts(b, hf_model.config.image_token_id, args) for b in micro).to(device))
        prof.lap("data")
        parts = torch.zeros(4, device=device)  # sft, adv, cons, tokens
        for batch in micro:
            sft, adv_loss, cons = parts_of(step_model, batch, step, totals, args, prof)
            loss = (sft + adv_loss + args.lambda_cons * cons) * world  # FSDP averages gradients over ranks
            finite = all_sum(torch.tensor([float(torch.isfinite(loss))], device=device)).item() == world
            if not finite:  # every rank must agree, or the collectives of backward would hang
                break
            loss.backward()
            prof.lap("backward")
            parts += torch.stack([sft, adv_loss, cons, batch["attention_mask"].sum().float()]).detach()
        bad = 0 if finite else bad + 1
        if bad:
            optimizer.zero_grad(set_to_none=True)
            log(f"\nwarning: step {step}: non-finite loss, step skipped ({bad} in a row)")
            if bad >= args.max_bad_steps:
                sys.exit(f"stopping: {bad} non-finite losses in a row (lower --lr, check the data)")
            continue
        grad_norm = torch.nn.utils.clip_grad_norm_([q for _, q in trainable], args.grad_clip)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        prof.lap("optimizer")
        sft, adv_loss, cons, tokens = all_sum(parts).tolist()
        tokens_seen += tokens
        total = sft + adv_loss + args.lambda_cons * cons
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps({"step": step, "lr": lr, "loss": total, "sft": sft, "adv": adv_loss, "cons": cons,
                                    "grad_norm": grad_norm, "time": time.time() - t0, "tokens": int(tokens),
                                    **prof.record()}) + "\n")
            progress(step + 1 - start, max_steps - start, t0, "steps",
                     f"| loss {total:.4f} (sft {sft:.4f} adv {adv_loss:.4f} cons {cons:.4f}) | "
                     f"{tokens_seen / (time.time() - t0):.0f} tok/s")
        if args.save_every and ((step + 1) % args.save_every == 0 or step + 1 == max_steps):
            checkpoint.save(args, step + 1, step_model, optimizer, inputs)
    del data  # its workers end here, not with the process

    # ---- export: a Hugging Face folder that plain transformers loads (a LoRA run: its adapter) ---------------
    full = checkpoint.export(args, step_model, hf_model, peft_model, processor) if args.export else {}
    log(f"wrote {args.out}") if args.export else None
    dist.barrier()
    checkpoint.release(args.out)
    dist.destroy_process_group()
    return dict(args=args, batches=batches, hf_model=hf_model, step_model=step_model, trainable=trainable,
                optimizer=optimizer, full=full, schedule=schedule)


if __name__ == "__main__":
    main()
