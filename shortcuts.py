"""Exact shortcuts of train.py's step (`--shortcuts on`, the default): the same losses and gradients as
train.loss_parts, with less compute. Under --pgd-scope sample an image-heavy row's perturbed text follows its
image and the template's head, and causal attention keeps every position before it clean whatever delta is: PGD's
passes over such rows start at their first perturbed position, on the clean prefix's keys and values (M.prefix),
and without activation checkpointing the adversarial copies run on the clean pass's own prefix too.
test_prefix.py checks that both paths give the same numbers. And evaluate.py's: the rows of one image-heavy sample
(orig, uf, md) batched together (make_batches) share the vision tower and their common prefix (shared_logits;
test_share.py).
"""
import torch

import dataloader
import losses
import model as M
import perturb
import train as T


def pgd_passes(batch, attack, mask, args, world=1, family=""):
    """How the passes over the attacked rows (positions in `attack`) split: [(rows, start, weight)], the same kinds
    on every rank. Image-heavy rows' passes start at the first perturbed position of their kind (the first entry).
    A text-heavy row perturbs its image, which follows only the template's head: its passes are whole (start 0).
    A kind that another rank has and this one lacks is passed once more on a row of weight 0, as FSDP's
    collectives need."""
    tasks = [batch["tasks"][r] for r in attack]
    share = args.shortcuts == "on" and args.pgd_scope == "sample"
    kinds = [[i for i, t in enumerate(tasks) if share and t == "image_heavy"]]
    kinds.append([i for i in range(len(attack)) if i not in kinds[0]])
    present = torch.tensor([float(len(k) > 0) for k in kinds], device=batch["input_ids"].device)
    anywhere = T.all_sum(present) if world > 1 else present
    passes = []
    for reuse, rows, used in zip((share, False), kinds, anywhere.tolist()):
        if used:
            first = [int(mask[i].float().argmax()) for i in rows if mask[i].any()]
            start = min(first, default=1) if reuse else 0
            if reuse and start == 0:
                raise RuntimeError(f"{family}: a template that starts with the sample's text leaves nothing to "
                                   f"share (pass --shortcuts off)")
            passes.append((rows or [0], start, float(len(rows) > 0)))
    return passes


def loss_parts(step_model, batch, step, totals, args, prof):
    """train.loss_parts with the shortcuts: L_sft, L_adv and L_cons of one micro-batch."""
    hf_model, world = step_model.model, T.world_size()
    keys = step_model.keys
    embeds, image_mask = step_model(batch)
    prof.lap("embed")
    labels, n = batch["labels"], len(batch["labels"])
    keep = losses.answer_positions(labels)
    targets = labels[:, keep + 1]  # aligned with the kept logits
    mask = T.perturbable(batch, image_mask, args.pgd_scope)
    adv = T.adversarial_rows(mask, args.adv)
    attack = T.attack_rows(adv, args, embeds.device)
    if not attack:
        return T.losses_of(batch, step_model(batch, embeds, keep), targets, [], totals, args, prof)
    sub, base, sub_mask = M.rows_of(batch, attack, keys), embeds[attack].detach(), mask[attack]
    noise = dataloader.noise_like(base, [batch["ids"][r] for r in attack], args.seed, step, args.adv)
    prof.lap("noise")
    passes = pgd_passes(batch, attack, sub_mask, args, world, M.family(hf_model))
    prefix = None
    if passes[0][1] and not hf_model.is_activation_checkpointing:
        # the clean pass in two: its prefix, inside the graph, also serves the image-heavy rows' adversarial copies
        # (delta starts after it) and, detached, PGD's passes over them. Activation checkpointing drops a cache in
        # training (M.unchecked): under it PGD computes the prefix alone and the copies run whole.
        start = min(passes[0][1], int(keep.min()))
        prefix, last = step_model(M.rows_of(batch, range(n), keys), embeds, stop=start, grad=True)
        passes[0] = (passes[0][0], start, passes[0][2])
    width = sub["input_ids"].shape[1]
    prof.shortcut["covered"] += sum(len(rows) * (width - start) for rows, start, weight in passes if weight)
    prof.shortcut["whole"] += len(adv) * width
    prof.shortcut["final"] |= prefix is not None
    if args.adv == "pgd":  # gradients w.r.t. delta only: the attack leaves parameter .grad alone
        pasts = []  # the clean prefix's keys and values, each kind's: delta cannot reach them
        for rows, start, _ in passes:
            src = [attack[i] for i in rows]
            pasts.append(None if not start else step_model(M.rows_of(sub, rows, keys), base[rows], stop=start)
                         if prefix is None else [(k.detach()[src], v.detach()[src]) for k, v in prefix])
        prof.lap("prefix")
        calls = iter(range(1, args.pgd_steps + 1))

        def attacked(d):
            """L_adv's own normalisation (the global batch mean), each kind's passes from their start."""
            i = next(calls)
            if i > 1:
                prof.lap(f"pgd{i - 1}")  # the previous step's forward and backward w.r.t. delta
            loss = 0
            for (rows, start, weight), past in zip(passes, pasts):
                part = M.rows_of(sub, rows, keys)
                keep_ = losses.answer_positions(part["labels"])  # from `start` on: answers follow the sample's text
                out = step_model(part, (base + d)[rows, start:], keep_ - start, past)
                loss = loss + weight * losses.sft_loss(out, part["labels"][:, keep_ + 1], "sum", shift=False)
            return loss / totals[1]

        eps = losses.radius(base, sub_mask, args.eps, args.eps_scale)
        delta = losses.pgd(attacked, base, sub_mask, eps, args.alpha, args.pgd_steps, args.pgd_step, noise=noise,
                           stats=prof.notes)
        prof.lap(f"pgd{args.pgd_steps}")
    else:
        delta = losses.gaussian_noise(base, sub_mask, args.sigma, noise=noise)
    delta = dict(zip(attack, delta))
    targets = torch.cat([targets, targets[adv]])

    def with_copies(copies):  # the clean rows' embeddings, then the copies' perturbed (the clean graph kept:
        return torch.cat([embeds, *((embeds[r] + delta[r])[None] for r in copies)])  # L_adv trains the projector)

    if prefix is None:  # one pass over [clean; adversarial]
        rows = list(range(n)) + adv
        return T.losses_of(batch, step_model(M.rows_of(batch, rows, keys), with_copies(adv), keep), targets, adv,
                           totals, args, prof)
    # the clean rows and the image-heavy rows' adversarial copies on the clean prefix; the other copies whole
    start = passes[0][1]
    shared = [attack[i] for i in passes[0][0]] if passes[0][2] else []  # weight 0: a stand-in, not this kind
    rest = [r for r in adv if r not in shared]
    rows = list(range(n)) + shared
    logits = [step_model(M.rows_of(batch, rows, keys), with_copies(shared)[:, start:], keep - start,
                         [(k[rows], v[rows]) for k, v in prefix])]
    if len(passes) > 1:  # whole rows (one of weight 0 where this rank has none and another has)
        whole = rest or [0]
        logits.append(step_model(M.rows_of(batch, whole, keys),
                                 torch.stack([embeds[r] + delta.get(r, 0) for r in whole]), keep))
    out = torch.cat(logits)
    order = list(range(n)) + [n + shared.index(r) if r in shared else len(rows) + rest.index(r) for r in adv]
    sft, adv_loss, cons = T.losses_of(batch, out[order], targets, adv, totals, args, prof)
    return sft + (out.sum() + last.sum()) * 0, adv_loss, cons  # every pass in the graph, used or not


# ---- evaluation (evaluate.py --shortcuts) ----------------------------------------------------------------
def make_batches(jobs, batch_size, apply):
    """Jobs cut into batches by rendered length (little padding), an image-heavy sample's jobs (orig, uf, md: one
    image, other texts) kept together where batch_size allows, so that score() shares their image and prefix. The
    batches depend only on the data, never on the number of processes, so every process count computes the same
    numbers."""
    # size=1: only the text matters here, so canvases and random pixels are drawn 1 px wide
    length = [len(perturb.render(apply(*job, size=1))) for job in jobs]
    groups = {}
    for i, (s, _) in enumerate(jobs):
        groups.setdefault(("sample", s["id"]) if s["task"] == "image_heavy" else ("job", i), []).append(i)
    batches = []
    for group in sorted(groups.values(), key=lambda g: (max(length[i] for i in g), g[0])):
        for part in (group[k:k + batch_size] for k in range(0, len(group), batch_size)):
            if not batches or len(batches[-1]) + len(part) > batch_size:
                batches.append([])
            batches[-1] += part
    return batches


def shared_logits(model, samples, inputs, stop, keep):
    """score()'s logits, each distinct image through the vision tower once (M.embed_once) and the positions where
    an image-heavy sample's rows (orig, uf, md) have equal input embeddings and attention mask (compared: not so
    for InstructBLIP, whose query tokens read the instruction) through the language model once a sample: the rest
    of each row runs on top of their keys and values (M.prefix), from one position for the whole batch (the least,
    and before every row's last token) so that the prefix and the rest are a pass each.
    Text-heavy interventions (rp, ri, fb, fw) share the text but change the image, which comes before the text in
    every template: their rows agree on the template's first tokens only, so their text is computed once per row
    (it attends to another image in each), a whole pass a row; only the vision tower is shared where the pixels
    are (orig and rp: the same random pixels; fb and fw: the same canvas for every sample)."""
    embeds, _ = M.embed_once(model, inputs)
    first = {}
    rep = [first.setdefault(s["id"], r) if s["task"] == "image_heavy" else r for r, s in enumerate(samples)]
    mask = inputs["attention_mask"]
    same = (embeds == embeds[rep]).all(-1) & (mask == mask[rep])  # (B, L): agrees with its sample's first row
    start = min(stop, int(same.int().cumprod(1).sum(1).min()))
    if start == 0 or rep == list(range(len(rep))):  # nothing shared, or no one to share with
        return M.logits(model, embeds, inputs, keep)
    reps = sorted(set(rep))
    past = M.prefix(model, embeds[reps], {k: inputs[k][reps] for k in M.FAMILIES[M.family(model)]["lm_keys"]}, start)
    index = torch.tensor([reps.index(q) for q in rep], device=embeds.device)
    past = [(k.index_select(0, index), v.index_select(0, index)) for k, v in past]
    return M.logits(model, embeds[:, start:], inputs, keep, past)
