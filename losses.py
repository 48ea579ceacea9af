"""The paper's losses as pure functions of tensors: SFT cross-entropy, KL/JS/MSE consistency (eq. 9),
masked PGD in the input-embedding space (eq. 7), random Gaussian noise (the RG ablation) and the
modality mask that says which positions a perturbation may touch. No model code lives here.
Read next to arXiv 2505.19616, section 4.
"""
import math

import torch
import torch.nn.functional as F

IGNORE = -100  # label value of every position that is not an answer token


def sft_loss(logits, labels, reduction="mean", shift=True):
    """Cross-entropy over answer tokens ("mean" or "sum").  logits (B, L, V), labels (B, L).
    shift: logits at t predict the label at t + 1 (a causal LM's own layout); without it, logits and
    labels are already aligned (logits computed only where an answer token is predicted)."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction=reduction)


def answer_positions(labels):
    """Positions whose next token is an answer token in some row: the only logits any loss needs."""
    return (labels[:, 1:] != IGNORE).any(0).nonzero().flatten()


def answer_logits(logits, labels, shift=True):
    """Logits that predict each answer token, left-aligned: (B, L, V) -> (B, A, V) and a (B, A) mask.
    A perturbation can shift positions (UF and MD prepend text), so pairs are aligned by answer order."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    target = labels != IGNORE
    counts = target.sum(1)
    A = int(counts.max()) if counts.numel() else 0
    out = logits.new_zeros(logits.shape[0], A, logits.shape[-1])
    mask = torch.arange(A, device=labels.device)[None, :] < counts[:, None]
    out[mask] = logits[target]
    return out, mask


def kl(lo, lp, tau):
    """eq. (9): KL(p || q) per answer token, p = softmax(l_orig / tau), q = softmax(l_pert / tau)."""
    logp, logq = F.log_softmax(lo / tau, -1), F.log_softmax(lp / tau, -1)
    return (logp.exp() * (logp - logq)).sum(-1)


def js(lo, lp, tau):
    """0.5 KL(p || m) + 0.5 KL(q || m), m = (p + q) / 2; symmetric and bounded by ln 2."""
    logp, logq = F.log_softmax(lo / tau, -1), F.log_softmax(lp / tau, -1)
    logm = torch.logsumexp(torch.stack([logp, logq]), 0) - math.log(2)
    return 0.5 * (logp.exp() * (logp - logm)).sum(-1) + 0.5 * (logq.exp() * (logq - logm)).sum(-1)


def mse(lo, lp, tau):
    """1/V sum_v (l_pert,v - l_orig,v)^2 on the raw logits; tau does not enter (it would only rescale the loss, as
    lambda_cons does). The authors' MSE takes the final hidden states h instead (mean over D); logits are W h (no
    bias in these LM heads), so both vanish together and differ only in weighting h's directions by what the head
    reads out, and logits are all our pass computes at answer positions."""
    return (lp - lo).pow(2).mean(-1)


# The consistency kinds, each a divergence per answer token (N, A, V) x 2 -> (N, A): a new kind is a row here, and
# train.py --cons offers every row
CONSISTENCY = {"kl": kl, "js": js, "mse": mse}


def consistency(logits_orig, logits_pert, kind="js", tau=1.0, mask=None, reduction="mean"):
    """Consistency between answer distributions of an original and a perturbed input.  (N, A, V) each.
    kind: a row of CONSISTENCY. The original side is a detached target (as in the authors' code): the model is
    pulled towards its clean answer under perturbation, never the clean answer towards the perturbed one.
    mask (N, A) marks valid answer tokens; the value is the mean (or "sum") over them."""
    if kind not in CONSISTENCY:
        raise ValueError(f"consistency kind must be one of {', '.join(CONSISTENCY)}, got {kind!r}")
    per_token = CONSISTENCY[kind](logits_orig.detach().float(), logits_pert.float(), tau)
    if mask is not None:
        per_token = per_token[mask.bool()]
    return per_token.sum() if reduction == "sum" else per_token.sum() / max(per_token.numel(), 1)


# PGD's step from the gradient g w.r.t. delta: eq. 7's raw g (the authors' too; docs/training.md: it barely moves
# delta), its sign (L-inf PGD's usual step) or g over its L2 norm per row (FreeLB's): both move by alpha at any scale
STEPS = {"raw": lambda g: g, "sign": torch.sign,
         "l2": lambda g: g / g.flatten(1).norm(dim=1).clamp(min=1e-30)[:, None, None]}


def radius(embeds, mask, eps, scale="none"):
    """eps, or with scale "std" eps times each row's std over its perturbed embeddings (B, 1, 1): one eps is then the
    same share of a text row's scale (~0.02 at init) and an image row's (~0.3)."""
    if scale == "none":
        return eps
    m = mask[..., None].to(embeds.dtype)
    n = (m.sum((1, 2)) * embeds.shape[-1]).clamp(min=1)
    mean = (embeds * m).sum((1, 2)) / n
    return eps * (((embeds - mean[:, None, None]) ** 2 * m).sum((1, 2)) / n).sqrt()[:, None, None]


def pgd(loss_fn, embeds, mask, eps=1e-3, alpha=0.1, steps=2, rule="raw", generator=None, noise=None, stats=None):
    """Masked L-inf PGD in embedding space; returns delta (B, L, D), |delta| <= eps, 0 where mask is False.
    loss_fn(delta) -> scalar to maximise; it should add delta to DETACHED embeddings, so that the
    attack neither frees nor extends the graph of the clean pass. Only delta gets a gradient
    (torch.autograd.grad), so parameter .grad fields are left as they were. rule: a row of STEPS. eps: a number or
    (B, 1, 1) (radius()). noise: the standard normal draw behind the init, if the caller wants it per sample
    (dataloader.noise_like; default: drawn here from `generator`). stats: a dict that gets "pgd_move", how far the
    steps moved delta from its start, as a share of eps (mean over the perturbed elements; 1: centre to edge)."""
    m = mask[..., None].to(embeds.dtype)                                          # (B, L, 1)
    if noise is None:
        noise = torch.randn(embeds.shape, generator=generator, device=embeds.device, dtype=embeds.dtype)
    start = delta = torch.clamp(noise * eps, -eps, eps) * m                       # init N(0, eps^2), projected
    for _ in range(steps):
        delta.requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(delta), delta)
        delta = (torch.clamp(delta.detach() + alpha * STEPS[rule](grad), -eps, eps) * m).detach()  # eq. (7)
    if stats is not None:  # start.detach(): start is the tensor the first step set requires_grad on
        moved = (delta - start.detach()).abs() / torch.as_tensor(eps, dtype=embeds.dtype).clamp(min=1e-30) * m
        stats.setdefault("pgd_move", []).append(moved.sum() / (m.sum() * embeds.shape[-1]).clamp(min=1))
    return delta


def gaussian_noise(embeds, mask, sigma=0.05, generator=None, noise=None):
    """The RG ablation: delta ~ N(0, sigma^2) on the masked positions, zero elsewhere.  (B, L, D)"""
    if noise is None:
        noise = torch.randn(embeds.shape, generator=generator, device=embeds.device, dtype=embeds.dtype)
    return noise * sigma * mask[..., None].to(embeds.dtype)


def modality_mask(tasks, image_mask, labels, attention_mask=None, sample=None):
    """Which positions belong to the task-irrelevant modality, (B, L) bool.
    image_heavy: the text (never answer positions, which carry the supervision, nor padding);
    text_heavy: the image tokens; vqa: nothing, since both modalities matter.
    sample (B, L) bool, optional: the positions of each sample's own rendered text (question, options,
    instruction: prompts.collate's `sample_mask`). Given, an image-heavy row's text is narrowed to them, so
    the chat template's scaffolding (BOS, "USER:", Qwen's system prompt) stays clean: the paper perturbs
    X_T, the sample's text, which is also all the heuristic interventions change; and with the image and
    the template before the text, the positions before the first perturbed one are the clean pass's.
    Left out, every non-answer text position counts, the template's included: the authors' choice
    (train.py --pgd-scope template)."""
    text = ~image_mask & (labels == IGNORE)
    if attention_mask is not None:
        text &= attention_mask.bool()
    if sample is not None:
        text &= sample.bool()
    rows = []
    for task, t, i in zip(tasks, text, image_mask):
        if task == "image_heavy":
            rows.append(t)
        elif task == "text_heavy":
            rows.append(i.clone())
        elif task == "vqa":
            rows.append(torch.zeros_like(i))
        else:
            raise ValueError(f"unknown task {task!r}: expected image_heavy, text_heavy or vqa")
    return torch.stack(rows)
