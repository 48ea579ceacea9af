"""The run folder of train.py (--out): resumable checkpoints (save, load, prune), which one a --resume continues
and whether its settings match this run's, metrics.jsonl, and the exported Hugging Face folder.
  OUT/ckpt-NNNNNNNN/  state.json (step, world, args, inputs, file sizes), the trained weights and optimizer state
                      (torch.distributed.checkpoint: any number of processes resumes them), each rank's RNG states
  OUT/metrics.jsonl   one line per optimizer step
  OUT/config.json, model.safetensors, ...   the trained model (a LoRA run: its adapter, with base_identity.json),
                      written at the end
and of evaluate.py: OUT/predictions.jsonl, and OUT/run.json, the settings that made them. While a run writes
the folder, OUT/.lock says so (hold): a second run into it is refused.
"""
import atexit
import contextlib
import errno
import fcntl
import json
import os
import random
import re
import shutil
import socket
import sys

import huggingface_hub
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
# Every name model.save may write into --out (a model or an adapter and its processor, a --merge run's adapter/):
# an export removes the earlier export's (another kind, other shards) and nothing else: evaluate.py's files stay
EXPORTED = re.compile(r"(adapter_|generation_|preprocessor_|processor_|video_preprocessor_|tokenizer_)?config\.json|"
                      r"(pytorch_model|model|adapter_model)\S*\.(safetensors|bin)|model\.safetensors\.index\.json|"
                      r"tokenizer\.(json|model)|special_tokens_map\.json|added_tokens\.json|vocab\.(json|txt)|"
                      r"merges\.txt|chat_template\.(json|jinja)|base_identity\.json|adapter|qformer_tokenizer")
MARKERS = ("adapter_config.json", "config.json")  # what model.load reads first: removed first, moved in last

# Flags that cannot change the losses; the rest must match the checkpoint's run, or a resume would
# continue a different run (data and model are compared by content, in `inputs`)
FREE = {"save_every", "keep_checkpoints", "profile", "resume", "overwrite", "max_bad_steps", "export", "out",
        "activation_checkpointing", "cpu_offload", "workers", "data", "model", "facts_file", "shortcuts", "merge",
        "batch_size", "grad_accum"}  # these two: a resume on another number of processes keeps their product

# Flags added since, with the value that gives what a checkpoint written before them computed
EARLIER = {"pgd_scope": "template", "lora": 0, "eps_scale": "none"}
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
        then.setdefault("pgd_step", "sign" if then.pop("pgd_sign", False) else "raw")  # a flag since renamed
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


def start(args, step):
    """Makes --out; --overwrite (without --resume) removes the earlier run's checkpoints (they would be resumed and
    pruned as this run's), its model when this run exports; metrics.jsonl keeps the lines of the steps before
    `step`. Returns its path."""
    os.makedirs(args.out, exist_ok=True)
    if args.overwrite and not args.resume:
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
def export(args, step_model, hf_model, peft_model, processor):
    """Gathers the trained weights from every rank and (rank 0) writes them into --out, through a temporary folder,
    in place of any earlier export (of a resumed or replaced run, another kind: an adapter beside a full model
    would load first); returns them (rank 0; names as the model's own)."""
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
        save_json(base_identity(M.where(peft_model.peft_config["default"].base_model_name_or_path)),
                  os.path.join(adapter, BASE))  # what the base was: loading the adapter on another is refused
        if args.merge:  # in float32, as training holds the weights: a bf16 base plus a small B @ A would round it off
            M.save(*M.load(adapter, dtype=torch.float32), tmp)
    else:
        M.save(hf_model, processor, tmp, state_dict=full)
    # A kill at any point leaves no folder that loads other weights: the earlier export goes, its config first
    # (until ours is in, model.load finds no model), then ours comes in, its config last
    ours = os.listdir(tmp)
    earlier = [n for n in os.listdir(args.out) if EXPORTED.fullmatch(n) or n in ours]
    for name in sorted(earlier, key=lambda n: n not in MARKERS):
        path = os.path.join(args.out, name)
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    for name in sorted(ours, key=lambda n: n in MARKERS):
        os.replace(os.path.join(tmp, name), os.path.join(args.out, name))
    os.rmdir(tmp)
    return full


# ---- one run at a time: rank 0 of train.py or evaluate.py (the one that writes the folder's files) holds OUT/.lock,
# an exclusive flock, which the kernel drops when the process ends however it ends: a killed run's file blocks nobody
HELD = {}  # the folders this process holds, their open lock files (a test runs two mains in one process)


def hold(out):
    """Locks --out for this run, or returns the error line naming the run that holds it; makes the folder. An --out
    that cannot be made or locked is left to the checks that say why (checks.out_folder, evaluation_rows)."""
    if os.environ.get("RANK", "0") != "0" or os.path.realpath(out) in HELD:
        return None
    path, made = os.path.join(out, ".lock"), not os.path.exists(out)
    try:
        os.makedirs(out, exist_ok=True)
        while True:
            f = open(path, "a+", encoding="utf-8")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "its pid unknown"
                f.close()
                return (f"error: {out}: another run holds this folder ({holder}; {path}): wait for it to end, "
                        "or choose another --out")
            with contextlib.suppress(FileNotFoundError):
                if os.path.samestat(os.fstat(f.fileno()), os.stat(path)):
                    break
            f.close()  # its holder removed it as we opened it (release): lock the file there now
    except OSError:  # (a file system without flock: unlocked, as before)
        return None
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    HELD[os.path.realpath(out)] = f, made
    atexit.register(release, os.path.realpath(out))  # however the run stops (an error line, the end): no lock file, no empty folder
    return None


def release(out):
    """Ends hold(out): the lock file is removed while still locked (a run that opened it meanwhile tries again), and
    the folder if hold made it and a refused run left it empty."""
    f, made = HELD.pop(os.path.realpath(out), (None, False))
    if f is not None:
        with contextlib.suppress(OSError):
            os.remove(f.name)
        f.close()
        with contextlib.suppress(OSError):
            os.rmdir(out) if made else None


# ---- an adapter's base: what it was at export (base_identity.json in the adapter), checked when the adapter loads
BASE = "base_identity.json"


def base_identity(base):
    """model.identity of a local base; of a hub id, the snapshot the local cache holds (None: not cached)."""
    if os.path.isdir(base):
        return M.identity(base)
    cached = huggingface_hub.try_to_load_from_cache(base, "config.json")
    return {"model": base, "revision": cached.split(os.sep)[-2] if isinstance(cached, str) else None}


WARNED = set()


def check_base(adapter, base):
    """base, if it is what the adapter was trained on (an adapter exported before the record is not checked). A
    local base rebuilt or retrained in place since would give other numbers without a word: RunError naming what
    changed (not its path: a base moved and named anew in adapter_config.json is the same). A hub base whose cached
    snapshot is another, or unknown, cannot be checked: a warning."""
    file = os.path.join(adapter, BASE)
    if not os.path.isfile(file):
        return base
    try:
        with open(file, encoding="utf-8") as f:
            then = json.load(f)
    except (OSError, ValueError) as e:
        raise RunError(f"{file}: unreadable ({e}): export the adapter again, or delete the file to load it "
                       "unchecked") from None
    now = base_identity(base)
    changed = changes({k: v for k, v in then.items() if k not in ("model", "revision")},
                      {k: v for k, v in now.items() if k not in ("model", "revision")})
    if changed:
        raise RunError(f"{adapter}: its base {base} changed since the adapter was trained on it ({'; '.join(changed)}):"
                       f" restore that base or train the adapter again (the same weights copied anew? delete {file} "
                       "to load it unchecked)")
    if "revision" in now and (now["revision"] is None or now["revision"] != then.get("revision")) \
            and file not in WARNED:
        WARNED.add(file)
        print(f"warning: {adapter}: its base {base} is a hub model, checked by its snapshot alone: "
              f"{then.get('revision') or 'unknown'} at export, {now['revision'] or 'none in the local cache'} now; "
              "the adapter may load on other weights than it was trained on", file=sys.stderr)
    return base


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
    held = hold(out)  # before reading: another run may be writing the folder
    if held:
        raise RunError(held.removeprefix("error: "))
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
