"""Multiple-choice accuracy under every intervention: one forward pass per (sample, intervention), the
answer distribution being the softmax over the option letters' next-token logits after the prompt
(--score logits, the default), or, as the authors scored, a greedy answer generated and parsed for the
option it names (--score generate; an answer that names none counts as wrong). Writes
OUT/predictions.jsonl (docs/format.md, 'Predictions') and OUT/run.json (what determines the numbers: a run into an OUT
of other settings is refused, --resume continues only the same settings, --overwrite replaces).
  python evaluate.py --model out/toy/vanilla --data data/toy/test.jsonl --out out/eval
  python evaluate.py --model llava-1.5-7b --data data/mmlu --out out/gen --score generate --repetition-penalty 1.2
  torchrun --nproc_per_node 4 evaluate.py --model llava-1.5-7b --data data/mmlu/test.jsonl --out out/mmlu
  python evaluate.py --model out/toy/vanilla --data data/toy/test.jsonl --out out/eval --attack-eps 1e-3 1e-2  # attack.py
"""
import argparse
import json
import os
import random
import sys
import time

import torch
import torch.distributed as dist

import attack as A
import checkpoint
import checks
import model as M
import perturb
import samples as S
import prompts as P
from checkpoint import RunError
from profiling import progress
from shortcuts import shared_logits


def rng_for(seed, sample, name):
    """The randomness of one (sample, intervention): the same on every run, rank and process count."""
    return random.Random(f"{seed}/{sample['id']}/{name}")


def load_data(paths, interventions, ri_folder=None):
    """Samples of all files (ids unique across them) and the (sample, intervention) jobs, in file order."""
    paths = [S.data_file(q, "test") for q in paths]
    for path in paths:
        if not os.path.isfile(path):
            raise RunError(f"{path}: no such file (pass JSONL files, or folders holding a test.jsonl)")
    loaded = [s for _, part in S.load_files(paths, decode=True) for s in part]  # a bad image stops us here
    samples = [s for s in loaded if s["options"] is not None]  # instruction samples: no option letters to score
    free = len(loaded) - len(samples)
    if free:
        print(f"skipped {free} instruction samples (free-form answers, no options to score)", file=sys.stderr)
    if not samples:
        raise RunError(f"{', '.join(paths)}: no sample with options to score (instruction samples are skipped): "
                       "pass multiple-choice data")
    jobs = [(s, n) for s in samples for n in perturb.interventions_for(s["task"]) if n in interventions]
    asked = [n for n in interventions if n != "orig"]  # orig comes with every other one
    if asked and all(n == "orig" for _, n in jobs):
        tasks = {s["task"] for s in samples}
        names = [n for n in perturb.APPLIES if tasks & set(perturb.APPLIES[n])]
        raise RunError(f"--interventions {' '.join(asked)} apply to none of the data's tasks "
                       f"({', '.join(sorted(tasks))}): pick from {' '.join(names)}")
    ri_images = None
    if any(n == "ri" for _, n in jobs):  # a DataError (of the folder's, or no image-heavy data) names what to pass
        ri_images = perturb.ri_pool(samples, ri_folder)
    return jobs, ri_images


def context_length(model):
    """The language model's context in tokens (None where its config does not say)."""
    return getattr(getattr(model.config, "text_config", model.config), "max_position_embeddings", None)


def prompts(processor, samples, max_length=None, room=0, style="ours"):
    """The samples' prompts, right-padded (prompts.collate); `room` tokens are kept free for generated ones."""
    try:
        return P.collate(processor, samples, train=False, max_length=max_length and max_length - room, style=style)
    except ValueError as e:  # past the context the positions are untrained: the numbers would mean nothing
        if "max_length" not in str(e):
            raise
        raise RunError(f"{e}; max_length is the language model's context (max_position_embeddings)"
                       f"{' less --max-new-tokens' if room else ''}: shorten that sample or leave it out") from None


@torch.no_grad()
def score(model, processor, samples, letter_ids, max_length=None, style="ours", batch=None, shortcuts=True):
    """Answer distributions over the option letters, one list of probabilities per sample. batch: the samples'
    prompts(...), when made already (by a --workers process). shortcuts: share what the rows share (shared_logits,
    for a family of model.FAMILIES): the same probabilities as one whole pass a row, within float noise."""
    batch = prompts(processor, samples, max_length, style=style) if batch is None else batch
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in M.model_inputs(batch).items()}
    last = batch["attention_mask"].sum(1) - 1                 # right padding: the prompt's last token
    keep = batch["input_ids"].shape[1] - int(last.min())      # only the lm-head rows we need
    if shortcuts and processor.family != P.GENERIC:
        logits = shared_logits(model, samples, inputs, int(last.min()), keep)
    else:
        logits = model(**inputs, logits_to_keep=keep).logits
    rows = logits.float().cpu()[torch.arange(len(samples)), last - (batch["input_ids"].shape[1] - keep)]
    return [torch.softmax(rows[i, letter_ids[:len(s["options"])]], -1).tolist() for i, s in enumerate(samples)]


def left_padded(batch):
    """A right-padded batch with its padding moved to the left of each row. generate appends after the last
    column, so a right-padded row would continue after its pads. Only the language model's sequences move:
    the Q-Former reads its own (InstructBLIP's qformer_input_ids) as an encoder, padding masked wherever it is,
    and Qwen2.5-VL computes its M-RoPE positions from the attention mask, which moves with the tokens. Gemma3's
    and PaliGemma's token_type_ids (the generic path) move with them too."""
    n = batch["attention_mask"].shape[1] - batch["attention_mask"].sum(1)  # pads per row
    out = dict(batch)
    for k in ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids"):
        if k in batch:
            out[k] = torch.stack([row.roll(int(p)) for row, p in zip(batch[k], n)])
    return out


@torch.no_grad()
def generate(model, processor, samples, max_new_tokens=10, repetition_penalty=1.0, max_length=None, style="ours",
             batch=None):
    """Greedy answers, one string per sample: only the new tokens, decoded without special tokens. A batch
    gives the texts of one sample at a time (test_score.py), except in one corner: the repetition penalty
    also lowers the pad token's logit in rows that were padded (a pad is never a real answer's token).
    batch: the samples' prompts(..., room=max_new_tokens), when made already (by a --workers process)."""
    batch = prompts(processor, samples, max_length, max_new_tokens, style) if batch is None else batch
    batch = left_padded(batch)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in M.model_inputs(batch).items()}
    out = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens,
                         repetition_penalty=repetition_penalty, pad_token_id=processor.tokenizer.pad_token_id)
    return processor.tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:].cpu(), skip_special_tokens=True)


def unparsed(rows):
    """Per intervention, (answers no option could be read from, answers) of the generated rows."""
    out = {}
    for r in rows:
        if r.get("score") == "generate":
            k = out.setdefault(r["intervention"], [0, 0])
            k[0] += r["pred"] is None
            k[1] += 1
    return out


def settings(model_name, data, interventions, seed, pool, k_facts, ri_folder, dtype, scoring="logits",
             max_new_tokens=10, repetition_penalty=1.0, style="ours", facts_file=None, facts_replacement=False,
             canvas_size=None, attack=None):
    """What determines the predictions, kept in OUT/run.json: a resume must match all of it, or one file
    would mix two runs' numbers. Not the batch size: padding is masked, so it changes float noise only
    (and a smaller batch is how a run that ran out of memory goes on). The dtype does count, and so does
    the scoring (with generation's settings; they mean nothing to letter logits)."""
    files = [S.data_file(q, "test") for q in data]
    return dict(M.identity(model_name), data={os.path.abspath(q): S.sha256(q) for q in files},
                interventions=[n for n in perturb.APPLIES if n in interventions], seed=seed, pool=pool,
                k_facts=k_facts, ri_folder=ri_folder and os.path.abspath(ri_folder), dtype=dtype and str(dtype),
                prompt=style, score=scoring, facts_file=facts_file and S.sha256(facts_file),
                facts_replacement=facts_replacement, canvas_size=canvas_size,
                **(dict(max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty)
                   if scoring == "generate" else {}), **(dict(attack=attack) if attack else {}))


def accuracy_table(rows):
    """Markdown table of accuracy per source x intervention (like the paper's Table 7)."""
    names = perturb.ordered({r["intervention"] for r in rows})
    cells = {}
    for r in rows:
        cells.setdefault((r["source"], r["intervention"]), []).append(r["pred"] == r["answer"])
    lines = ["| source | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for src in sorted({r["source"] for r in rows}):
        accs = [cells.get((src, n)) for n in names]
        lines.append(f"| {src} | " + " | ".join(f"{100 * sum(a) / len(a):.1f}" if a else "-" for a in accs) + " |")
    return "\n".join(lines)


def run(model_name, data, out, interventions=tuple(perturb.APPLIES), batch_size=8, seed=0, pool="eval",
        ri_folder=None, resume=False, dtype=None, device=None, k_facts=10, loaded=None, overwrite=False,
        scoring="logits", max_new_tokens=10, repetition_penalty=1.0, style="ours", facts_file=None,
        facts_replacement=False, canvas_size=None, workers=None, shortcuts=True, attack=None):
    """Evaluate and write OUT/predictions.jsonl; returns its rows. Works alone or under torchrun.
    Arguments, data and --out are checked before the model loads; problems raise RunError (or DataError).
    workers: processes preparing this rank's next batches (default: 2 for a model on GPU, 0 on CPU).
    shortcuts: score()'s (the same numbers, so no setting of run.json: a run may resume with the other).
    attack: attack.settings(...) of the worst-case rows, or None."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    master = rank == 0
    interventions = ["orig"] + [n for n in interventions if n != "orig"]  # delta_cp compares every one with orig
    facts, problem = checks.uf_facts(facts_file, k_facts, facts_replacement, canvas_size, pool)
    problem = checks.evaluation(batch_size, workers, style, scoring, max_new_tokens, repetition_penalty, resume,
                                overwrite) or A.problem(attack, scoring) or problem
    if problem:
        raise RunError(problem)
    jobs, ri_images = load_data(data, interventions, ri_folder)
    jobs = A.jobs(jobs, attack)
    problem = checks.texts(jobs, facts, k_facts, pool, facts_replacement)  # UF and MD, before the model loads
    if problem:
        raise RunError(problem)
    try:  # the family from config.json alone: a model type nothing loads, or a --prompt it lacks, fails here
        fam = loaded[1].family if loaded else M.checkpoint_family(M.where(model_name), generic=True)
    except ValueError as e:
        raise RunError(str(e)) from None
    styles = ["ours"] if fam == P.GENERIC else [s for f, s in P.PROMPTS if f == fam]
    if style not in styles:
        raise RunError(f"--prompt {style}: not written for the {fam} family; pick {' or '.join(styles)}")
    if attack and fam == P.GENERIC:
        raise RunError(f"--attack-eps: {model_name} has no row in model.FAMILIES, so no input-embedding path to attack")
    now = settings(model_name, data, interventions, seed, pool, k_facts, ri_folder, dtype, scoring, max_new_tokens,
                   repetition_penalty, style, facts_file, facts_replacement, canvas_size, attack)
    verdict, previous = [None, set()], []
    if master:
        try:
            previous = checkpoint.evaluation_rows(out, now, resume, overwrite)
            checkpoint.start_evaluation(out, now, previous)
            verdict[1] = {(r["id"], r["intervention"]) for r in previous}
        except RunError as e:
            verdict[0] = checkpoint.release(out) or str(e)  # (a run in this process may go on)
    if world > 1:
        dist.broadcast_object_list(verdict)
    if verdict[0]:
        raise RunError(verdict[0])
    done = verdict[1]
    model, processor = loaded or M.load(model_name, dtype=dtype, device=device, generic=True)
    model.eval()
    if master and processor.family == P.GENERIC:
        print(f"{model_name}: model type {processor.row['model_type']!r} is in no row of model.FAMILIES: evaluated "
              "through the generic path (the prompt from its processor's chat template)", file=sys.stderr)
    size = canvas_size or P.image_size(processor)  # of the canvases and random pixels

    def apply(s, name, size=size):
        return perturb.perturb(s, "orig" if perturb.attack_radius(name) else name, rng_for(seed, s, name), size=size,
                               pool=pool, ri_images=ri_images, k=k_facts, facts=facts, replace=facts_replacement)

    batches = A.batches(jobs, batch_size, apply)  # make_batches', the attack jobs apart
    path = os.path.join(out, "predictions.jsonl")
    todo = [b for b in batches if not all((jobs[i][0]["id"], jobs[i][1]) in done for i in b)]
    todo = todo[-1:] + todo[:-1]  # the longest batch first: a sample past the context, or memory, fails at once
    letter_ids = P.option_token_ids(processor, max(len(s["options"]) for s, _ in jobs), style=style)
    max_length = context_length(model)

    def prepared(mine):
        """This rank's batch of a round: its samples under their interventions and their prompts, or the
        RunError that stops the run (raised by the loop: a worker's would come wrapped in its traceback)."""
        if not mine:  # this rank idles in the last round
            return None
        chosen = [apply(*jobs[i]) for i in mine]
        try:
            room = max_new_tokens if scoring == "generate" else 0
            return chosen, prompts(processor, chosen, max_length, room, style)
        except RunError as e:
            return e

    # the rounds' batches of this rank in order, made by --workers processes while the model scores: forked after
    # the model loaded, as DataLoader's workers are on Linux; apply and prompts touch neither the model nor CUDA.
    # A generator of its own: the loader would draw its workers' seed from the global RNG
    rounds = [todo[start + rank] if start + rank < len(todo) else [] for start in range(0, len(todo), world)]
    if workers is None:
        workers = 2 * (next(model.parameters()).device.type == "cuda")
    loader = torch.utils.data.DataLoader(rounds, batch_size=None, collate_fn=prepared, num_workers=workers,
                                         multiprocessing_context="fork" if workers else None,
                                         generator=torch.Generator())
    t0, n_done, n_total = time.time(), 0, sum(len(b) for b in todo)
    for mine, ready in zip(rounds, loader):
        new = []
        if mine:
            if isinstance(ready, RunError):
                raise ready
            chosen, batch = ready
            if perturb.attack_radius(jobs[mine[0]][1]):  # a batch of attack jobs
                found = A.found(model, processor, chosen, [jobs[i][1] for i in mine], batch, letter_ids, attack, seed,
                                style)
            elif scoring == "generate":
                texts = generate(model, processor, chosen, max_new_tokens, repetition_penalty, max_length, style,
                                 batch)
                found = [dict(probs=None, pred=P.parse_answer(t, s["options"]), text=t) for s, t in zip(chosen, texts)]
            else:
                found = [dict(probs=probs, pred=max(range(len(probs)), key=probs.__getitem__))
                         for probs in score(model, processor, chosen, letter_ids, max_length, style, batch,
                                             shortcuts)]
            for (s, name), f in zip([jobs[i] for i in mine], found):
                new.append({"id": s["id"], "task": s["task"], "source": s["source"], "intervention": name,
                            "score": scoring, "probs": f["probs"], "pred": f["pred"], "answer": s["answer"],
                            **({"text": f["text"], "n_options": len(s["options"])} if "text" in f else {}),
                            **({"eps": f["eps"]} if "eps" in f else {}),
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
        latest = {(r["id"], r["intervention"]): r for r in checkpoint.read_predictions(path)}
        rows = [latest.pop((s["id"], name)) for s, name in jobs] + list(latest.values())
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.replace(path + ".tmp", path)
        checkpoint.release(out)  # held since evaluation_rows: a second run into --out was refused meanwhile
    return rows


def setup(dtype=None):
    """torchrun's environment decides single or multi process: (rank, device, dtype)."""
    if "RANK" in os.environ and not dist.is_initialized():
        cuda = torch.cuda.is_available()
        dist.init_process_group("nccl" if cuda else "gloo",
                                device_id=torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if cuda else None)
    device = None
    if torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    dtype = getattr(torch, dtype) if dtype else (torch.bfloat16 if device else torch.float32)
    return (dist.get_rank() if dist.is_initialized() else 0), device, dtype


# --protocol: the authors' evaluation (src/predict.py at 911003a) as one switch, flags given explicitly win:
# their prompt, a greedy answer of 10 tokens under repetition penalty 1.2 parsed for its option, canvases and
# random pixels at 336 px, UF facts drawn with replacement. Keys are run()'s arguments.
PROTOCOLS = {"ours": {}, "authors": dict(style="authors", scoring="generate", max_new_tokens=10,
                                         repetition_penalty=1.2, canvas_size=336, facts_replacement=True)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="alias (llava-1.5-7b, ...), hub id or local folder")
    p.add_argument("--data", required=True, nargs="+",
                   help="JSONL files (docs/format.md, 'A sample'), or folders: their test.jsonl")
    p.add_argument("--out", required=True, help="folder for predictions.jsonl")
    p.add_argument("--interventions", nargs="+", default=list(perturb.APPLIES), choices=list(perturb.APPLIES),
                   help="orig is always scored too: delta_cp compares every intervention with it")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="seeds the interventions (which facts, which wrong option)")
    p.add_argument("--pool", default="eval", choices=["train", "eval"], help="UF/MD wordings: held-out by default")
    p.add_argument("--k-facts", type=int, default=10, help="unrelated facts prepended by UF")
    p.add_argument("--ri-folder", default=None, help="real images for RI, instead of the data's image-heavy images")
    p.add_argument("--facts-file", default=None, help="UF facts, one a line, used whole (default: our held-out pool)")
    p.add_argument("--facts-replacement", action="store_true", help="draw the k facts with replacement (the authors)")
    p.add_argument("--canvas-size", type=int, default=None,
                   help="side of the FB/FW canvases and random pixels (default: the model's input size; the authors: 336)")
    p.add_argument("--resume", action="store_true", help="skip (id, intervention) pairs already in predictions "
                   "(only a run of the same settings, see OUT/run.json)")
    p.add_argument("--overwrite", action="store_true", help="replace predictions of other settings in --out "
                   "(and the diagnosis.json beside them)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--workers", type=int, default=None, help="processes preparing the next batches (interventions, "
                   "images, processor) while the model scores (default: 2 on GPU; 0 on CPU, whose cores do the "
                   "compute); any number gives the same predictions")
    p.add_argument("--shortcuts", default="on", choices=["on", "off"], help="--score logits: each image through the "
                   "vision tower once, and an image-heavy sample's prefix through the language model once for its "
                   "interventions (the same numbers; off: one whole pass a row)")
    p.add_argument("--protocol", default="ours", choices=list(PROTOCOLS),
                   help="authors: --prompt authors --score generate --repetition-penalty 1.2 --canvas-size 336 "
                   "--facts-replacement (flags given explicitly win)")
    p.add_argument("--score", dest="scoring", default="logits", choices=["logits", "generate"],
                   help="logits: softmax over the option letters' next-token logits (default); generate: a greedy "
                   "answer parsed for the option it names, unparsed ones counted wrong (the authors' protocol)")
    p.add_argument("--prompt", dest="style", default="ours", choices=list(P.STYLES),
                   help="how questions, options and answers are written: ours, or the authors' (their released "
                   "checkpoints were trained on it: system prompt, 'Option:' list, the bare letter)")
    p.add_argument("--max-new-tokens", type=int, default=10,
                   help="--score generate: tokens generated (the authors: 10)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="--score generate: transformers' repetition penalty (the authors: 1.2; 1.0 is none)")
    A.arguments(p)
    p.set_defaults(**PROTOCOLS[p.parse_known_args(argv)[0].protocol])
    args = p.parse_args(argv)
    _, device, dtype = setup(args.dtype)
    try:
        rows = run(args.model, args.data, args.out, args.interventions, args.batch_size, args.seed, args.pool,
                   args.ri_folder, args.resume, dtype, device, args.k_facts, overwrite=args.overwrite,
                   scoring=args.scoring, max_new_tokens=args.max_new_tokens,
                   repetition_penalty=args.repetition_penalty, style=args.style, facts_file=args.facts_file,
                   facts_replacement=args.facts_replacement, canvas_size=args.canvas_size, workers=args.workers,
                   shortcuts=args.shortcuts == "on", attack=A.settings(args.attack_eps, args.attack_steps,
                                                                       args.attack_alpha, args.attack_scale))
    except (RunError, perturb.DataError, FileNotFoundError, NotADirectoryError) as e:  # written for people
        sys.exit(f"error: {e}")
    if rows is not None:
        print(accuracy_table(rows))
        if unparsed(rows):
            print("answers naming no option (counted wrong): "
                  + ", ".join(f"{n} {k}/{total}" for n, (k, total) in unparsed(rows).items()))
        print(f"wrote {os.path.join(args.out, 'predictions.jsonl')}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
