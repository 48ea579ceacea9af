"""What the method costs. Runs train.py itself (--profile) for each preset on the same batches of a
random-weight LLaVA and prints seconds per step, samples/s, tokens/s, peak memory, the ratio to fft-aug
next to its compute floor, and where the time goes; then the memory plan of the real 7B and 13B
architectures per rank, sharded on the meta device exactly as train.py shards them. No download.
  python bench.py                  # CPU: a 23M-parameter LLaVA with 576 image tokens a row, about 11 minutes
  python bench.py --arch llava-1.5-7b --presets fft-aug ours --cpu-offload on    # a GPU, real shapes
  python bench.py --plan-only --world 4 8 --rows 20 --length 700 --plan-lora 16    # memory plan only
  python bench.py --eval           # evaluate.py's throughput with its shortcuts on and off
  python bench.py --hook --steps 2   # experimental: today's PGD path against a hook on the first decoder layer
  python bench.py --optimizer      # the AdamW step alone, fused against the loop, and the offloaded 7B/13B update
"""
import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

import torch

import model as M
import prompts as P
from model import make_tiny
from tiny import make_parts

HERE = os.path.dirname(os.path.abspath(__file__))
# LLaVA-architecture shapes. The 7B/13B rows are the published llava-1.5-{7,13}b-hf configs (CLIP
# ViT-L/14 at 336 px, Vicuna); "cpu" is small enough for a laptop yet dominated by its matrix products.
ARCHS = {
    "tiny": dict(hidden=64, layers=2, heads=4, vision_hidden=32, vision_layers=2),
    "cpu": dict(hidden=512, layers=6, heads=8, intermediate=1376, vision_hidden=256, vision_layers=4,
                vision_heads=4, image=192, patch=8),  # LLaVA-1.5's 576 image tokens a sample (24 x 24 patches)
    "llava-1.5-7b": dict(hidden=4096, layers=32, heads=32, intermediate=11008, vocab=32064, vision_hidden=1024,
                         vision_layers=24, vision_heads=16, vision_intermediate=4096, image=336, patch=14),
    "llava-1.5-13b": dict(hidden=5120, layers=40, heads=40, intermediate=13824, vocab=32064, vision_hidden=1024,
                          vision_layers=24, vision_heads=16, vision_intermediate=4096, image=336, patch=14),
}


def phase_names(pgd_steps):
    """train.py --profile's phases in the order a step runs them."""
    return ["data", "embed", "noise", "prefix", *(f"pgd{t}" for t in range(1, pgd_steps + 1)), "forward", "backward",
            "optimizer"]


def floor(preset, pgd_steps, ratio_image=0.25, ratio_text=0.25, twins="one", share=1.0, final=False):
    """Work of one LLM step relative to fft-aug's (one twin), counted in row passes: a forward is 1, a backward
    with parameter gradients 2, a backward w.r.t. the input only (PGD's, gradients w.r.t. delta) 1.
    Image- and text-heavy originals get a twin, or with twins="all" one of each of their task's training
    interventions (dataloader.TWINS: UF, MD; RI, FB, FW); they and their twins are the rows PGD/RG perturb.
    share: the part of the attacked rows' positions PGD's passes run over (train.py --shortcuts: image-heavy
    rows from their first perturbed position on, after one forward over the rest); 1 runs them whole.
    final: the adversarial copies run over that part too, on the clean pass's prefix, which also serves PGD
    (train.py without activation checkpointing); else PGD computes the prefix alone and the copies run whole."""
    heavy = ratio_image + ratio_text
    base = 3 * (1 + heavy)  # fft-aug: the originals and a twin per heavy one, forward and backward
    if preset == "fft-vqa":
        return 3 * 1 / base
    twin_rows = heavy if twins == "one" else 2 * ratio_image + 3 * ratio_text
    rows, adv = 1 + twin_rows, heavy + twin_rows
    work = 3 * rows
    if preset in ("rg", "pgd", "ours"):
        work += 3 * adv * (share if final else 1) + (2 * pgd_steps * adv * share if preset != "rg" else 0)
        work += adv * (1 - share) * (preset != "rg" and not final)  # PGD's own forward over the prefix
    return work / base


def run_preset(name, preset, extra, folder, data, out, steps, batch):
    """One train.py process; returns its metrics lines (the first `--warmup` are dropped by the caller)."""
    run_out = os.path.join(out, "runs", name)  # a fresh run there rewrites its metrics.jsonl
    cmd = [sys.executable, os.path.join(HERE, "train.py"), "--model", folder, "--data", data, "--out", run_out,
           "--preset", preset, "--max-steps", str(steps), "--batch-size", str(batch), "--seed", "0",
           "--profile", "--save-every", "0", "--no-export", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    with open(os.path.join(run_out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def summarize(lines, warmup, batch, names):
    """Mean seconds per step (between consecutive metrics lines), originals and real tokens per second."""
    kept = lines[warmup:]
    times = [b["time"] - a["time"] for a, b in zip(lines[warmup - 1:], kept)] if warmup else [kept[0]["time"]]
    step = statistics.mean(times)
    phases = {k: statistics.mean(m["phases"].get(k, 0.0) for m in kept) for k in names}
    covered, whole = (sum(m["shortcut"][k] for m in kept) for k in ("covered", "whole"))
    return dict(step=step, samples=batch / step, tokens=statistics.mean(m["tokens"] for m in kept) / step,
                peak=max(m["peak_mem"] for m in kept), phases=phases, share=covered / whole if whole else 1.0,
                final=any(m["shortcut"]["final"] for m in kept))


def prepare(args):
    """The toy data's train.jsonl and a random-weight LLaVA of args.arch, built once under args.out."""
    arch = args.arch
    folder = os.path.join(args.out, arch)
    data = os.path.join(args.out, "data")
    if not os.path.exists(os.path.join(data, "train.jsonl")):
        subprocess.run([sys.executable, os.path.join(HERE, "data", "toy", "prepare.py"), "--out", data,
                        "--n-train", "200", "--n-test", "10"], check=True, stdout=subprocess.DEVNULL)
    if not os.path.exists(os.path.join(folder, "config.json")):
        print(f"building a random-weight {arch} LLaVA in {folder}", flush=True)
        words = open(os.path.join(data, "vocab.txt"), encoding="utf-8").read().split()
        make_tiny("llava", folder, words, seed=0, dtype=None if arch in ("tiny", "cpu") else torch.bfloat16,
                  **ARCHS[arch])
    return folder, os.path.join(data, "train.jsonl")


def speed(args):
    arch = args.arch
    folder, data = prepare(args)
    runs = [(p, p, [], {}) for p in args.presets]  # (row, preset, train.py flags, floor's arguments)
    if "ours" in args.presets:  # the price of each extra PGD step, and of training on every twin
        runs += [(f"ours T={t}", "ours", ["--pgd-steps", str(t)], dict(pgd_steps=t)) for t in args.extra_pgd_steps]
        runs += [("ours twins=all", "ours", ["--twins", "all"], dict(twins="all"))] * args.twins_all
        runs += [("ours shortcuts=off", "ours", ["--shortcuts", "off"], {})]  # whole rows in every PGD pass
        runs += [("ours --lora 16", "ours", ["--lora", "16"], None)]  # no floor: its backward skips most weights
    results, t0 = {}, time.time()
    names = phase_names(max([2, *args.extra_pgd_steps]))
    for i, (name, preset, extra, cost) in enumerate(runs):
        print(f"[{time.time() - t0:4.0f}s] {name} ({i + 1}/{len(runs)}): {args.warmup} warm-up + {args.steps} "
              f"timed steps", flush=True)
        lines = run_preset(name.replace(" ", "").replace("=", ""), preset, extra + args.train_args, folder,
                           data, args.out, args.warmup + args.steps, args.batch_size)
        results[name] = summarize(lines, args.warmup, args.batch_size, names)
        results[name]["floor"] = cost is not None and floor(preset, **{"pgd_steps": 2, **cost, "share": results[name][
            "share"], "final": results[name]["final"]})
    base = results.get("fft-aug", next(iter(results.values())))["step"]
    used = [k for k in names if any(r["phases"][k] > 0 for r in results.values())]
    cores = len(os.sched_getaffinity(0))
    device = "GPU " + torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({cores} cores)"
    memory = "peak GPU memory" if torch.cuda.is_available() else "peak RSS"
    print(f"\n{arch} LLaVA, random weights, {device}, batch {args.batch_size} originals (+ twins), "
          f"mean of {args.steps} steps after {args.warmup} warm-up; phases in ms\n")
    lines = [f"| preset | s/step | samples/s | tokens/s | {memory} | x fft-aug | floor | PGD share | "
             + " | ".join(used) + " |", "|---" * (8 + len(used)) + "|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['step']:.3f} | {r['samples']:.1f} | {r['tokens']:.0f} | "
                     f"{r['peak'] / 2**30:.2f} GiB | {r['step'] / base:.2f} | {'-' if r['floor'] is False else format(r['floor'], '.2f')} | {r['share']:.2f} | "
                     + " | ".join(f"{1000 * r['phases'][k]:.0f}" for k in used) + " |")
    table = "\n".join(lines)
    print(table)
    if "ours" in results and all(f"ours T={t}" in results for t in (1, 3)):
        extra_step = (results["ours T=3"]["step"] - results["ours T=1"]["step"]) / 2 / base
        share, final = results["ours"]["share"], results["ours"]["final"]
        step_floor = floor("ours", 3, share=share, final=final) - floor("ours", 2, share=share, final=final)
        print(f"\neach extra PGD step: {extra_step:.2f}x fft-aug (floor {step_floor:.2f}x; "
              f"{floor('ours', 3) - floor('ours', 2):.2f}x over whole rows)")
        low = [floor("ours", t, share=0.5, final=True) for t in (2, 3)]  # image-heavy rows free: text-heavy's half
        print(f"what no shortcut removes: text-heavy rows perturb their image, which follows only the template's "
              f"head, so their PGD passes and adversarial copies run whole; with image-heavy rows at no cost the "
              f"floor would still be {low[0]:.2f}x at T=2 and {low[1] - low[0]:.2f}x a PGD step")
    with open(os.path.join(args.out, f"speed-{arch}.json"), "w") as f:
        json.dump(results, f, indent=1)
    return results


# ---- experimental (issue 17): PGD through a hook on the language model's first decoder layer --------------
# Today train.py embeds once (M.embed: vision tower, projector, masked_scatter) and runs the PGD passes and the
# final [clean; adversarial] pass on inputs_embeds (M.logits, with each family's lm_keys). The alternative below
# runs the whole model in every pass and adds delta to the hidden states entering the first decoder layer,
# which are the merged input embeddings in every family here: InstructBLIP's query outputs also go where its
# image tokens are in input_ids (transformers 5 writes num_query_tokens of them), so delta's positions are
# input_ids' in all three. It is measured here, not used: see `python bench.py --hook` and test_hook.py.

@contextlib.contextmanager
def perturbed(model, delta):
    """Inside: the language model's first decoder layer receives hidden_states + delta, (B, L, D). A backward after
    the hook is gone is still right under activation checkpointing: transformers 5 checkpoints a layer's forward,
    not its __call__, so the recompute starts from the hooked input (test_hook.py)."""
    def add(layer, args, kwargs):
        if args:  # transformers calls decoder layers with hidden_states first, positionally
            return (args[0] + delta.to(args[0].dtype), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + delta.to(kwargs["hidden_states"].dtype)}

    handle = model.get_decoder().layers[0].register_forward_pre_hook(add, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def hook_logits(model, batch, delta, keep=None):
    """The model's own forward (vision tower, its own positions) on input embeddings + delta: M.logits(model,
    M.embed(model, batch)[0] + delta, batch, keep) without per-family code."""
    with perturbed(model, delta):
        return model(**M.model_inputs(batch), logits_to_keep=0 if keep is None else keep).logits


def forward_flops(layers, hidden, intermediate, tokens, mlp_matrices):
    """Multiply-adds x 2 of one forward of a transformer stack: projections and MLP per token, attention's
    two (tokens x tokens x hidden) products per layer."""
    return layers * (2 * tokens * (4 * hidden ** 2 + mlp_matrices * hidden * intermediate) + 4 * tokens ** 2 * hidden)


def vision_share(arch, length):
    """The vision tower's (+ projector's) FLOP share of one LLaVA forward of `length` tokens."""
    d = {"intermediate": 2 * ARCHS[arch]["hidden"], "image": 32, "patch": 8, **ARCHS[arch]}  # make_parts' defaults
    patches = (d["image"] // d["patch"]) ** 2
    vision = forward_flops(d["vision_layers"], d["vision_hidden"], d.get("vision_intermediate", 2 * d["vision_hidden"]),
                           patches + 1, 2)  # CLIP: the class token too, a 2-matrix MLP, every layer run
    vision += 2 * patches * (d["vision_hidden"] * d["hidden"] + d["hidden"] ** 2)  # the 2-layer projector
    llm = forward_flops(d["layers"], d["hidden"], d["intermediate"], length, 3)  # LLaMA's gated MLP
    return vision / (vision + llm), vision, llm


def hook_batch(data, processor, batch_size):
    """batch_size originals at the paper's mix (1/4 image-heavy, 1/4 text-heavy, 1/2 VQA), each heavy one
    with a twin (MD, FB), as ours' micro-batch, with the ids and pairs train.loss_parts reads."""
    import random

    import perturb
    samples = perturb.load_samples(data)
    by_task = {t: [s for s in samples if s["task"] == t] for t in ("image_heavy", "text_heavy", "vqa")}
    q = max(batch_size // 4, 1)
    rows = by_task["image_heavy"][:q] + by_task["text_heavy"][:q] + by_task["vqa"][:batch_size - 2 * q]
    rng = random.Random(0)
    twins = [perturb.perturb(s, "md", rng, pool="train") for s in by_task["image_heavy"][:q]]
    twins += [perturb.perturb(s, "fb", rng) for s in by_task["text_heavy"][:q]]
    batch = P.collate(processor, rows + twins)
    batch["ids"] = [s["id"] for s in rows] + [f"{s['id']}/{s['intervention']}" for s in twins]
    batch["pairs"] = [(i, len(rows) + i) for i in range(2 * q)]
    return batch


class HookStep(torch.nn.Module):
    """train.Step on the hook path, a drop-in for train.loss_parts: the embeddings it hands out are zeros, so what
    loss_parts adds to them (delta) is all the hook adds, at the first decoder layer of the model's own forward
    (vision tower included in every pass, which is why its passes need the images: `keys`)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.keys = (*M.FAMILIES[M.family(model)]["lm_keys"], "pixel_values")

    def forward(self, batch, embeds=None, keep=None, past=None, stop=None, grad=False):
        if embeds is None:
            ids = batch["input_ids"]
            return (torch.zeros(*ids.shape, self.model.config.get_text_config().hidden_size),
                    ids == self.model.config.image_token_id)
        return hook_logits(self.model, batch, embeds, keep)


def ours_pass(step, batch, args, laps):
    """train.loss_parts (the plain path) of `ours` without L_cons (L_sft + L_adv, PGD) on train.Step or HookStep,
    and its backward; adds seconds per phase to laps and returns the loss."""
    import train
    from profiling import Profile
    prof = Profile(True, torch.device("cpu"))
    totals = train.token_counts(batch, step.model.config.image_token_id, args)
    sft, adv, _ = train.loss_parts(step, batch, 0, totals, args, prof)
    t = time.perf_counter()
    (sft + adv).backward()
    step.model.zero_grad(set_to_none=True)
    laps["backward"] += time.perf_counter() - t
    for k, v in prof.phases.items():  # PGD's steps and its noise together
        laps[k if k in ("embed", "forward") else "pgd"] += v
    return (sft + adv).item()


def hook_bench(args):
    """Today's PGD path against the hook's on one `ours` micro-batch, in this process (train.py has no hook)."""
    folder, data = prepare(args)
    import train
    model, processor = M.load(folder)
    M.train_mode(M.freeze(model))
    batch = hook_batch(data, processor, args.batch_size)
    pgd_steps, names = 2, ("embed", "pgd", "forward", "backward")  # the paper's T
    # ours without L_cons; PGD on every non-answer text position, which is what the hook path can address
    train_args = train.parse(["--cons", "none", "--pgd-scope", "template", "--pgd-steps", str(pgd_steps)])
    steps, paths = {"today": [], "hook": []}, {"today": train.Step(model), "hook": HookStep(model)}
    for _ in range(args.warmup + args.steps):  # alternating: a busy spell of the shared cores hits both paths
        for name in steps:
            steps[name].append(dict.fromkeys(names, 0.0))
            steps[name][-1]["loss"] = ours_pass(paths[name], batch, train_args, steps[name][-1])
    # each phase's least time over the timed steps: the noise of shared cores only adds
    rows = {name: {k: min(s[k] for s in kept[args.warmup:]) for k in names} for name, kept in steps.items()}

    def fastest(fn):
        times = []
        for _ in range(args.warmup + args.steps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    with torch.no_grad():  # the vision tower's (and projector's) share of one forward, measured at this shape
        embeds, _ = M.embed(model, batch)
        vision, llm = fastest(lambda: M.embed(model, batch)), fastest(lambda: M.logits(model, embeds, batch))
    tokens = round(batch["attention_mask"].sum(1).float().mean().item())
    print(f"\n{args.arch} LLaVA, CPU ({len(os.sched_getaffinity(0))} cores), one ours micro-batch: {args.batch_size} "
          f"originals + {len(batch['tasks']) - args.batch_size} twins, {batch['input_ids'].shape[1]} tokens a row "
          f"({tokens} real), T={pgd_steps}, no L_cons; each phase the fastest of {args.steps} steps (the paths "
          f"alternating) after {args.warmup} warm-up; ms\n")
    print("| path | embed | pgd (all steps) | forward [clean; adv] | backward | total | x today | L_sft + L_adv |")
    print("|---" * 8 + "|")
    for name, r in rows.items():
        total = sum(r.values())
        print(f"| {name} | " + " | ".join(f"{1000 * r[k]:.0f}" for k in names) + f" | {1000 * total:.0f} | "
              f"{total / sum(rows['today'].values()):.2f} | {steps[name][-1]['loss']:.6f} |")
    for name, kept in steps.items():
        print(f"{name}: seconds per timed step " + " ".join(f"{sum(s[k] for k in names):.2f}"
                                                          for s in kept[args.warmup:]))
    print(f"\nvision tower + projector (M.embed, fastest of {args.warmup + args.steps}), measured at this shape: "
          f"{vision / (vision + llm):.1%} of one forward ({1000 * vision:.0f} ms; the language model {1000 * llm:.0f} ms)"
          f"; its FLOP share: {vision_share(args.arch, tokens)[0]:.1%}")
    n_adv = sum(task != "vqa" for task in batch["tasks"])  # the rows PGD attacks
    print(f"the hook path's extra vision passes from that measured share ({pgd_steps + 1} passes x {n_adv} rows): "
          f"+{(pgd_steps + 1) * n_adv / len(batch['tasks']) * vision / sum(rows['today'].values()):.1%} of today's step")
    # ours' step in LLM row passes per original at the paper's mix (floor's units): 11.5 at T=2; the hook path adds
    # a vision forward for each of the 1 adversarial row per original (heavy originals and twins) in T + 1 passes
    ours = floor("ours", pgd_steps) * 3 * 1.5
    for arch in ("llava-1.5-7b", "llava-1.5-13b"):
        for length in (600, 700, 800):
            share, v, lm = vision_share(arch, length)
            print(f"{arch}, {length} tokens: vision tower + projector {v / 1e9:.0f} GFLOP, LLM {lm / 1e9:.0f} GFLOP "
                  f"per row forward: {share:.1%} of one forward; the hook path's extra vision passes "
                  f"+{(pgd_steps + 1) * v / lm / ours:.1%} of ours' step")
    return rows


# ---- memory plan: the real architecture on the meta device, sharded by FSDP2 as train.py does -------------

def plan(arch, world, rows, length, lora=0):
    """Per-rank bytes of train.py's layout for `world` ranks: fp32 sharded parameters, gradients and
    AdamW state (two fp32 moments) of the trained ones, the bf16 units FSDP2 gathers, and activations.
    lora=R: PEFT's rank-R adapters where train.py --lora puts them (model.lora_config: the language model's
    attention and MLP projections) and the projector trained, every other weight frozen
    and kept in bf16 (no fp32 copy, no gradient, no AdamW state)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore  # collectives that do nothing

    dims = ARCHS[arch]
    config, _ = make_parts("llava", (), **dims)
    with torch.device("meta"):  # shapes without storage: a 13B model costs nothing to build
        model = M.FAMILIES["llava"]["cls"](config)
    M.freeze(model)
    if lora:
        import peft
        targets = M.lora_config(model, lora, 2 * lora, 0.0).target_modules
        peft.inject_adapter_in_model(peft.LoraConfig(r=lora, target_modules=targets), model)
        projector = M.FAMILIES["llava"]["projector"] + "."
        for n, q in model.named_parameters():  # PEFT froze all but the adapters
            q.requires_grad = "lora_" in n or n.startswith(projector)

    def sizes(module):  # (parameters, trained parameters)
        ps = list(module.parameters())
        return sum(q.numel() for q in ps), sum(q.numel() for q in ps if q.requires_grad)

    units = [sizes(b) for b in M.blocks(model)]
    total, trained_total = sizes(model)
    units.append((total - sum(u[0] for u in units), trained_total - sum(u[1] for u in units)))  # the root
    frozen = 2 if lora else 4  # bytes per frozen parameter
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        policy = dict(mesh=init_device_mesh("cpu", (world,)),
                      mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
        for block in M.blocks(model):
            fully_shard(block, **policy)
        fully_shard(model, **policy)
        local = {n: q.to_local().numel() for n, q in model.named_parameters()}  # rank 0 holds the largest shard
        trained = sum(local[n] for n, q in model.named_parameters() if q.requires_grad)
        params = sum(local[n] * (4 if q.requires_grad else frozen) for n, q in model.named_parameters())
    finally:
        dist.destroy_process_group()
    h, L, inter = dims["hidden"], dims["layers"], dims["intermediate"]
    # activation checkpointing: each block's bf16 input is kept, and one block's internals are recomputed
    acts = 2 * rows * length * (L * h + 10 * h + 3 * inter)
    if lora:  # + each adapter's rank-R activation (train.py's --lora-dropout 0: PEFT keeps no dropped copy)
        acts += 2 * rows * length * 7 * lora
    out = dict(params=params, grads=4 * trained, adam=8 * trained, unit=2 * max(u[0] for u in units),
               activations=acts, total=total, trained=trained_total)
    # the unit computing and the one prefetched, bf16, plus the gradients of their trained parameters
    gathered = 2 * max(2 * n + 2 * t for n, t in units)
    out["gpu_offload"] = gathered + acts
    out["gpu"] = out["params"] + out["grads"] + out["adam"] + gathered + acts
    out["host_offload"] = out["params"] + out["grads"] + out["adam"]
    out["load"] = 4 * total  # rank 0 reads all in fp32 before handing out shards (under LoRA, then casts the frozen)
    return out


def plans(args):
    gib = 2**30
    lines = [f"memory plan per rank: fp32 shards + bf16 compute, vision tower frozen, activation checkpointing, "
             f"{args.rows} rows x {args.length} tokens per pass (the final pass of `ours` at batch 8)\n",
             "| model | trained | ranks | params | grads | AdamW | largest unit | activations | GPU, no offload | "
             "GPU, CPU offload | host RAM, offload | rank 0 load |", "|---" * 12 + "|"]
    for arch, lora, world in ((a, k, w) for a in args.plan for k in [0, *args.plan_lora] for w in args.world):
        r = plan(arch, world, args.rows, args.length, lora)
        trained = f"LoRA r={lora} ({r['trained'] / 1e6:.1f}M)" if lora else f"all ({r['trained'] / 1e9:.2f}B)"
        lines.append(f"| {arch} ({r['total'] / 1e9:.2f}B) | {trained} | {world} | " + " | ".join(
                f"{r[k] / gib:.1f} GiB" for k in ("params", "grads", "adam", "unit", "activations", "gpu",
                                                 "gpu_offload", "host_offload", "load")) + " |")
    print("\n".join(lines))
    print("\nGPU = shards + 2 gathered units (+ their gradients) + activations (an estimate: each block's input"
          "\nplus one block recomputed). Rank 0 also holds the full model while it hands out the shards.\n"
          "LoRA rows: adapters on every decoder layer's q,k,v,o,gate,up,down and the projector trained (fp32,\n"
          "gradients, AdamW), every other weight frozen in bf16; activations add the adapters' rank-R outputs.")


# ---- the optimizer step alone (issue 28): train.py's AdamW against the loop it replaced, and the offloaded update --
def optimizer_bench(args, steps=5):
    """Seconds per AdamW step over the trained parameters of a random-weight LLaVA (args.arch's shapes; a 7B or 13B
    --arch times the `cpu` one), fp32 FSDP2 shards on CPU as train.py holds them (DTensors, which is also where
    --cpu-offload keeps them): torch's default, a loop over tensors (train.py before issue 28), against
    train.adamw's choice, alternated step by step on the same parameters and gradients; and clip_grad_norm_, the
    rest of --profile's optimizer phase. Then parameters per second times each planned model's trained parameters:
    the offloaded update on this host. Under torchrun each rank updates its shards while the others update theirs
    (they share the host's cores, as ranks on one node do); rank 0 prints."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.testing._internal.distributed.fake_pg import FakeStore  # one process: no collective to wait for
    import train

    arch = args.arch if args.arch in ("tiny", "cpu") else "cpu"
    config, _ = make_parts("llava", (), **ARCHS[arch])
    torch.manual_seed(0)
    model = M.FAMILIES["llava"]["cls"](config)
    M.freeze(model)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        dist.init_process_group("gloo")
    else:
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=1)
    try:
        for block in [*M.blocks(model), model]:
            fully_shard(block, mesh=init_device_mesh("cpu", (world,)))
        trainable = [(n, q) for n, q in model.named_parameters() if q.requires_grad]
        params = [q for _, q in trainable]
        for q in params:
            q.grad = torch.zeros_like(q)  # a DTensor of q's shards
            q.grad.to_local().normal_(0, 1e-3)
        flags = train.parse(["--lr", "1e-6"])  # train.py's --weight-decay and --adam-eps; small steps
        chosen, loop = train.adamw(flags, trainable), train.adamw(flags, trainable)
        for group in loop.param_groups:
            group["fused"] = None
        name = "fused" if chosen.param_groups[0]["fused"] else "default"
        times = {"loop": [], name: [], "clip": []}
        for i in range(1 + steps):  # the first: state allocation, untimed
            for key, step in (("loop", loop.step), (name, chosen.step),
                              ("clip", lambda: float(torch.nn.utils.clip_grad_norm_(params, 1e9).full_tensor()))):
                dist.barrier()  # the ranks start each together
                t0 = time.perf_counter()
                step()
                times[key] += [time.perf_counter() - t0] * bool(i)
        rank = dist.get_rank()
    finally:
        dist.destroy_process_group()
    n = sum(q.to_local().numel() for q in params)  # this rank's
    r = {k: statistics.median(v) for k, v in times.items()} | dict(chosen=name, params=n, world=world,
                                                                   threads=torch.get_num_threads())
    if rank:
        return r
    cores, threads = len(os.sched_getaffinity(0)), f"{r['threads']} thread{'s' * (r['threads'] > 1)} a rank"
    print(f"AdamW step alone: the trained parameters of the {arch} LLaVA as fp32 FSDP2 shards on CPU, {n / 1e6:.1f}M "
          f"a rank, {world} rank{'s' * (world > 1)} ({cores} cores, {threads}); median of {steps} steps, alternated "
          f"on the same parameters\n")
    print("| step | ms | M params/s a rank | x loop |\n|---|---|---|---|")
    for key, label in (("loop", "AdamW loop (before issue 28)"), (name, f"AdamW {name} (train.py's)"),
                       ("clip", "clip_grad_norm_ (the rest of the optimizer phase)")):
        print(f"| {label} | {1000 * r[key]:.1f} | {n / r[key] / 1e6:.{0 if n / r[key] >= 1e7 else 2}f} | "
              f"{format(r['loop'] / r[key], '.2f') if key != 'clip' else '-'} |")
    if args.plan:
        print(f"\nthe offloaded AdamW update at these rates, {world} rank{'s' * (world > 1)} on this host: {name} "
              f"(the loop) + clip_grad_norm_")
    for a in args.plan:
        t = plan(a, 1, args.rows, args.length)["trained"] / world / n  # this rank's share, in timed steps
        print(f"  {a}: {t * world * n / 1e9:.2f}B trained parameters: {t * r[name]:.1f} s ({t * r['loop']:.1f} s) "
              f"+ {t * r['clip']:.1f} s a step")
    with open(os.path.join(args.out, f"optimizer-{arch}.json"), "w") as f:
        json.dump(r, f, indent=1)
    return r


def eval_bench(args):
    """Evaluation throughput of evaluate.score, --shortcuts on and off, on the random-weight LLaVA of args.arch and
    the toy test data: (sample, intervention) rows per second per task under all its interventions, the batches
    evaluate.py makes (args.batch_size jobs), their prompts made beforehand (the model's time only)."""
    import evaluate
    import shortcuts
    import perturb
    folder, train = prepare(args)
    model, processor = M.load(folder)
    model.eval()
    jobs, ri = evaluate.load_data([os.path.join(os.path.dirname(train), "test.jsonl")], list(perturb.APPLIES))
    size = P.image_size(processor)

    def apply(s, name, size=size):
        return perturb.perturb(s, name, evaluate.rng_for(0, s, name), size=size, ri_images=ri)
    letters = P.option_token_ids(processor, max(len(s["options"]) for s, _ in jobs))
    lines = ["| task | interventions | rows | rows/s off | rows/s on | speed-up | max abs diff of probs |",
             "|---|---|---|---|---|---|---|"]
    for task in ("image_heavy", "text_heavy"):
        mine = [j for j in jobs if j[0]["task"] == task]
        batches = [[apply(*mine[i]) for i in b] for b in shortcuts.make_batches(mine, args.batch_size, apply)]
        batches = [(b, evaluate.prompts(processor, b)) for b in batches]
        rate, probs = {}, {}
        for on in (True, False, True, False):  # each twice: the first of each warms up
            t0 = time.time()
            probs[on] = [q for b, batch in batches for q in evaluate.score(model, processor, b, letters, batch=batch,
                                                                           shortcuts=on)]
            rate[on] = len(mine) / (time.time() - t0)
        diff = max(abs(a - b) for x, y in zip(probs[True], probs[False]) for a, b in zip(x, y))
        names = " ".join(dict.fromkeys(n for _, n in mine))
        lines.append(f"| {task} | {names} | {len(mine)} | {rate[False]:.2f} | {rate[True]:.2f} | "
                     f"{rate[True] / rate[False]:.2f}x | {diff:.1e} |")
    cores = len(os.sched_getaffinity(0))
    device = "GPU " + torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({cores} cores)"
    print(f"\nevaluate.py --score logits, {args.arch} LLaVA ({P.n_image_tokens(processor, (size, size))} image tokens "
          f"a row), random weights, {device}, batches of {args.batch_size} jobs\n")
    print("\n".join(lines))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", choices=list(ARCHS), default="cpu")
    trained = ["fft-vqa", "fft-aug", "kl", "js", "rg", "pgd", "ours"]  # vanilla has no step to time
    p.add_argument("--presets", nargs="+", choices=trained, default=trained)
    p.add_argument("--extra-pgd-steps", type=int, nargs="*", default=[1, 3], help="ours with these PGD steps too")
    p.add_argument("--twins-all", action=argparse.BooleanOptionalAction, default=True,
                   help="ours with --twins all too (every twin of each original, as the authors train)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed steps per preset")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (allocator, caches)")
    p.add_argument("--out", default=os.path.join(HERE, "out", "bench"))
    p.add_argument("--plan", nargs="*", default=["llava-1.5-7b", "llava-1.5-13b"], help="architectures to plan")
    p.add_argument("--plan-only", action="store_true")
    p.add_argument("--eval", action="store_true", help="only evaluate.py's throughput, --shortcuts on and off")
    p.add_argument("--hook", action="store_true", help="only the experimental comparison of today's PGD path "
                   "(embed once, then the language model) with the full forward under a hook (issue 17)")
    p.add_argument("--optimizer", action="store_true", help="only the AdamW step, train.py's against the loop it "
                   "replaced (issue 28), and the offloaded update of the --plan models it projects")
    p.add_argument("--world", type=int, nargs="+", default=[1, 4, 8], help="ranks for the memory plan")
    p.add_argument("--rows", type=int, default=20, help="rows per pass for the activation estimate")
    p.add_argument("--length", type=int, default=700, help="tokens per row (LLaVA-1.5: 576 image tokens + text)")
    p.add_argument("--plan-lora", type=int, nargs="*", default=[16], help="LoRA ranks to plan too (none: full only)")
    args, args.train_args = p.parse_known_args(argv)  # anything else goes to train.py, e.g. --cpu-offload on
    os.makedirs(args.out, exist_ok=True)
    if args.eval:
        return eval_bench(args)
    if args.hook:
        return hook_bench(args)
    if args.optimizer:
        return optimizer_bench(args)
    if not args.plan_only:
        speed(args)
        print()
    if args.plan:
        plans(args)
        print()
        optimizer_bench(args)  # beside the plan: what the offloaded update of the planned models costs on this host


if __name__ == "__main__":
    main()
