"""Multiple-choice accuracy under every intervention: one forward pass per (sample, intervention), the
answer distribution being the softmax over the option letters' next-token logits after the prompt.
Writes OUT/predictions.jsonl (SPEC section 5) and prints accuracy per source x intervention.
  python evaluate.py --model out/toy/vanilla --data data/toy/test.jsonl --out out/eval
  torchrun --nproc_per_node 4 evaluate.py --model llava-1.5-7b --data data/mmlu/test.jsonl --out out/mmlu
"""
import argparse
import json
import os
import random
import sys
import time

import torch
import torch.distributed as dist

import model as M
import perturb


_last_print = [0.0]


def progress(done, total, t0, unit="samples", extra="", every=30.0):
    """Count, rate and time left on stderr. In a terminal one self-overwriting line, at most twice a
    second; in a file (torchrun, a batch scheduler) a plain line at most every `every` seconds and at the
    end, where self-overwriting updates would pile up into one line of thousands of characters."""
    tty = sys.stderr.isatty()
    if done < total and time.time() - _last_print[0] < (0.5 if tty else every):
        return
    _last_print[0] = time.time()
    rate = done / max(time.time() - t0, 1e-9)
    eta = (total - done) / rate if rate > 0 else 0
    line = f"{done}/{total} {unit} | {rate:.1f} {unit}/s | ETA {int(eta) // 60}:{int(eta) % 60:02d} {extra}"
    if tty:
        print("\r" + line, end="\n" if done >= total else "", file=sys.stderr, flush=True)
    else:
        print(line.rstrip(), file=sys.stderr, flush=True)


def rng_for(seed, sample, name):
    """The randomness of one (sample, intervention): the same on every run, rank and process count."""
    return random.Random(f"{seed}/{sample['id']}/{name}")


def load_data(paths, interventions, ri_folder=None):
    """Samples of all files (ids unique across them) and the (sample, intervention) jobs, in file order."""
    samples, where, free = [], {}, 0
    for path in [perturb.data_file(q, "test") for q in paths]:
        for s in perturb.load_samples(path):
            if s["options"] is None:  # an instruction sample: no option letters to score
                free += 1
                continue
            if s["id"] in where:
                raise ValueError(f"{path}: id {s['id']!r} also appears in {where[s['id']]}; ids must be unique "
                                 "across the evaluated files")
            where[s["id"]] = path
            samples.append(s)
    if free:
        print(f"skipped {free} instruction samples (free-form answers, no options to score)", file=sys.stderr)
    jobs = [(s, n) for s in samples for n in perturb.interventions_for(s["task"]) if n in interventions]
    ri_images = None
    if any(n == "ri" for _, n in jobs):
        if ri_folder is None and not any(s["task"] == "image_heavy" for s in samples):
            raise ValueError("intervention ri needs real images: pass --ri-folder, add an image-heavy file to "
                             "--data, or leave ri out of --interventions")
        ri_images = perturb.ri_pool(samples, ri_folder)
    return jobs, ri_images


def make_batches(jobs, batch_size, apply):
    """Jobs sorted by rendered length (little padding), cut into batches. The batches depend only on the
    data, never on the number of processes, so every process count computes the same numbers."""
    # size=1: only the text matters here, so canvases and random pixels are drawn 1 px wide
    order = sorted(range(len(jobs)), key=lambda i: (len(perturb.render(apply(*jobs[i], size=1))), i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def score(model, processor, samples, letter_ids):
    """Answer distributions over the option letters, one list of probabilities per sample."""
    batch = M.collate(processor, samples, train=False)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in M.model_inputs(batch).items()}
    last = batch["attention_mask"].sum(1) - 1                 # right padding: the prompt's last token
    keep = batch["input_ids"].shape[1] - int(last.min())      # only the lm-head rows we need
    logits = model(**inputs, logits_to_keep=keep).logits.float().cpu()
    rows = logits[torch.arange(len(samples)), last - (batch["input_ids"].shape[1] - keep)]
    return [torch.softmax(rows[i, letter_ids[:len(s["options"])]], -1).tolist() for i, s in enumerate(samples)]


def read_predictions(path):
    """Complete lines of a predictions file (a run killed mid-write may leave a cut last line)."""
    rows = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.endswith("\n"):
                    rows.append(json.loads(line))
    return rows


def accuracy_table(rows):
    """Markdown table of accuracy per source x intervention (like the paper's Table 7)."""
    names = [n for n in perturb.APPLIES if any(r["intervention"] == n for r in rows)]
    cells = {}
    for r in rows:
        cells.setdefault((r["source"], r["intervention"]), []).append(r["pred"] == r["answer"])
    lines = ["| source | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for src in sorted({r["source"] for r in rows}):
        accs = [cells.get((src, n)) for n in names]
        lines.append(f"| {src} | " + " | ".join(f"{100 * sum(a) / len(a):.1f}" if a else "-" for a in accs) + " |")
    return "\n".join(lines)


def run(model_name, data, out, interventions=tuple(perturb.APPLIES), batch_size=8, seed=0, pool="eval",
        ri_folder=None, resume=False, dtype=None, device=None, k_facts=10, loaded=None):
    """Evaluate and write OUT/predictions.jsonl; returns its rows. Works alone or under torchrun."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    master = rank == 0
    model, processor = loaded or M.load(model_name, dtype=dtype, device=device)
    model.eval()
    size = M.image_size(processor)
    jobs, ri_images = load_data(data, interventions, ri_folder)

    def apply(s, name, size=size):
        return perturb.perturb(s, name, rng_for(seed, s, name), size=size, pool=pool, ri_images=ri_images, k=k_facts)

    batches = make_batches(jobs, batch_size, apply)
    path = os.path.join(out, "predictions.jsonl")
    previous = read_predictions(path) if resume and master else []
    done = [{(r["id"], r["intervention"]) for r in previous}]
    if world > 1:
        dist.broadcast_object_list(done)
    done = done[0]
    todo = [b for b in batches if not all((jobs[i][0]["id"], jobs[i][1]) in done for i in b)]
    letter_ids = M.option_token_ids(processor, max(len(s["options"]) for s, _ in jobs))
    if master:
        os.makedirs(out, exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:  # rewrite what we keep, so a cut last line goes away
            f.writelines(json.dumps(r) + "\n" for r in previous)
    t0, n_done, n_total = time.time(), 0, sum(len(b) for b in todo)
    for start in range(0, len(todo), world):
        mine = todo[start + rank] if start + rank < len(todo) else []
        new = []
        if mine:
            chosen = [apply(*jobs[i]) for i in mine]
            for (s, name), probs in zip([jobs[i] for i in mine], score(model, processor, chosen, letter_ids)):
                new.append({"id": s["id"], "task": s["task"], "source": s["source"], "intervention": name,
                            "probs": probs, "pred": max(range(len(probs)), key=probs.__getitem__),
                            "answer": s["answer"],
                            **({"question_id": s["question_id"]} if "question_id" in s else {})})
        gathered = [None] * world if master else None
        if world > 1:
            dist.gather_object(new, gathered, dst=0)
        else:
            gathered = [new]
        if master:
            with open(path, "a", encoding="utf-8") as f:
                for part in gathered:
                    f.writelines(json.dumps(r) + "\n" for r in part)
                    n_done += len(part)
            progress(n_done, n_total, t0)
    rows = None
    if master:  # canonical order (data order, then intervention order), the same however the run went
        latest = {(r["id"], r["intervention"]): r for r in read_predictions(path)}
        rows = [latest.pop((s["id"], name)) for s, name in jobs] + list(latest.values())
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(path + ".tmp", path)
    return rows


def setup(dtype=None):
    """torchrun's environment decides single or multi process: (rank, device, dtype)."""
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    device = None
    if torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if device else torch.float32)
    return (dist.get_rank() if dist.is_initialized() else 0), device, dtype


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="alias (llava-1.5-7b, ...), hub id or local folder")
    p.add_argument("--data", required=True, nargs="+", help="JSONL files (SPEC section 1), or folders: their test.jsonl")
    p.add_argument("--out", required=True, help="folder for predictions.jsonl")
    p.add_argument("--interventions", nargs="+", default=list(perturb.APPLIES), choices=list(perturb.APPLIES))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="seeds the interventions (which facts, which wrong option)")
    p.add_argument("--pool", default="eval", choices=["train", "eval"], help="UF/MD wordings: held-out by default")
    p.add_argument("--k-facts", type=int, default=10, help="unrelated facts prepended by UF")
    p.add_argument("--ri-folder", default=None, help="real images for RI (default: the data's image-heavy images)")
    p.add_argument("--resume", action="store_true", help="skip (id, intervention) pairs already in predictions")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    args = p.parse_args(argv)
    _, device, dtype = setup(args.dtype)
    rows = run(args.model, args.data, args.out, args.interventions, args.batch_size, args.seed, args.pool,
               args.ri_folder, args.resume, dtype, device, args.k_facts)
    if rows is not None:
        print(accuracy_table(rows))
        print(f"wrote {os.path.join(args.out, 'predictions.jsonl')}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
