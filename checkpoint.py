"""The run folder of train.py (--out): resumable checkpoints (save, load, prune), which one a --resume continues
and whether its settings match this run's, metrics.jsonl, and the exported Hugging Face folder.
  OUT/ckpt-NNNNNNNN/  state.json (step, world, args, inputs, file sizes), the trained weights and optimizer state
                      (torch.distributed.checkpoint: any number of processes resumes them), each rank's RNG states
  OUT/metrics.jsonl   one line per optimizer step
  OUT/config.json, model.safetensors, ...   the trained model (a LoRA run: its adapter), written at the end
and of evaluate.py: OUT/predictions.jsonl, and OUT/run.json, the settings that made them.
"""
import errno
import json
import os
import random
import re
import shutil
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_state_dict)

import model as M
import samples as S


class RunError(ValueError):
    """A run that must not start or go on; the message names the file or flag, and what to do."""


CKPT = re.compile(r"ckpt-\d{8}")  # the only folders resume reads and pruning deletes: a user's ckpt-best is theirs
EXPORT = ("config.json", "model.safetensors", "model.safetensors.index.json", "adapter_config.json")

# Flags that cannot change the losses; the rest must match the checkpoint's run, or a resume would
# continue a different run (data and model are compared by content, in `inputs`)
FREE = {"save_every", "keep_checkpoints", "profile", "resume", "overwrite", "max_bad_steps", "export", "out",
        "activation_checkpointing", "cpu_offload", "workers", "data", "model", "facts_file", "shortcuts", "merge",
        "batch_size", "grad_accum"}  # these two: a resume on another number of processes keeps their product

# Flags added since, with the value that gives what a checkpoint written before them computed
EARLIER = {"pgd_scope": "template", "lora": 0}
FORMAT = "dcp"  # what state.json says of checkpoints written since this file used torch.distributed.checkpoint


def checkpoints(out):
    """The run's checkpoint folders in `out`, oldest first (8 digits: names sort as steps)."""
    if not os.path.isdir(out):
        return []
    return sorted(d for d in os.listdir(out) if CKPT.fullmatch(d) and os.path.isdir(os.path.join(out, d)))


def exported(out):
    """The files of an exported model in `out`."""
    return [f for f in EXPORT if os.path.exists(os.path.join(out, f))]


def inputs(args, paths, world):
    """What decides the losses besides the flags: a checkpoint records it, and a resume must find it unchanged."""
    return {"--batch-size x processes x --grad-accum": args.batch_size * world * args.grad_accum,
            "--data sha256": [S.sha256(path) for path in paths],
            **({"--facts-file sha256": S.sha256(args.facts_file)} if args.facts_file else {}),
            **{"--model" + ("" if k == "model" else " " + k): v for k, v in M.identity(args.model).items()}}


def shown(v):
    if isinstance(v, list):
        return "[" + ", ".join(map(shown, v)) + "]"
    return "unset" if v is None else v[:12] if isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) else str(v)


def changes(then, now, name=str):
    """'NAME THEN then, NOW now' for each setting that differs between a run's record and this run (a setting
    one of them lacks is unset there); of a table (an evaluation's data files, a model's weight files) each
    entry that differs. train.py's resume and evaluate.py's run.json both decide by it."""
    out = []
    for k in [*then, *(k for k in now if k not in then)]:
        a, b = then.get(k), now.get(k)
        if a != b and isinstance(a, dict) and isinstance(b, dict):
            out += [f"{name(k)} {f} {shown(a.get(f))} then, {shown(b.get(f))} now"
                    for f in sorted(set(a) | set(b)) if a.get(f) != b.get(f)]
        elif a != b:
            out.append(f"{name(k)} {shown(a)} then, {shown(b)} now")
    return out


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


def resume_point(args, inputs):
    """(the newest intact checkpoint of args.out, None) or (None, why none may be resumed)."""
    for name in reversed(checkpoints(args.out)):
        folder = os.path.join(args.out, name)
        state, damage = read_state(folder)
        if damage:
            print(f"warning: {folder} is damaged ({damage}); trying the checkpoint before it", file=sys.stderr)
            continue
        if state.get("format") != FORMAT:
            return None, (f"error: {folder} was written by an earlier train.py, one file of shards per process, "
                          f"which this one cannot read: resume it with that version, or start a fresh run")
        then = EARLIER | {k: v for k, v in state["args"].items() if k not in FREE} | state.get("inputs", {})
        now = {k: v for k, v in vars(args).items() if k not in FREE} | inputs
        changed = changes(then, now, lambda k: k if k.startswith("-") else "--" + k.replace("_", "-"))
        if changed:
            return None, (f"error: {folder} was trained with other settings: {'; '.join(changed)} (resume with "
                          f"the same, or start a fresh run in another --out)")
        return folder, None
    return None, f"error: {args.out}: every checkpoint is damaged (see the warnings above): start a fresh run"


# ---- checkpoints: torch.distributed.checkpoint (sharded, so any number of processes can resume), written into a
# temporary folder that is renamed when complete
def written(save, *a):
    """save(*a), or one line: a full disk is no traceback, and the checkpoint before this one is intact (this one
    is still a .tmp folder)."""
    try:
        save(*a)
    except (OSError, RuntimeError, dcp.api.CheckpointException) as e:
        if isinstance(e, dcp.api.CheckpointException):  # the first failing rank's own exception
            e = next(iter(e.failures.values()))[0]
        full = getattr(e, "errno", None) == errno.ENOSPC or "unexpected pos" in str(e) or "No space" in str(e)
        sys.exit(f"error: {a[-1]}: {'no space left on device' if full else e}; the checkpoints before it are "
                 f"intact: make room, then pass --resume")  # torch.save on a full disk: "unexpected pos"


def save_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def states(step_model, optimizer):
    """The trained weights and the optimizer state as torch.distributed.checkpoint saves and loads them: each rank
    its shards, by parameter name, so another number of processes reshards them on load."""
    model, optim = get_state_dict(step_model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": model, "optim": optim}


def save(args, step, step_model, optimizer, inputs):
    """OUT/ckpt-<step>: the trained weights, the optimizer state and each rank's RNG states, then state.json; the
    older ones beyond --keep-checkpoints are deleted."""
    rank, world = dist.get_rank(), dist.get_world_size()
    tmp, final = os.path.join(args.out, f".tmp-ckpt-{step:08d}"), os.path.join(args.out, f"ckpt-{step:08d}")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    written(lambda state, path: dcp.save(state, checkpoint_id=path), states(step_model, optimizer), tmp)
    written(torch.save, {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
                         "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.zeros(0)},
            f"{tmp}/rng.rank{rank}.pt")
    dist.barrier()
    if rank == 0:
        files = {name: os.path.getsize(os.path.join(tmp, name)) for name in os.listdir(tmp)}  # resume checks them
        written(save_json, {"step": step, "world": world, "format": FORMAT, "args": vars(args), "inputs": inputs,
                            "files": files}, f"{tmp}/state.json")
        shutil.rmtree(final, ignore_errors=True)  # a damaged checkpoint of this step, skipped by the resume
        os.replace(tmp, final)  # a kill before this line leaves only a .tmp folder, which resume ignores
        older = [c for c in checkpoints(args.out) if c < os.path.basename(final)]  # newer ones are damaged: kept
        for old in older[:max(0, len(older) - (args.keep_checkpoints - 1))]:
            shutil.rmtree(os.path.join(args.out, old))
    dist.barrier()


def load(folder, step_model, optimizer):
    """Restores the weights and optimizer state from `folder`, resharded for this run's processes, and the RNG
    states (rank 0's for a rank the writing run did not have); returns its step."""
    rank = dist.get_rank()
    with open(f"{folder}/state.json") as f:
        step = json.load(f)["step"]
    state = states(step_model, optimizer)
    dcp.load(state, checkpoint_id=folder)
    kernels = [{k: g[k] for k in ("foreach", "fused")} for g in optimizer.param_groups]
    set_state_dict(step_model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))  # frozen: from the model
    for group, kernel in zip(optimizer.param_groups, kernels):  # the saved groups also hold how the writing run
        group.update(kernel)  # stepped (before issue 28: a loop over tensors on CPU); this run's choice stays
    path = f"{folder}/rng.rank{rank}.pt"
    rng = torch.load(path if os.path.exists(path) else f"{folder}/rng.rank0.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    random.setstate((3, tuple(rng["python"]), None))
    if torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return step


def start(args, step, replacing):
    """Makes --out; --overwrite removes the earlier run's checkpoints (they would be resumed and pruned as this
    run's); metrics.jsonl keeps the lines of the steps before `step`. Returns its path."""
    os.makedirs(args.out, exist_ok=True)
    if replacing:
        for name in checkpoints(args.out):
            shutil.rmtree(os.path.join(args.out, name))
    path = os.path.join(args.out, "metrics.jsonl")
    kept = []
    if args.resume and os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if line.endswith("\n") and json.loads(line)["step"] < step]
    with open(path, "w") as f:
        f.writelines(kept)
    return path


# ---- the output: a Hugging Face folder that plain transformers loads --------------------------------------
# (of a LoRA run, the adapter folder in PEFT's format, which names its base; with --merge the merged model too)
def export(args, step_model, hf_model, peft_model, processor, replacing, old_export):
    """Gathers the trained weights from every rank and (rank 0) writes them into --out, through a temporary folder;
    returns them (rank 0; names as the model's own)."""
    full = get_model_state_dict(step_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                     ignore_frozen_params=args.lora > 0))
    if dist.get_rank() != 0:
        return full
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
    return full


# ---- evaluate.py's folder: predictions.jsonl and the run.json of the settings that made them ------------
def read_predictions(path):
    """Complete lines of a predictions file (a run killed mid-write may leave a cut last line)."""
    rows = []
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.endswith("\n") or not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    row = e
                if not isinstance(row, dict) or not {"id", "intervention"} <= row.keys():
                    raise RunError(f"{path}:{lineno}: not a predictions line ({row}): delete the line to score "
                                   "it again, or pass --overwrite to start over")
                rows.append(row)
    return rows


# Settings an evaluate.py run.json written before they existed lacks, with the value those runs used.
EARLIER_EVAL = {"prompt": "ours", "score": "logits", "facts_file": None, "facts_replacement": False, "canvas_size": None}


def evaluation_rows(out, now, resume, overwrite):
    """The rows of OUT/predictions.jsonl to keep. Predictions of other settings are refused: a fresh run
    would silently replace them, a resume would mix them with ours; --overwrite replaces them."""
    path, saved_path = os.path.join(out, "predictions.jsonl"), os.path.join(out, "run.json")
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunError(f"{out}: --out is a file, not a folder (choose another --out)")
    if overwrite or not os.path.isfile(path) or os.path.getsize(path) == 0:
        return []
    try:
        with open(saved_path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError):
        saved = None
    if isinstance(saved, dict):
        saved = {**EARLIER_EVAL, **saved}
    if saved != now:
        why = "; ".join(changes(saved, now)) if isinstance(saved, dict) else \
            f"{saved_path} is missing or unreadable, so which settings made them is unknown"
        raise RunError(f"{path} holds predictions of other settings ({why}): pass --overwrite to replace them "
                       f"(and the diagnosis.json beside them), or choose another --out")
    return read_predictions(path) if resume else []


def start_evaluation(out, now, previous):
    """Write run.json and what we keep of the predictions; remove the diagnosis of the old file."""
    try:
        os.makedirs(out, exist_ok=True)
        if os.path.exists(os.path.join(out, "diagnosis.json")):  # it describes the old predictions
            os.remove(os.path.join(out, "diagnosis.json"))
        with open(os.path.join(out, "run.json"), "w", encoding="utf-8") as f:
            json.dump(now, f, indent=1)
        with open(os.path.join(out, "predictions.jsonl"), "w", encoding="utf-8") as f:  # a cut last line goes
            f.writelines(json.dumps(r) + "\n" for r in previous)
    except OSError as e:
        raise RunError(f"{out}: cannot write there ({e.strerror}): choose a writable --out") from None
