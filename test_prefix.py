"""Exact shortcuts (issue 18): a pass over the end of the rows on top of the clean prefix's keys and values
(model.prefix, model.logits(..., past=)) gives the numbers of a pass over the whole rows, and train.py's
--shortcuts on (PGD's passes over image-heavy rows start at their first perturbed position) changes no loss,
gradient norm or trained weight of a step.
  python -m pytest -q test_prefix.py
"""
import pytest
import torch
from PIL import Image

import losses
import model as M
import prompts as P
import shortcuts
import train
from test_train import _metrics, _train, _weights, toy  # noqa: F401 (one session-scoped toy world)
from model import make_tiny

FAMILIES = ["llava", "qwen2.5-vl", "instructblip"]


def _samples():
    """Image-heavy rows of different lengths (so the batch is right-padded), each with its answer."""
    red, blue = Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("RGB", (30, 40), (10, 10, 200))
    return [dict(id="a", task="image_heavy", image=red, question="What is shown in the image ?",
                 options=["red", "blue", "green", "shape"], answer=2, source="toy"),
            dict(id="b", task="image_heavy", image=blue, question="What is shown ?", options=["red", "blue"],
                 answer=1, source="toy"),
            dict(id="c", task="image_heavy", image=blue, question="Which color is this shape in the picture of "
                 "the main object ?", options=["red", "blue", "green"], answer=0, source="toy")]


@pytest.mark.parametrize("fam", FAMILIES)
def test_a_pass_on_the_prefix_cache_gives_the_whole_pass_logits_loss_and_delta_gradient(tmp_path, fam):
    m, p = M.load(make_tiny(fam, str(tmp_path / fam)))  # docs/format.md, 'Model functions'
    m.activation_checkpointing_enable({"use_reentrant": False})  # would drop the cache silently (M.unchecked)
    M.train_mode(m)
    batch = P.collate(p, _samples())
    assert len(set(batch["attention_mask"].sum(1).tolist())) == 3  # three lengths: padded rows
    with torch.no_grad():
        embeds, image_mask = M.embed(m, batch)
    mask = losses.modality_mask(batch["tasks"], image_mask, batch["labels"], batch["attention_mask"],
                                batch["sample_mask"])
    start = int(mask.float().argmax(1).min())  # the first perturbed position of any row
    assert 0 < start and not mask[:, :start].any() and image_mask[:, :start].all(1).tolist() == [False] * 3
    assert image_mask[:, :start].any(1).all()  # every row's image is in the prefix
    delta = 0.5 * torch.randn(embeds.shape, generator=torch.Generator().manual_seed(0)) * mask[..., None]
    keep = (batch["labels"][:, 1:] != losses.IGNORE).any(0).nonzero().flatten()
    targets = batch["labels"][:, keep + 1]
    assert int(keep.min()) >= start

    whole = delta.clone().requires_grad_(True)
    logits = M.logits(m, embeds + whole, batch, keep)
    loss = losses.sft_loss(logits, targets, "sum", shift=False)
    (grad,) = torch.autograd.grad(loss, whole)

    past = M.prefix(m, embeds, batch, start)
    assert len(past) == m.config.get_text_config().num_hidden_layers and past[0][0].shape[2] == start
    short = delta.clone().requires_grad_(True)
    logits_s = M.logits(m, (embeds + short)[:, start:], batch, keep - start, past)
    loss_s = losses.sft_loss(logits_s, targets, "sum", shift=False)
    (grad_s,) = torch.autograd.grad(loss_s, short)
    assert torch.allclose(logits_s, logits, atol=1e-5, rtol=0) and abs(loss_s.item() - loss.item()) < 1e-5
    assert torch.allclose(grad_s * mask[..., None], grad * mask[..., None], atol=1e-5, rtol=0)
    assert grad.abs().max() > 1e-3 and not grad_s[:, :start].any()  # the prefix is out of delta's reach

    with torch.no_grad():  # the control: another prefix under the same suffix gives other logits (it is read)
        other = M.prefix(m, embeds + 0.5 * torch.randn(embeds.shape, generator=torch.Generator().manual_seed(1)),
                         batch, start)
        assert (M.logits(m, (embeds + delta)[:, start:], batch, keep - start, other) - logits_s).abs().max() > 1e-3
    positions = M.FAMILIES[fam].get("positions")  # Qwen's M-RoPE positions are not the cache's count
    assert positions is None or not torch.equal(positions(m, batch)[0, :, start:], torch.arange(
        start, batch["input_ids"].shape[1]).expand(len(batch["tasks"]), -1))

@pytest.mark.parametrize("checkpointing", [True, False])
@pytest.mark.parametrize("fam", FAMILIES)
def test_shortcuts_change_no_loss_gradient_or_weight_of_a_step(toy, tmp_path, monkeypatch, fam, checkpointing):
    """train.py --shortcuts on/off, two steps of `ours`, a PGD radius large enough to move the losses: the same
    numbers, and the shortcut was taken (image-heavy passes start late), with activation checkpointing (which
    would drop the cache: model.unchecked) and without."""
    data, models = toy
    common = ["--model", models[fam], "--data", data, "--max-steps", "2", "--lr", "1e-3", "--eps", "0.05",
              "--save-every", "0", "--activation-checkpointing" if checkpointing else "--no-activation-checkpointing"]
    runs = {s: _train(common + ["--out", str(tmp_path / s), "--shortcuts", s], monkeypatch) for s in ("on", "off")}
    g = runs["on"]
    batch = g["batches"](0)[0]
    image = batch["input_ids"] == g["hf_model"].config.image_token_id
    mask = train.perturbable(batch, image, "sample")
    attack = train.adversarial_rows(mask, "pgd")
    passes = shortcuts.pgd_passes(batch, attack, mask[attack], g["args"])
    assert [(start > 0, [batch["tasks"][attack[i]] for i in rows]) for rows, start, _ in passes] == \
        [(True, ["image_heavy"] * 4), (False, ["text_heavy"] * 4)]  # 2 originals + their twins each
    assert shortcuts.pgd_passes(batch, attack, mask[attack], runs["off"]["args"]) == [(list(range(8)), 0, 1.0)]
    on, off = _metrics(tmp_path / "on"), _metrics(tmp_path / "off")
    for a, b in zip(on, off, strict=True):
        for k in ("loss", "sft", "adv", "cons", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), (k, a, b)
    w_on, w_off = _weights(tmp_path / "on"), _weights(tmp_path / "off")
    assert all(torch.allclose(w_on[k], w_off[k], atol=1e-6, rtol=0) for k in w_on)
