"""The experimental hook path of bench.py (issue 17): delta added to the hidden states entering the language
model's first decoder layer, under the model's own full forward, against today's M.embed + M.logits.
  python -m pytest -q test_hook.py
"""
import pytest
import torch
from PIL import Image

import bench
import losses
import model as M
import prompts as P
from model import make_tiny
from profiling import Profile

FAMILIES = ["llava", "qwen2.5-vl", "instructblip"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root, cache = tmp_path_factory.mktemp("hook"), {}

    def get(fam):
        if fam not in cache:
            m, p = M.load(make_tiny(fam, str(root / fam)))
            cache[fam] = (m.eval(), p)
        return cache[fam]
    return get


def _samples():
    red, blue = Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("RGB", (30, 40), (10, 10, 200))
    return [
        dict(id="img", task="image_heavy", image=red, question="What is shown in the image ?",
             options=["red", "blue", "green", "shape"], answer=2, source="toy"),
        dict(id="txt", task="text_heavy", image=None, question="How many is 2 ?", options=["2", "3"], answer=0,
             source="toy"),
        dict(id="vqa", task="vqa", image=blue, question="Which color is this shape in the picture of the main "
             "object ?", options=["red", "blue", "green"], answer=1, source="toy"),
        dict(id="img-2", task="image_heavy", image=blue, question="What is shown ?", options=["red", "blue"],
             answer=1, source="toy"),
    ]


def image_rows(batch, rows):
    """Some rows of a collated batch, image inputs included (a pass under the hook runs the vision tower, so unlike
    model.rows_of it needs them). Qwen's pixel_values are patches of all images end to end,
    image_grid_thw.prod(-1) of them per image (one image a row): the one family-specific line it takes."""
    idx, n = torch.tensor(rows), len(batch["input_ids"])
    out = {k: [v[r] for r in rows] if isinstance(v, list) else v[idx] for k, v in batch.items()
           if isinstance(v, list) or v.shape[0] == n}
    if "image_grid_thw" in batch:
        patches = batch["pixel_values"].split(batch["image_grid_thw"].prod(-1).tolist())
        out["pixel_values"] = torch.cat([patches[r] for r in rows])
    return out


def cat_batches(a, b):
    return {k: a[k] + b[k] if isinstance(a[k], list) else torch.cat([a[k], b[k]]) for k in a}


@pytest.mark.parametrize("fam", FAMILIES)
def test_hook_path_gives_todays_logits_losses_and_delta_gradient(tiny, fam):
    m, p = tiny(fam)
    batch = P.collate(p, _samples())
    labels, n = batch["labels"], len(batch["labels"])
    with torch.no_grad():
        embeds, image_mask = M.embed(m, batch)
    mask = losses.modality_mask(batch["tasks"], image_mask, labels, batch["attention_mask"])
    adv = [r for r in range(n) if mask[r].any()]
    assert adv == [0, 1, 3]  # rows 0 and 3 (image-heavy: text) and 1 (text-heavy: image tokens); not the VQA row
    g = torch.Generator().manual_seed(0)
    delta = 0.5 * torch.randn(embeds.shape, generator=g) * mask[..., None]  # large enough to move the logits

    # logits: the whole model under the hook equals the language model on perturbed merged embeddings
    with torch.no_grad():
        today = M.logits(m, embeds + delta, batch)
        hook = bench.hook_logits(m, batch, delta)
        clean = bench.hook_logits(m, batch, torch.zeros_like(delta))
        own = m(**M.model_inputs(batch)).logits
    assert torch.allclose(hook, today, atol=1e-5, rtol=0)
    assert torch.allclose(clean, own, atol=1e-5, rtol=0)  # the hook is gone after each call, delta 0 is a no-op
    assert (hook - clean).abs().max() > 1e-2  # delta reached the language model

    # L_sft + L_adv as train.py's loss_parts forms them: one pass over [clean; adversarial rows], kept positions
    keep = (labels[:, 1:] != losses.IGNORE).any(0).nonzero().flatten()
    targets = labels[:, keep + 1]
    targets = torch.cat([targets, targets[adv]])

    def total(logits):
        return losses.sft_loss(logits[:n], targets[:n], shift=False) + losses.sft_loss(logits[n:], targets[n:],
                                                                                        shift=False)

    d_today = delta[adv].clone().requires_grad_(True)
    sub = image_rows(batch, adv)
    loss_today = total(M.logits(m, torch.cat([embeds, embeds[adv] + d_today]), cat_batches(batch, sub), keep))
    (grad_today,) = torch.autograd.grad(loss_today, d_today)
    d_hook = delta[adv].clone().requires_grad_(True)
    full = cat_batches(batch, sub)
    assert full["input_ids"].shape[0] == n + len(adv) and full["tasks"][n:] == [batch["tasks"][r] for r in adv]
    loss_hook = total(bench.hook_logits(m, full, torch.cat([torch.zeros_like(embeds), d_hook]), keep))
    (grad_hook,) = torch.autograd.grad(loss_hook, d_hook)
    assert abs(loss_hook.item() - loss_today.item()) < 1e-5
    assert torch.allclose(grad_hook, grad_today, atol=1e-5, rtol=0)
    assert grad_today[mask[adv]].abs().max() > 1e-4  # a gradient that could differ


def test_image_rows_picks_each_rows_own_qwen_patches(tiny):
    m, p = tiny("qwen2.5-vl")
    batch = P.collate(p, _samples())
    sub = image_rows(batch, [3, 0])
    alone = P.collate(p, [_samples()[3], _samples()[0]])
    width = alone["input_ids"].shape[1]
    assert torch.equal(sub["pixel_values"], alone["pixel_values"])
    assert torch.equal(sub["image_grid_thw"], alone["image_grid_thw"])
    assert torch.equal(sub["input_ids"][:, :width], alone["input_ids"]) and sub["tasks"] == ["image_heavy"] * 2


def test_real_shape_vision_share_is_a_few_percent_of_a_llava_forward():
    # independent count for LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px (24 layers, 1024 wide, MLP 4096, 577 tokens),
    # projector 1024 -> 4096 -> 4096 over 576 features; Vicuna-7B (32 layers, 4096 wide, gated MLP 11008) over 700
    vision = 24 * (2 * 577 * (4 * 1024 ** 2 + 2 * 1024 * 4096) + 4 * 577 ** 2 * 1024) \
        + 2 * 576 * (1024 * 4096 + 4096 ** 2)
    llm = 32 * (2 * 700 * (4 * 4096 ** 2 + 3 * 4096 * 11008) + 4 * 700 ** 2 * 4096)
    share, v, l = bench.vision_share("llava-1.5-7b", 700)
    assert (v, l) == (vision, llm)
    assert share == pytest.approx(vision / (vision + llm)) and 0.03 < share < 0.05


def test_hook_path_delta_gradient_survives_activation_checkpointing(tiny):
    # transformers 5 checkpoints a layer's forward, not its __call__, so the hook runs once, outside the checkpoint,
    # and the backward's recompute (after the hook is gone) starts from hidden_states + delta
    m, p = tiny("llava")
    batch = P.collate(p, _samples())
    with torch.no_grad():
        embeds, image_mask = M.embed(m, batch)
    mask = losses.modality_mask(batch["tasks"], image_mask, batch["labels"], batch["attention_mask"])
    delta = 0.5 * torch.randn(embeds.shape, generator=torch.Generator().manual_seed(1)) * mask[..., None]

    def grad():
        d = delta.clone().requires_grad_(True)
        return torch.autograd.grad(losses.sft_loss(bench.hook_logits(m, batch, d), batch["labels"]), d)[0]

    M.train_mode(m)  # checkpointing acts in training mode only
    try:
        plain = grad()
        m.activation_checkpointing_enable({"use_reentrant": False})
        assert m.get_decoder().layers[0].gradient_checkpointing
        checkpointed = grad()
    finally:
        m.activation_checkpointing_disable()
        m.eval()
    assert torch.allclose(checkpointed, plain, atol=1e-6, rtol=0) and plain.abs().max() > 1e-4


def test_bench_runs_both_paths_through_trains_own_step(tiny):
    """bench.py --hook times train.loss_parts itself, with the hook path as a drop-in Step (bench.HookStep): on
    one `ours` micro-batch (PGD of the paper's T over the whole template, no L_cons) both give the same L_sft and
    L_adv, and the hook path's are not zero."""
    import train
    m, p = tiny("llava")
    batch = P.collate(p, _samples())
    batch["ids"], batch["pairs"] = [s["id"] for s in _samples()], []
    args = train.parse(["--cons", "none", "--pgd-scope", "template", "--eps", "0.05"])
    totals = train.token_counts(batch, m.config.image_token_id, args)
    today = train.loss_parts(train.Step(m), batch, 0, totals, args, Profile())
    hook = train.loss_parts(bench.HookStep(m), batch, 0, totals, args, Profile())
    for a, b in zip(today[:2], hook[:2]):
        assert a.item() == pytest.approx(b.item(), rel=1e-5) and b.item() > 0
    laps = dict.fromkeys(("embed", "pgd", "forward", "backward"), 0.0)
    assert bench.ours_pass(bench.HookStep(m), batch, args, laps) == pytest.approx(sum(t.item() for t in hook[:2]),
                                                                                  rel=1e-5)
    assert all(v > 0 for k, v in laps.items() if k != "embed")
