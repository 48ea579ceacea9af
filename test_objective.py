"""The objective of train.py (eq. 10: L = L_sft + L_adv + lambda_cons * L_cons) against computations written here:
each term from the model's own logits, divided by answer tokens counted here; the noise of RG, the pairs of L_cons,
the divergences in float64; the gradient of the total; the lr of each logged step; MD on fully described options.
  python -m pytest -q test_objective.py
"""
import hashlib
import math

import pytest
import torch
import torch.nn.functional as F

import checks
import dataloader
import losses
import model as M
import perturb
import prompts as P
import shortcuts
import train
from profiling import Profile
from test_train import _metrics, _train, toy  # noqa: F401 (one session-scoped toy world)


def _setup(toy, *flags, fam="llava"):  # noqa: F811
    """(args, Step over a plain un-sharded model, step 0's first micro-batch) of a run with these flags."""
    data, models = toy
    args = train.parse(["--model", models[fam], "--data", data, "--batch-size", "4", "--seed", "7", *flags])
    paths, samples, _ = dataloader.read(args)
    schedule = dataloader.Schedule(args, samples, 1, paths)
    model, processor = M.load(models[fam], dtype=torch.float32)
    M.train_mode(M.freeze(model))
    torch.manual_seed(0)
    batches = dataloader.Batches(args, schedule, processor, P.image_size(processor), checks.facts(args)[0],
                                 perturb.ri_pool(samples, None))
    return args, train.Step(model), batches(0)[0]


def _parts(args, step_model, batch):
    totals = train.token_counts(batch, step_model.model.config.image_token_id, args)
    return train.loss_parts(step_model, batch, 0, totals, args, Profile()), totals


def _answers(labels):
    """(row, position) of every logit that predicts an answer token: labels shifted by one, in order."""
    return [tuple(rt) for rt in (labels[:, 1:] != -100).nonzero().tolist()]  # row-major: each row's in order


def _ce(logits, labels, rows):
    """Summed cross-entropy over the answer tokens of `rows` (logits of row i of `logits` for row rows[i])."""
    lab = labels[rows]
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), lab[:, 1:].flatten(), ignore_index=-100, reduction="sum")


def _mask(batch, image):
    """The task-irrelevant positions, per task, as the paper says: an image-heavy row's own text (sample_mask, no
    answer, no padding), a text-heavy row's image tokens, nothing of a VQA row."""
    text = ~image & (batch["labels"] == -100) & batch["attention_mask"].bool() & batch["sample_mask"].bool()
    return torch.stack([text[r] if t == "image_heavy" else image[r] if t == "text_heavy" else torch.zeros_like(
        image[r]) for r, t in enumerate(batch["tasks"])])


def _rg(args, batch, embeds, image):
    """[clean; RG copies] embeddings: each attacked row plus sigma * N(0, 1) seeded by sha256(seed/step/id/rg)."""
    mask = _mask(batch, image)
    attacked = [r for r in range(len(mask)) if mask[r].any()]
    copies = []
    for r in attacked:
        key = hashlib.sha256(f"{args.seed}/0/{batch['ids'][r]}/rg".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(key[:8], "little"))
        noise = torch.randn(embeds.shape[1:], generator=g)
        copies.append(embeds[r] + args.sigma * noise * mask[r, :, None])
    return torch.cat([embeds, torch.stack(copies)]), attacked


def _forward(step_model, batch, embeds, rows):
    sub = {"attention_mask": batch["attention_mask"][rows]}  # all a LLaVA's language path reads besides embeds
    return M.logits(step_model.model, embeds, sub)


def _divergence(lo, lq, kind, tau):
    p, q = (torch.softmax(x.double() / tau, -1) for x in (lo, lq))
    if kind == "kl":
        return (p * (p.log() - q.log())).sum()
    m = (p + q) / 2
    return 0.5 * (p * (p / m).log()).sum() + 0.5 * (q * (q / m).log()).sum()


def _cons(batch, lo, lq, labels, attacked, kind, tau):
    """(summed divergence, answer tokens compared, pairs) over every (original, other) pair: each twin, the
    original's own adversarial copy (once), each twin's adversarial copy; originals' logits from lo, others' lq."""
    n = len(batch["labels"])
    copy = {r: n + j for j, r in enumerate(attacked)}
    pairs = [(o, t) for o, t in batch["pairs"]] + [(o, copy[t]) for o, t in batch["pairs"] if t in copy]
    pairs += [(o, copy[o]) for o in sorted({o for o, _ in batch["pairs"]}) if o in copy]
    where = {r: [] for r in range(len(labels))}
    for r, t in _answers(labels):
        where[r].append(t)
    total, count = torch.zeros((), dtype=torch.float64), 0
    for o, q in pairs:
        k = min(len(where[o]), len(where[q]))
        assert k == len(where[o]) > 0  # the same answer: every token compared
        total = total + _divergence(lo[o, where[o][:k]], lq[q, where[q][:k]], kind, tau)
        count += k
    return total, count, pairs


def test_sft_is_the_summed_answer_cross_entropy_of_the_plain_forward_over_the_answer_tokens(toy):  # noqa: F811
    args, step_model, batch = _setup(toy, "--adv", "none", "--cons", "none")
    (sft, adv, cons), totals = _parts(args, step_model, batch)
    with torch.no_grad():
        logits = step_model.model(**M.model_inputs(batch)).logits  # the model's own forward, not M.logits
    count = int((batch["labels"] != -100).sum())
    assert count == len(_answers(batch["labels"])) > len(batch["labels"]) and totals[0] == count
    expected = _ce(logits, batch["labels"], list(range(len(logits)))) / count
    assert sft.item() == pytest.approx(expected.item(), rel=1e-5) and sft.item() > 0.1
    assert adv.item() == 0 and cons.item() == 0


def test_rg_adv_is_the_answer_cross_entropy_of_the_noised_copies_over_their_answer_tokens(toy):  # noqa: F811
    args, step_model, batch = _setup(toy, "--adv", "rg", "--cons", "none", "--sigma", "0.5")
    (sft, adv, cons), totals = _parts(args, step_model, batch)
    with torch.no_grad():
        embeds, image = M.embed(step_model.model, batch)
        noised, attacked = _rg(args, batch, embeds, image)
        n = len(batch["labels"])
        rows = list(range(n)) + attacked
        logits = _forward(step_model, batch, noised, rows)
    assert attacked and set(batch["tasks"][r] for r in attacked) == {"image_heavy", "text_heavy"}
    assert not any(batch["tasks"][r] == "vqa" for r in attacked)
    count = int((batch["labels"][attacked] != -100).sum())
    assert totals[1] == count
    expected = _ce(logits[n:], batch["labels"], attacked) / count
    clean = _ce(logits[:n], batch["labels"], list(range(n))) / int((batch["labels"] != -100).sum())
    assert adv.item() == pytest.approx(expected.item(), rel=1e-5)
    assert sft.item() == pytest.approx(clean.item(), rel=1e-5)
    assert abs(adv.item() - (_ce(logits[attacked], batch["labels"], attacked) / count).item()) > 1e-4  # noise moved it
    assert cons.item() == 0


@pytest.mark.parametrize("kind", ["js", "kl"])
def test_cons_is_the_divergence_of_each_original_and_its_twins_and_copies_over_compared_tokens(toy, kind):  # noqa: F811
    args, step_model, batch = _setup(toy, "--adv", "rg", "--cons", kind, "--tau", "0.5", "--twins", "all",
                                     "--sigma", "0.5")
    (sft, adv, cons), totals = _parts(args, step_model, batch)
    with torch.no_grad():
        embeds, image = M.embed(step_model.model, batch)
        noised, attacked = _rg(args, batch, embeds, image)
        rows = list(range(len(batch["labels"]))) + attacked
        logits = _forward(step_model, batch, noised, rows)
    labels = batch["labels"][rows]
    total, count, pairs = _cons(batch, logits, logits, labels, attacked, kind, 0.5)
    twins = len(batch["pairs"])
    assert twins == 5 and len(pairs) == 2 * twins + 2  # originals with 2 twins (uf, md), 3 (ri, fb, fw): all attacked
    assert totals[2] == count
    # rel 1e-3: losses.consistency works in float32 (it casts even float64 logits), and a divergence of two close
    # distributions loses digits there to cancellation, by the CPU's kernels (kl: 5e-5 measured on one machine,
    # 2.2e-4 on an AMD EPYC); a wrong count or tau is off by % or more
    assert cons.item() == pytest.approx((total / count).item(), rel=1e-3) and cons.item() > 1e-5


RUN = ["--adv", "rg", "--cons", "js", "--lambda-cons", "50", "--sigma", "0.5"]  # lambda: L_cons' gradient shows


@pytest.fixture(scope="module")
def run(toy, tmp_path_factory):  # noqa: F811
    """metrics.jsonl of 7 steps of train.py with RUN, on _setup's data and flags (so step 0's batch is _setup's)."""
    data, models = toy
    out = tmp_path_factory.mktemp("run") / "out"
    with pytest.MonkeyPatch.context() as mp:
        _train(["--model", models["llava"], "--data", data, "--out", str(out), "--batch-size", "4", "--seed", "7",
                "--max-steps", "7", "--warmup", "0.3", "--lr", "1e-3", "--min-lr", "1e-4", "--save-every", "0",
                "--no-export", *RUN], mp)
    return _metrics(out)


def test_the_gradient_of_the_total_is_the_terms_sum_the_formulas_and_the_one_trained(toy, run):  # noqa: F811
    args, step_model, batch = _setup(toy, *RUN)
    params = [q for q in step_model.parameters() if q.requires_grad]
    (sft, adv, cons), _ = _parts(args, step_model, batch)

    def grad(loss):
        return [torch.zeros_like(q) if g is None else g
                for q, g in zip(params, torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True))]

    total = grad(sft + adv + 50 * cons)
    terms = [grad(sft), grad(adv), grad(cons)]
    for t, a, b, c in zip(total, *terms):
        assert torch.allclose(t, a + b + 50 * c, rtol=1e-4, atol=1e-7)
    assert all(sum(g.abs().sum() for g in term) > 0 for term in terms)  # each term trains something
    n = len(batch["labels"])
    embeds, image = M.embed(step_model.model, batch)  # the formula, written here: grads through the copies too
    noised, attacked = _rg(args, batch, embeds, image)
    logits = _forward(step_model, batch, noised, list(range(n)) + attacked)
    labels = batch["labels"][list(range(n)) + attacked]
    count = [int((batch["labels"] != -100).sum()), int((batch["labels"][attacked] != -100).sum())]
    ce = [_ce(logits[:n], labels, list(range(n))) / count[0], _ce(logits[n:], batch["labels"], attacked) / count[1]]
    for target, same in ((logits.detach(), True), (logits, False)):  # the original side is a fixed target
        js, compared, _ = _cons(batch, target, logits, labels, attacked, "js", 1.0)
        formula = grad(ce[0] + ce[1] + 50 * js.float() / compared)
        close = [torch.allclose(t, f, rtol=1e-4, atol=1e-6) for t, f in zip(total, formula)]
        assert all(close) if same else not all(close)
        if same:  # train.py's step 0 on this batch: its losses, and the norm of the gradient it clipped
            norm = torch.cat([f.flatten() for f in formula]).norm().item()
            assert [run[0][k] for k in ("sft", "adv", "cons")] == pytest.approx(
                [ce[0].item(), ce[1].item(), (js / compared).item()], rel=2e-4)
            assert run[0]["grad_norm"] == pytest.approx(norm, rel=1e-4) and norm > 1  # so --grad-clip 1 acted


def test_the_logged_loss_is_sft_plus_adv_plus_lambda_cons_and_the_lr_warm_up_then_cosine(run):
    for row in run:
        assert row["loss"] == pytest.approx(row["sft"] + row["adv"] + 50 * row["cons"], rel=1e-9)
        assert row["adv"] > 0 and row["cons"] > 0
    warm, steps, peak, low = 2, 7, 1e-3, 1e-4  # int(0.3 * 7) warm-up steps
    expected = [peak * (s + 1) / warm if s < warm else
                low + (peak - low) * (1 + math.cos(math.pi * (s - warm) / (steps - warm))) / 2 for s in range(steps)]
    logged = [row["lr"] for row in run]
    assert logged == pytest.approx(expected, rel=1e-12)
    assert logged[:3] == pytest.approx([5e-4, 1e-3, 1e-3]) and logged[-1] == pytest.approx(1.8594e-4, rel=1e-4)


@pytest.mark.parametrize("fam", ["llava", "qwen2.5-vl"])
def test_shortcuts_give_the_reference_losses_and_gradients_under_pgd(toy, fam):  # noqa: F811
    args, step_model, batch = _setup(toy, "--eps", "0.05", fam=fam)  # ours: pgd, js, --pgd-scope sample
    assert args.adv == "pgd" and args.cons == "js" and args.pgd_scope == "sample"
    totals = train.token_counts(batch, step_model.model.config.image_token_id, args)
    params = [q for q in step_model.parameters() if q.requires_grad]
    out = {}
    for name, fn in (("reference", train.loss_parts), ("shortcuts", shortcuts.loss_parts)):
        parts = fn(step_model, batch, 0, totals, args, Profile())
        total = parts[0] + parts[1] + args.lambda_cons * parts[2]
        out[name] = [p.item() for p in parts], torch.autograd.grad(total, params, allow_unused=True)
    (ref, g_ref), (short, g_short) = out["reference"], out["shortcuts"]
    # abs 1e-8: L_cons is ~1e-5 here, and the float32 divergence of close distributions moves ~1e-9 between passes
    assert short == pytest.approx(ref, rel=1e-5, abs=1e-8) and min(ref) > 0
    for a, b in zip(g_ref, g_short):
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, rtol=1e-4, atol=1e-6))


def test_md_with_every_option_described_never_prepends_the_answers_description():
    facts = {"0": "A cat naps on a warm windowsill.", "1": "A dog fetches a stick in the park.",
             "2": "A long-eared rabbit nibbles a carrot beside a wooden fence in the late afternoon sun.",
             "3": "A goldfish swims in a bowl."}
    s = {"id": "all-described", "task": "image_heavy", "image": None, "question": "Which one is it?",
         "options": ["cat", "dog", "rabbit", "goldfish"], "answer": 2, "source": "toy", "facts": facts}
    used = set()
    for pool in ("train", "eval"):
        for seed in range(200):
            out = perturb.perturb(s, "md", seed, pool=pool)
            desc = out["question"][: -len(" Which one is it?")]
            assert out["md_option"] != 2 and desc == facts[str(out["md_option"])] and desc != facts["2"]
            used.add(out["md_option"])
    assert used == {0, 1, 3}
    # the length bound train.py checks (--max-length) is a description MD can draw, not the longer answer's
    assert perturb.longest(s, "md")["question"] == facts["1"] + " Which one is it?"


# ---- does PGD attack? what metrics.jsonl says of each step's attack, and the step rules a user can pick ----------
def test_pgd_step_rules_radius_and_move_against_hand_computation():
    g = torch.Generator().manual_seed(0)
    embeds, w = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 4, generator=g)
    mask = torch.tensor([[True, True, False, False, False], [False, False, True, True, True]])
    m = mask[..., None].float()
    # radius "std": eps times each row's standard deviation over its perturbed elements (population std)
    stds = torch.tensor([embeds[r][mask[r]].flatten().double().std(unbiased=False).item() for r in range(2)],
                        dtype=torch.float64)
    eps = losses.radius(embeds, mask, 0.1, "std")
    assert eps.shape == (2, 1, 1) and torch.allclose(eps.flatten().double(), 0.1 * stds, atol=1e-7)
    assert losses.radius(embeds, mask, 0.1) == 0.1
    noise = torch.randn(2, 5, 4, generator=g)
    start = torch.max(torch.min(noise * eps, eps), -eps) * m
    for rule, direction in (("raw", w), ("sign", w.sign()),
                            ("l2", w / w.flatten(1).norm(dim=1)[:, None, None])):  # FreeLB's: unit L2 norm per row
        stats = {}
        delta = losses.pgd(lambda d: (w * d).sum(), embeds, mask, eps, 0.05, 1, rule, noise=noise, stats=stats)
        expected = torch.max(torch.min(start + 0.05 * direction, eps), -eps) * m
        assert torch.allclose(delta, expected, atol=1e-6), rule
        move = ((delta - start).abs() / eps * m).sum() / (mask.sum() * 4)  # as a share of each row's radius
        assert [float(v) for v in stats["pgd_move"]] == [pytest.approx(move.item(), rel=1e-5)]
        assert not stats["pgd_move"][0].requires_grad  # a number for metrics.jsonl, no graph kept alive


def test_metrics_say_how_far_pgd_moved_delta_and_how_much_it_raised_the_loss(toy):  # noqa: F811
    moves = {}
    for rule in ("raw", "sign"):
        args, step_model, batch = _setup(toy, "--preset", "ours", "--pgd-step", rule, "--eps", "0.05")
        totals, prof = train.token_counts(batch, step_model.model.config.image_token_id, args), Profile()
        _, adv_loss, _ = train.loss_parts(step_model, batch, 0, totals, args, prof)
        image_mask = batch["input_ids"] == step_model.model.config.image_token_id
        adv = train.adversarial_rows(train.perturbable(batch, image_mask, args.pgd_scope), args.adv)
        with torch.no_grad():  # the same rows, clean: their answer tokens' summed cross-entropy
            embeds, _ = M.embed(step_model.model, batch)
            logits = M.logits(step_model.model, embeds, batch)[adv, :-1]
            labels = batch["labels"][adv, 1:]
            clean = F.cross_entropy(logits.flatten(0, 1).double(), labels.flatten(), ignore_index=-100, reduction="sum")
        noted = prof.record()  # what metrics.jsonl gets: means over the step's micro-batches (here one)
        assert len(prof.notes["adv_over_clean"]) == len(prof.notes["pgd_move"]) == 1
        assert noted["adv_over_clean"] == pytest.approx((adv_loss * totals[1] / clean).item(), rel=1e-4)
        assert 0 <= noted["pgd_move"] <= 2
        moves[rule] = noted["pgd_move"]
    assert moves["sign"] > 10 * moves["raw"]  # the sign moves delta by alpha x eps-units; eq. 7's raw gradient barely


def test_a_checkpoint_of_the_pgd_sign_flag_resumes_as_pgd_step_sign(toy, tmp_path, monkeypatch):  # noqa: F811
    import json
    import shutil
    data, models = toy
    run = ["--model", models["llava"], "--data", data, "--out", str(tmp_path / "run"), "--batch-size", "4",
           "--max-steps", "2", "--save-every", "1", "--no-export"]
    _train(run + ["--pgd-sign"], monkeypatch)
    whole = _metrics(str(tmp_path / "run"))
    shutil.rmtree(tmp_path / "run" / "ckpt-00000002")
    state = tmp_path / "run" / "ckpt-00000001" / "state.json"
    saved = json.loads(state.read_text())
    assert saved["args"].pop("pgd_step") == "sign"
    state.write_text(json.dumps(dict(saved, args=dict(saved["args"], pgd_sign=True))))  # as written before the rename
    with pytest.raises(SystemExit, match="--pgd-step sign then, raw now"):
        _train(run + ["--resume"], monkeypatch)
    _train(run + ["--resume", "--pgd-sign"], monkeypatch)
    assert _metrics(str(tmp_path / "run"))[1]["loss"] == whole[1]["loss"]  # resumed exactly
