"""Worst-case delta_cp: an L-inf PGD attack at evaluation, in the input-embedding space, on the positions training may
perturb (the sample's own text of an image-heavy row, the image tokens of a text-heavy row), maximising the loss of
the model's own clean prediction over the option letters. evaluate.py --attack-eps writes one row per radius
("attack@0.01") beside the heuristic interventions' (docs/evaluation.md, 'Worst case').
  python evaluate.py --model out/toy/vanilla --data data/toy/test.jsonl --out out/eval --attack-eps 1e-3 3e-3 1e-2
"""
import math

import torch

import dataloader
import losses
import model as M
import perturb
import prompts as P
import train as T
from checkpoint import RunError
from shortcuts import make_batches


def arguments(p):
    """evaluate.py's flags of the attack."""
    p.add_argument("--attack-eps", type=float, nargs="+", metavar="EPS", help="also attack each image- and "
                   "text-heavy sample at these L-inf radii (rows 'attack@EPS': sign-PGD on the task-irrelevant "
                   "modality's input embeddings, target the clean prediction; --score logits only)")
    p.add_argument("--attack-steps", type=int, help="with --attack-eps: PGD steps, one forward and backward each "
                   "(default 10)")
    p.add_argument("--attack-alpha", type=float, help="with --attack-eps: the step size as a share of the radius "
                   "(default 0.25: 8 sign steps cross the ball)")
    p.add_argument("--attack-scale", choices=["none", "std"], help="with --attack-eps: std makes each radius a share "
                   "of the row's embedding std over the attacked positions (train.py --eps-scale std; rows "
                   "'attack@EPSstd'), so that one radius means as much to text as to image tokens")


def settings(eps=None, steps=None, alpha=None, scale=None):
    """The attack's settings as run.json records them (None: no attack): the radii as their rows' names spell them;
    scale only when relative (run.json of absolute radii as before)."""
    if eps is None and steps is None and alpha is None and scale is None:
        return None
    return dict(eps=eps and sorted({float(f"{e:g}") for e in eps}), steps=10 if steps is None else steps,
                alpha=0.25 if alpha is None else alpha, **({"scale": scale} if scale not in (None, "none") else {}))


def problem(attack, scoring):
    """The line refusing the attack's settings, or None (the model's family is evaluate.run's to check)."""
    if not attack:
        return None
    if not attack["eps"]:
        return "--attack-steps, --attack-alpha and --attack-scale are options of --attack-eps, which names the radii"
    if not all(0 < e < math.inf for e in attack["eps"]) or attack["steps"] < 1 or not 0 < attack["alpha"] < math.inf:
        return (f"--attack-eps {' '.join(f'{e:g}' for e in attack['eps'])} --attack-steps {attack['steps']} "
                f"--attack-alpha {attack['alpha']:g}: radii and step size must be finite, above 0; steps at least 1")
    if scoring != "logits":
        return "--attack-eps needs --score logits: the attack raises the loss of the option letters' logits"
    return None


def jobs(jobs, attack):
    """evaluate's (sample, intervention) jobs with an attack job per radius after each image- or text-heavy
    sample's own (data order kept)."""
    if not attack:
        return jobs
    by = {}
    for s, n in jobs:
        by.setdefault(s["id"], []).append((s, n))
    names = [perturb.attack_name(e, attack.get("scale", "none")) for e in attack["eps"]]
    out = [j for group in by.values() for j in group + [(group[0][0], n) for n in names
                                                         if group[0][0]["task"] in perturb.ATTACKED]]
    if len(out) == len(jobs):
        raise RunError("--attack-eps: the data has no image- or text-heavy sample (VQA has no task-irrelevant "
                       "modality to attack)")
    return out


def batches(jobs, batch_size, apply):
    """shortcuts.make_batches of the attack jobs (their own batches: scored otherwise), then of the intervention
    jobs, whose longest evaluate runs first. Both depend on the data alone, so every process count and every resume
    attack the same batches."""
    parts = [[i for i, (_, n) in enumerate(jobs) if (perturb.attack_radius(n) is None) == plain]
             for plain in (False, True)]
    return [[part[k] for k in b] for part in parts for b in make_batches([jobs[i] for i in part], batch_size, apply)]


def sample_mask(processor, samples, batch, style="ours"):
    """(B, L) bool: each row's own sample text, as prompts.collate marks it for training (evaluate's prompts are
    collated without it)."""
    width = batch["input_ids"].shape[1]
    return torch.cat([P.sample_positions(processor, P.prompt_text(processor, s, False, style), s,
                                         ids[:int(n)], width, style)
                      for s, ids, n in zip(samples, batch["input_ids"], batch["attention_mask"].sum(1))])


def perturbation(model, batch, letters, eps, steps=10, alpha=0.25, noise=None, scale="none"):
    """The attack on a batch (on the model's device, with tasks, labels and sample_mask): a dict of
    mask (B, L): the positions it may change, train.perturbable's under --pgd-scope sample;
    delta (B, L, D): each row's strongest point of losses.pgd's sign steps (the usual L-inf PGD: eq. 7's raw gradient
    barely moves at small radii), the start and the last point included, |delta| <= eps, 0 outside the mask; clean
    and probs (B, K): the distributions over each row's option letters (`letters`: its token ids) without and with
    delta, 0 past its options; target (B): the clean argmax,
    whose cross-entropy the attack raises (label-free: it measures the flips delta_cp counts, whatever the
    answers); loss (B): that cross-entropy at delta. eps: a radius, or one per row, and with scale "std" a share of each
    row's std over its masked embeddings (losses.radius); alpha: a share of the radius.
    noise: the standard normal draw of the random start (default: losses.pgd's own)."""
    with torch.no_grad():
        embeds, image_mask = M.embed(model, batch)
    mask = T.perturbable(batch, image_mask, "sample")
    last = batch["attention_mask"].sum(1) - 1  # right padding: the prompt's last token
    width, rows = embeds.shape[1], torch.arange(len(letters), device=embeds.device)
    keep = width - int(last.min())
    k = max(map(len, letters))
    ids = torch.tensor([list(q) + [q[0]] * (k - len(q)) for q in letters], device=embeds.device)
    valid = torch.tensor([[j < len(q) for j in range(k)] for q in letters], device=embeds.device)

    def log_probs(delta):  # over each row's letters, from the next-token logits after its prompt
        out = M.logits(model, embeds + delta, batch, keep)[rows, last - (width - keep)].float()
        return torch.log_softmax(out.gather(1, ids).masked_fill(~valid, -torch.inf), -1)

    with torch.no_grad():
        clean = log_probs(torch.zeros_like(embeds))
    target = clean.argmax(-1)
    best = dict(loss=torch.full_like(clean[:, 0], -torch.inf), delta=torch.zeros_like(embeds), log_probs=clean)

    def objective(d):
        """The summed cross-entropy (each row's gradient its own, whatever the batch), each row's best delta kept."""
        out = log_probs(d)
        loss = -out[rows, target]
        better = loss.detach() > best["loss"]
        best.update(loss=torch.where(better, loss.detach(), best["loss"]),
                    delta=torch.where(better[:, None, None], d.detach(), best["delta"]),
                    log_probs=torch.where(better[:, None], out.detach(), best["log_probs"]))
        return loss.sum()

    radius = torch.as_tensor(eps, dtype=embeds.dtype, device=embeds.device).reshape(-1, 1, 1)
    radius = losses.radius(embeds, mask, radius, scale)
    with torch.enable_grad():
        delta = losses.pgd(objective, embeds, mask, radius, alpha * radius, steps, "sign", noise=noise)
    with torch.no_grad():
        objective(delta)  # the last step's point: one forward
    return dict(mask=mask, delta=best["delta"], clean=clean.exp(), probs=best["log_probs"].exp(), target=target,
                loss=best["loss"])


def start(model, batch, ids, names, seed=0):
    """The standard normal draw of each row's random start (B, L, D), per (seed, sample id, attack name): the same
    in any batch, on any rank (dataloader.noise_like; padding only adds positions at the end)."""
    like = torch.zeros(1, batch["input_ids"].shape[1], model.get_input_embeddings().embedding_dim,
                       device=batch["input_ids"].device, dtype=model.get_input_embeddings().weight.dtype)
    return torch.cat([dataloader.noise_like(like, [i], seed, "attack", n) for i, n in zip(ids, names)])


def found(model, processor, samples, names, batch, letter_ids, attack, seed=0, style="ours"):
    """evaluate.py's results of a batch of attack jobs (samples under orig, their attack names): probs of the
    attacked input, pred and eps per row. The random start is drawn per (seed, sample id, radius): a row's attack
    is the same in any batch, on any rank."""
    device = next(model.parameters()).device
    batch = dict(batch, sample_mask=sample_mask(processor, samples, batch, style))
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    eps = [perturb.attack_radius(n) for n in names]
    (scale,) = {perturb.attack_scale(n) for n in names}  # the names spell it; one run, one scale
    out = perturbation(model, batch, [letter_ids[:len(s["options"])] for s in samples], eps, attack["steps"],
                       attack["alpha"], start(model, batch, [s["id"] for s in samples], names, seed), scale)
    probs = out["probs"].cpu()
    return [dict(probs=probs[r, :len(s["options"])].tolist(), pred=int(probs[r, :len(s["options"])].argmax()),
                 eps=e) for r, (s, e) in enumerate(zip(samples, eps))]
