"""Tests of the core: losses against formulas written out here, the three model families against
their own transformers forward, the interventions' contracts, evaluate and diagnose, the toy world.
Tiny random-init checkpoints of the real classes, built offline; CPU, a few minutes.
Run all tests: python -m pytest -q test_*.py
"""
import copy
import hashlib
import importlib.util
import io
import json
import math
import os
import random
import re
import subprocess
import sys
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import losses
import model as M
import perturb
import samples as S
import prompts as P
from perturb import APPLIES, TASKS, DataError
from model import make_tiny
from tiny import make_tokenizer

FAMILIES = ["llava", "qwen2.5-vl", "instructblip"]


# ---- losses ----------------------------------------------------------------------------------------------

def _kl64(p, q):
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))


def _softmax64(row, tau):
    z = [x / tau for x in row]
    m = max(z)
    e = [math.exp(x - m) for x in z]
    return [x / sum(e) for x in e]


@pytest.mark.parametrize("kind", ["kl", "js"])
def test_consistency_matches_float64_formula(kind):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 2, 7, generator=g) * 3, torch.randn(3, 2, 7, generator=g) * 3
    mask = torch.tensor([[True, True], [True, False], [False, False]])
    for tau in (1.0, 2.0):
        vals = []
        for i in range(3):
            for j in range(2):
                if not mask[i, j]:
                    continue
                p, q = _softmax64(a[i, j].double().tolist(), tau), _softmax64(b[i, j].double().tolist(), tau)
                if kind == "kl":
                    vals.append(_kl64(p, q))
                else:
                    m = [(x + y) / 2 for x, y in zip(p, q)]
                    vals.append(0.5 * _kl64(p, m) + 0.5 * _kl64(q, m))
        got = losses.consistency(a, b, kind=kind, tau=tau, mask=mask)
        assert got.item() == pytest.approx(sum(vals) / len(vals), rel=1e-5)


def test_js_is_symmetric_and_bounded_by_ln2():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 3, 11, generator=g) * 5, torch.randn(4, 3, 11, generator=g) * 5
    assert losses.consistency(a, b, "js").item() == pytest.approx(losses.consistency(b, a, "js").item(), rel=1e-6)
    far_a = torch.tensor([[[60.0, 0.0]]])  # two almost disjoint distributions: JS -> ln 2
    far_b = torch.tensor([[[0.0, 60.0]]])
    js = losses.consistency(far_a, far_b, "js").item()
    assert js <= math.log(2) + 1e-6 and js == pytest.approx(math.log(2), rel=1e-4)
    assert losses.consistency(a, b, "kl").item() != pytest.approx(losses.consistency(b, a, "kl").item(), rel=1e-3)


@pytest.mark.parametrize("kind", ["kl", "js"])
def test_consistency_is_zero_for_identical_logits(kind):
    a = torch.randn(2, 3, 5)
    assert losses.consistency(a, a.clone(), kind).abs().item() < 1e-7


def test_consistency_gradient_flows_through_the_perturbed_side_only():
    a = torch.randn(2, 1, 5, requires_grad=True)
    b = torch.randn(2, 1, 5, requires_grad=True)
    losses.consistency(a, b, "js").backward()
    assert a.grad is None and b.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="must be one of kl, js, mse, got 'l1'"):
        losses.consistency(a, b, "l1")


def test_answer_logits_aligns_pairs_by_answer_order():
    logits = torch.arange(2 * 6 * 1, dtype=torch.float).view(2, 6, 1)
    labels = torch.full((2, 6), -100)
    labels[0, 2:4] = 7   # answer tokens at 2, 3: predicted from positions 1, 2
    labels[1, 5] = 7     # one answer token at 5: predicted from position 4
    out, mask = losses.answer_logits(logits, labels)
    assert out.shape == (2, 2, 1)
    assert mask.tolist() == [[True, True], [True, False]]
    assert out[0, :, 0].tolist() == [1.0, 2.0] and out[1, 0, 0].item() == 10.0


def test_modality_mask_follows_the_task():
    tasks = ["image_heavy", "text_heavy", "vqa"]
    image = torch.tensor([[0, 1, 1, 0, 0, 0]] * 3, dtype=torch.bool)
    labels = torch.full((3, 6), -100)
    labels[:, 4] = 5
    attn = torch.ones(3, 6, dtype=torch.long)
    attn[:, 5] = 0
    mask = losses.modality_mask(tasks, image, labels, attn)
    assert mask[0].tolist() == [True, False, False, True, False, False]  # text, not answer, not padding
    assert mask[1].tolist() == image[1].tolist()
    assert not mask[2].any()
    with pytest.raises(ValueError, match="unknown task"):
        losses.modality_mask(["audio"], image[:1], labels[:1])
    # --pgd-scope sample: the image-heavy row's text narrowed to the sample's own positions; images untouched
    sample = torch.tensor([[0, 0, 0, 1, 1, 1]] * 3, dtype=torch.bool)
    narrow = losses.modality_mask(tasks, image, labels, attn, sample)
    assert narrow[0].tolist() == [False, False, False, True, False, False]  # not position 0 (the template's)
    assert narrow[1].tolist() == image[1].tolist() and not narrow[2].any()


def test_pgd_step_is_equation_7_and_respects_eps_and_mask():
    embeds = torch.zeros(2, 5, 4)
    mask = torch.tensor([[True, False, True, False, False], [False] * 5])
    # seeded: from the global generator, w depended on the tests before it, and one |w| of 7e-4 once kept
    # alpha=100 below from reaching the corner (|w| >= 0.25 on the masked positions with this seed)
    w = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0))
    eps, alpha = 0.3, 0.1
    delta = losses.pgd(lambda d: (w * d).sum(), embeds, mask, eps=eps, alpha=alpha, steps=1,
                       generator=torch.Generator().manual_seed(3))
    init = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(3)) * eps
    m = mask[..., None].float()
    expected = ((init.clamp(-eps, eps) * m + alpha * w).clamp(-eps, eps)) * m
    assert torch.allclose(delta, expected, atol=1e-7)
    assert delta.abs().max() <= eps and (delta[~mask] == 0).all()
    many = losses.pgd(lambda d: (w * d).sum(), embeds, mask, eps=eps, alpha=100.0, steps=2)
    assert torch.allclose(many[mask], eps * w[mask].sign())  # a linear loss is maximised at the corner
    signed = losses.pgd(lambda d: (w * d).sum(), embeds, mask, eps=eps, alpha=0.01, steps=1, rule="sign",
                        generator=torch.Generator().manual_seed(3))
    assert torch.allclose(signed, ((init.clamp(-eps, eps) * m + 0.01 * w.sign()).clamp(-eps, eps)) * m)


def test_gaussian_noise_is_masked_with_sigma():
    embeds = torch.zeros(4, 100, 64)
    mask = torch.zeros(4, 100, dtype=torch.bool)
    mask[:, :50] = True
    noise = losses.gaussian_noise(embeds, mask, sigma=0.05, generator=torch.Generator().manual_seed(0))
    assert (noise[~mask] == 0).all()
    assert noise[mask].std().item() == pytest.approx(0.05, rel=0.03)


# ---- perturb -------------------------------------------------------------------------------------------

def _image(path, color=(10, 20, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), color).save(path)
    return path


def _rows(tmp_path):
    _image(tmp_path / "images" / "a.png")
    _image(tmp_path / "images" / "b.png", (200, 0, 0))
    return [
        {"id": "a", "task": "image_heavy", "image": "images/a.png", "question": "What is shown?",
         "options": ["cat", "dog", "cat food"], "answer": 0, "source": "toy", "note": "kept"},
        {"id": "b", "task": "vqa", "image": "images/b.png", "question": "What colour?",
         "options": ["red", "blue"], "answer": 0, "source": "toy", "facts": {"1": "It is blue."}},
        {"id": "c", "task": "text_heavy", "image": None, "question": "2 + 2 = ?",
         "options": ["3", "4", "5"], "answer": 1, "source": "toy", "facts": None},
    ]


def _write(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines), encoding="utf-8")
    return str(path)


def _words(text):
    return re.findall(r"[a-z0-9]+", text.lower())


def _names(text, option):
    """True when the words of option appear consecutively in text (the test's own whole-word check)."""
    words, target = _words(text), _words(option)
    return any(words[i:i + len(target)] == target for i in range(len(words)))


def _sample(task="image_heavy", **kw):
    s = {"id": f"s-{task}", "task": task, "image": None, "question": "Which one is it?",
         "options": ["cat", "dog", "cat food", "rabbit"], "answer": 0, "source": "toy"}
    return {**s, **kw}


def _plain(sample):
    return {k: (v.mode, v.size, v.tobytes()) if isinstance(v, Image.Image) else v for k, v in sample.items()}


def test_load_samples_makes_image_paths_absolute_and_keeps_extra_keys(tmp_path):
    path = _write(tmp_path, _rows(tmp_path)[:1] + [""] + _rows(tmp_path)[1:])
    samples = perturb.load_samples(path)
    assert [s["id"] for s in samples] == ["a", "b", "c"]
    assert samples[0]["image"] == str((tmp_path / "images" / "a.png").resolve())
    assert os.path.isabs(samples[1]["image"]) and os.path.isfile(samples[1]["image"])
    assert samples[2]["image"] is None
    assert samples[0]["note"] == "kept" and samples[1]["facts"] == {"1": "It is blue."}


def _drop(key):
    return lambda s: {k: v for k, v in s.items() if k != key}


MALFORMED = {
    "malformed_json": lambda s: '{"id": "x", "task": ',
    "not_an_object": lambda s: "[1, 2]",
    "missing_key": _drop("answer"),
    "bad_task": lambda s: {**s, "task": "image-heavy"},
    "answer_out_of_range": lambda s: {**s, "answer": 3},
    "negative_answer": lambda s: {**s, "answer": -1},
    "answer_bool": lambda s: {**s, "answer": True},
    "answer_string": lambda s: {**s, "answer": "0"},
    "duplicate_id": lambda s: {**s, "id": "a"},
    "empty_id": lambda s: {**s, "id": ""},
    "empty_question": lambda s: {**s, "question": " "},
    "missing_image_file": lambda s: {**s, "image": "images/nope.png"},
    "image_heavy_without_image": lambda s: {**s, "image": None},
    "text_heavy_with_image": lambda s: {**s, "task": "text_heavy"},
    "too_few_options": lambda s: {**s, "options": ["cat"]},
    "too_many_options": lambda s: {**s, "options": [f"o{i}" for i in range(27)]},
    "duplicate_options": lambda s: {**s, "options": ["cat", "dog", "cat"]},
    "empty_option": lambda s: {**s, "options": ["cat", "", "dog"]},
    "bad_facts_key": lambda s: {**s, "facts": {"3": "out of range"}},
    "non_numeric_facts_key": lambda s: {**s, "facts": {"dog": "a dog"}},
    "empty_facts_text": lambda s: {**s, "facts": {"1": ""}},
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_load_samples_names_file_and_line_of_each_malformed_case(tmp_path, case):
    rows = _rows(tmp_path)
    bad = MALFORMED[case]({**rows[0], "id": "z"})
    path = _write(tmp_path, [rows[0], "", bad, rows[2]])
    with pytest.raises(DataError) as e:
        perturb.load_samples(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:3: "), msg
    assert "(" in msg and msg.endswith(")"), msg
    if case == "duplicate_id":
        assert "line 1" in msg


def test_load_samples_rejects_empty_and_missing_files(tmp_path):
    path = _write(tmp_path, ["", "  "])
    with pytest.raises(DataError, match=re.escape(path)):
        perturb.load_samples(path)
    with pytest.raises(FileNotFoundError, match="nothere"):
        perturb.load_samples(str(tmp_path / "nothere.jsonl"))


def test_render_letters_the_options():
    s = _sample(options=["red", "green", "blue"])
    assert perturb.render(s) == ("Which one is it?\nA. red\nB. green\nC. blue\n"
                                 "Answer with the option's letter from the given choices directly.")


def test_interventions_for_follows_applies_order():
    assert perturb.interventions_for("image_heavy") == ["orig", "uf", "md"]
    assert perturb.interventions_for("text_heavy") == ["orig", "rp", "ri", "fb", "fw"]
    assert perturb.interventions_for("vqa") == ["orig"]
    assert set(perturb.INTERVENTIONS) == set(APPLIES)
    with pytest.raises(ValueError):
        perturb.interventions_for("audio")


def test_md_never_names_the_answer():
    s = _sample()
    seen = set()
    for pool in ("train", "eval"):
        for seed in range(200):
            out = perturb.perturb(s, "md", seed, pool=pool)
            desc = out["question"][: -len(s["question"]) - 1]
            assert out["question"].endswith(" " + s["question"])
            assert not _names(desc, "cat") and not _names(desc, "cats"), desc
            assert out["md_option"] in (1, 3)
            assert _names(desc, s["options"][out["md_option"]])
            assert desc in [t.format(wrong=s["options"][out["md_option"]]) for t in perturb.md_templates(pool)]
            seen.add(out["md_option"])
    assert seen == {1, 3}


def test_md_never_names_the_answer_with_facts():
    facts = {"1": "A loyal dog wagging its tail.", "2": "A bowl of cat food.", "3": "Two cats next to a rabbit."}
    s = _sample(facts=facts)
    for seed in range(200):  # option 1 has the only description that does not name "cat"
        out = perturb.perturb(s, "md", seed)
        desc = out["question"][: -len(s["question"]) - 1]
        assert not _names(desc, "cat") and not _names(desc, "cats"), desc
        assert out["md_option"] == 1 and desc == facts["1"]
    s = _sample(facts={"2": facts["2"], "3": facts["3"]})  # no usable description: templates
    for seed in range(50):
        out = perturb.perturb(s, "md", seed)
        desc = out["question"][: -len(s["question"]) - 1]
        assert desc in [t.format(wrong=s["options"][out["md_option"]]) for t in perturb.md_templates("eval")]
        assert out["md_option"] in (1, 3) and not _names(desc, "cat") and not _names(desc, "cats"), desc


@pytest.mark.parametrize("facts", [None, {"1": "A short dog note.", "3": "The rabbit, surely, and nothing but it."}])
def test_longest_twin_is_a_draw_no_other_draw_exceeds(facts):
    """perturb.longest bounds what UF and MD draw: no draw of 300 seeds is longer, and the bound is one of them."""
    s = _sample(**({"facts": facts} if facts else {}))
    pool = sorted(perturb.unrelated_facts("train"), key=len, reverse=True)
    for name in ("uf", "md"):
        bound = perturb.longest(s, name, pool, k=3)["question"]
        draws = {perturb.perturb(s, name, seed, pool="train", k=3)["question"] for seed in range(300)}
        assert max(map(len, draws)) <= len(bound)
        if name == "md":
            assert bound in draws
        else:  # the 3 longest facts naming no option, in pool order: a draw rng.sample can make
            usable = [f for f in pool if not any(_names(f, o + end) for o in s["options"] for end in ("", "s", "es"))]
            assert bound == " ".join(usable[:3]) + " " + s["question"]
    if facts:
        assert perturb.longest(s, "md")["question"].startswith(facts["3"])
    with pytest.raises(ValueError, match="uf needs"):
        perturb.longest(s, "uf", pool, k=len(pool) + 1)


def test_md_uses_the_one_prewritten_description_for_every_seed():
    s = _sample(options=["cat", "dog", "bird", "fish"], facts={"2": "A small bird sings on a branch."})
    for seed in range(200):
        out = perturb.perturb(s, "md", seed)
        assert out["question"] == "A small bird sings on a branch. Which one is it?" and out["md_option"] == 2


def test_md_draws_among_the_wrong_options_with_descriptions_deterministically():
    facts = {"1": "A dog sleeps on the sofa.", "3": "A goldfish swims in a bowl."}
    s = _sample(options=["cat", "dog", "bird", "fish"], facts=facts)
    used = set()
    for seed in range(200):
        out = perturb.perturb(s, "md", random.Random(seed))
        assert out["question"] == facts[str(out["md_option"])] + " Which one is it?"
        assert out == perturb.perturb(s, "md", random.Random(seed))
        used.add(out["md_option"])
    assert used == {1, 3}


def test_md_uses_the_facts_text_when_present():
    s = _sample(options=["cat", "dog"], facts={"1": "A dog is shown here."})
    assert perturb.perturb(s, "md", 3)["question"] == "A dog is shown here. Which one is it?"


def test_md_fails_when_every_wrong_option_names_the_answer():
    s = _sample(options=["cat", "cat food", "Cat Toy"], id="only-cats")
    with pytest.raises(ValueError, match="only-cats"):
        perturb.perturb(s, "md", 0)


def test_uf_has_k_facts_from_the_pool_and_never_names_an_option():
    options = ["water", "Moon", "carbon dioxide", "iron"]
    s = _sample(options=options, answer=1)
    for pool in ("train", "eval"):
        facts, questions = perturb.unrelated_facts(pool), set()
        assert any(_names(f, "water") for f in facts)
        for seed in range(30):
            out = perturb.perturb(s, "uf", seed, pool=pool, k=5)
            assert out["question"].endswith(" " + s["question"])
            prefix = out["question"][: -len(s["question"]) - 1]
            used = [f for f in facts if f in prefix]
            assert len(used) == 5 and sum(map(len, used)) + 4 == len(prefix)
            assert not any(_names(prefix, o) for o in options), prefix
            assert out["image"] is None and out["options"] == options
            questions.add(out["question"])
        assert len(questions) > 20


def test_uf_needs_enough_facts():
    with pytest.raises(ValueError, match="s-image_heavy"):
        perturb.perturb(_sample(), "uf", 0, k=10 ** 6)


def test_facts_file_and_pools():
    path = os.path.join(os.path.dirname(perturb.__file__), "data", "unrelated_facts.txt")
    with open(path, encoding="ascii") as f:
        lines = f.read().splitlines()
    assert len(lines) >= 200 and len(set(lines)) == len(lines)
    assert all(l.strip() == l and l.endswith(".") and ". " not in l for l in lines)
    train, eval_ = perturb.unrelated_facts("train"), perturb.unrelated_facts("eval")
    assert not set(train) & set(eval_) and sorted(train + eval_) == sorted(lines)
    assert len(eval_) == len(lines) // 5
    t_train, t_eval = perturb.md_templates("train"), perturb.md_templates("eval")
    assert not set(t_train) & set(t_eval) and len(t_train) >= 6 and len(t_eval) >= 3
    assert all("{wrong}" in t for t in t_train + t_eval)
    for fn in (perturb.unrelated_facts, perturb.md_templates):
        with pytest.raises(ValueError):
            fn("test")


@pytest.mark.parametrize("name,value", [("fb", 0), ("fw", 255)])
def test_canvases_are_exactly_black_or_white_at_the_requested_size(name, value):
    out = perturb.perturb(_sample("text_heavy"), name, 0, size=(40, 30))
    assert out["image"].mode == "RGB" and out["image"].size == (40, 30)
    assert np.unique(np.asarray(out["image"])).tolist() == [value]
    assert perturb.canvas(value, 16).size == (16, 16)


def test_rp_is_deterministic_and_differs_across_ids():
    s = _sample("text_heavy")
    a = perturb.perturb(s, "rp", 1, size=(24, 16))["image"]
    b = perturb.perturb(s, "rp", 2, size=(24, 16))["image"]
    c = perturb.perturb(s, "orig", 3, size=(24, 16))["image"]
    other = perturb.perturb({**s, "id": "other"}, "rp", 1, size=(24, 16))["image"]
    assert a.mode == "RGB" and a.size == (24, 16)
    assert a.tobytes() == b.tobytes() == c.tobytes() != other.tobytes()
    assert np.asarray(a).std() > 40
    assert perturb.load_image(s, (24, 16)).tobytes() == a.tobytes()


def test_random_pixels_are_the_same_in_another_process():
    code = ("import hashlib, perturb; "
            "print(hashlib.sha256(perturb.random_pixels('text-7', 32).tobytes()).hexdigest())")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.abspath(perturb.__file__)))
    assert out.stdout.strip() == hashlib.sha256(perturb.random_pixels("text-7", 32).tobytes()).hexdigest()


def _applicable(tmp_path):
    pool = [str(_image(tmp_path / f"ri{i}.png", (i, i, i))) for i in range(5)]
    return pool, {t: _sample(t, facts={"1": "A dog."}) for t in TASKS}


@pytest.mark.parametrize("name", list(APPLIES))
def test_every_intervention_is_deterministic_and_never_mutates_its_input(tmp_path, name):
    pool, samples = _applicable(tmp_path)
    for task in APPLIES[name]:
        s = samples[task]
        before = copy.deepcopy(s)
        a = perturb.perturb(s, name, 7, size=20, ri_images=pool, k=3)
        b = perturb.perturb(s, name, random.Random(7), size=20, ri_images=pool, k=3)
        assert _plain(a) == _plain(b)
        assert a is not s and a["intervention"] == name and "intervention" not in s
        a["options"].append("mutated")
        assert s == before


@pytest.mark.parametrize("name,task", [(n, t) for n in APPLIES for t in TASKS if t not in APPLIES[n]])
def test_interventions_reject_tasks_they_do_not_apply_to(tmp_path, name, task):
    pool, samples = _applicable(tmp_path)
    with pytest.raises(ValueError, match=f"{name}.*{task}"):
        perturb.perturb(samples[task], name, 0, ri_images=pool)


def test_unknown_intervention_lists_the_valid_names():
    with pytest.raises(ValueError, match="orig.*uf.*md.*rp.*ri.*fb.*fw"):
        perturb.perturb(_sample(), "noise", 0)


@pytest.mark.parametrize("name", ["noise", "orig", "rp", "ri", "fb", "fw"])
def test_longest_refuses_a_name_without_a_bound_never_falls_back_to_md(name):
    """Unknown, or an image-only intervention whose text never changes: a ValueError naming it, not MD's bound."""
    with pytest.raises(ValueError, match=f"'{name}'.*uf, md"):
        perturb.longest(_sample(), name, sorted(perturb.unrelated_facts("train"), key=len, reverse=True), k=3)


def test_training_twins_are_the_table_s_twin_column_in_the_old_order():
    import dataloader
    # random.choice draws from these tuples: their order is part of what a seed trains on
    assert dataloader.TWINS == perturb.twins() == {"image_heavy": ("uf", "md"), "text_heavy": ("ri", "fb", "fw")}
    assert list(dataloader.TWINS) == ["image_heavy", "text_heavy"]
    assert APPLIES == {n: row.tasks for n, row in perturb.INTERVENTIONS.items()}


def test_a_new_intervention_plugs_in_as_one_row_of_the_table(monkeypatch):
    """One row is all a variant needs: perturb applies it to its tasks only, training takes it as a twin of its
    task, the length pre-check takes its own bound, and a row with no bound is refused there."""
    def shout(sample, rng, o):
        return perturb._new(sample, question=sample["question"].upper() + "!" * rng.randint(1, 3))

    def loudest(sample, facts, k, pool, replace):
        return sample["question"].upper() + "!!!"

    monkeypatch.setitem(perturb.INTERVENTIONS, "shout", perturb.Intervention(shout, ("image_heavy",), True, loudest))
    gray = perturb.Intervention(lambda sample, rng, o: perturb._new(sample, image=perturb.canvas(128, o.size)),
                                ("text_heavy",), False, None)  # image only: no bound
    monkeypatch.setitem(perturb.INTERVENTIONS, "gray", gray)
    s = _sample()
    out = perturb.perturb(s, "shout", 0)
    assert out["intervention"] == "shout" and out["question"].startswith("WHICH ONE IS IT?!") and s == _sample()
    assert perturb.INTERVENTIONS["shout"](s, random.Random(0))["question"] == out["question"]  # a row is callable
    assert perturb.longest(s, "shout")["question"] == "WHICH ONE IS IT?!!!"
    assert max(len(perturb.perturb(s, "shout", seed)["question"]) for seed in range(20)) <= len("WHICH ONE IS IT?!!!")
    assert perturb.interventions_for("image_heavy") == ["orig", "uf", "md", "shout"]
    assert perturb.twins() == {"image_heavy": ("uf", "md", "shout"), "text_heavy": ("ri", "fb", "fw")}
    assert perturb.perturb(_sample("text_heavy"), "gray", 0, size=4)["image"].getpixel((0, 0)) == (128, 128, 128)
    with pytest.raises(ValueError, match="'shout'.*text_heavy"):
        perturb.perturb(_sample("text_heavy"), "shout", 0)
    with pytest.raises(ValueError, match="'gray'.*uf, md, shout"):
        perturb.longest(_sample("text_heavy"), "gray")


def test_orig_leaves_image_heavy_and_vqa_samples_unchanged():
    for task in ("image_heavy", "vqa"):
        s = _sample(task, image="/x/y.png")
        assert perturb.perturb(s, "orig", 0) == {**s, "intervention": "orig"}


def test_ri_uses_only_pool_images(tmp_path):
    samples = perturb.load_samples(_write(tmp_path, _rows(tmp_path)))
    pool = perturb.ri_pool(samples)
    assert pool == [str((tmp_path / "images" / "a.png").resolve())]
    extra = tmp_path / "extra"
    for name in ("x.PNG", "deep/y.jpg", "deep/z.webp"):
        _image(extra / name)
    (extra / "notes.txt").write_text("not an image")
    pool = perturb.ri_pool(samples, folder=str(extra))  # the folder's images replace the data's
    assert pool == sorted(str(p.resolve()) for p in (extra / "x.PNG", extra / "deep/y.jpg", extra / "deep/z.webp"))
    picked = {perturb.perturb(samples[2], "ri", seed, ri_images=pool)["image"] for seed in range(60)}
    assert picked == set(pool)
    with pytest.raises(ValueError, match="ri_images"):
        perturb.perturb(samples[2], "ri", 0)
    with pytest.raises(ValueError):
        perturb.ri_pool([samples[2]])


def test_ri_folder_missing_empty_or_with_a_broken_image_is_refused_naming_it(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'none'}: no such folder"):
        perturb.ri_pool(folder=str(tmp_path / "none"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="empty: no images"):
        perturb.ri_pool(folder=str(tmp_path / "empty"))
    _image(tmp_path / "ri" / "good.png")
    png = (tmp_path / "ri" / "good.png").read_bytes()
    (tmp_path / "ri" / "cut.png").write_bytes(png[:len(png) // 2])  # a PNG cut in its data
    with pytest.raises(DataError, match=f"^{tmp_path / 'ri' / 'cut.png'}: an image of --ri-folder .* cannot be decoded"):
        perturb.ri_pool(folder=str(tmp_path / "ri"))


def test_load_image_handles_paths_pil_images_and_missing_files(tmp_path):
    path = _image(tmp_path / "p.png", (1, 2, 3))
    assert perturb.load_image({"id": "p", "image": str(path)}).getpixel((0, 0)) == (1, 2, 3)
    gray = Image.new("L", (5, 7), 9)
    got = perturb.load_image({"id": "g", "image": gray}, size=50)
    assert got.mode == "RGB" and got.size == (5, 7)
    assert perturb.load_image({"id": "n", "image": None}, size=(9, 4)).size == (9, 4)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    for name in ("missing.png", "bad.png"):
        with pytest.raises(DataError, match=f"{name}.*'sample-9'"):
            perturb.load_image({"id": "sample-9", "image": str(tmp_path / name)})


def test_a_16_bit_grayscale_png_loads_as_its_top_8_bits(tmp_path):
    values = np.arange(0, 65536, 4369, dtype=np.uint16).reshape(4, 4)  # a gradient 0 .. 65535
    Image.fromarray(values).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")  # PIL reads it as 16-bit
    got = np.asarray(perturb.load_image({"id": "g", "image": str(tmp_path / "g16.png")}))
    assert (got == (values >> 8).astype(np.uint8)[:, :, None]).all()  # the choice documented in to_rgb
    as_float = Image.fromarray(values.astype(np.float32) / 65535)  # mode F, 0..1
    assert np.asarray(perturb.load_image({"id": "f", "image": as_float}))[3, 3, 0] == 255


def test_load_samples_keeps_image_paths_inside_the_data_folder_or_image_root(tmp_path):
    row = _rows(tmp_path)[0]
    other = _image(tmp_path.parent / f"{tmp_path.name}-elsewhere" / "x.png")
    (tmp_path / "images" / "link.png").symlink_to(other)
    for image in ("../../../../etc/passwd", str(other), "images/../../x.png"):
        path = _write(tmp_path, [_rows(tmp_path)[1], {**row, "image": image}])
        with pytest.raises(DataError, match=rf"^{re.escape(path)}:2: image .* outside .*image_root"):
            perturb.load_samples(path)
    path = _write(tmp_path, [_rows(tmp_path)[1], {**row, "image": str(other)}])
    assert perturb.load_samples(path, image_root=other.parent)[1]["image"] == str(other.resolve())
    # a symlink the user put inside the folder (a dataset kept on another disk) is followed
    path = _write(tmp_path, [_rows(tmp_path)[1], {**row, "image": "images/link.png"}])
    assert perturb.load_samples(path)[1]["image"] == str(other.resolve())


def test_load_samples_rejects_image_tokens_in_question_or_options(tmp_path):
    row = _rows(tmp_path)[0]
    for token in ("<image>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"):
        for bad in ({**row, "question": f"{token}\nWhat is shown?"}, {**row, "options": ["cat", f"dog {token}"]}):
            path = _write(tmp_path, [_rows(tmp_path)[1], bad])
            with pytest.raises(DataError, match=rf"^{re.escape(path)}:2: sample 'a': .*{re.escape(token)}"):
                perturb.load_samples(path)


def test_load_samples_accepts_a_utf8_byte_order_mark(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in _rows(tmp_path)).encode("utf-8"))
    assert [s["id"] for s in perturb.load_samples(str(path))] == ["a", "b", "c"]


def _bomb_png(path):
    """A PNG whose header claims 20000 x 20000 pixels, over twice PIL's decompression-bomb limit."""
    def chunk(kind, data):
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
    ihdr = (20000).to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b""))
                     + chunk(b"IEND", b""))
    return path


def test_load_samples_decode_names_the_line_and_sample_of_a_bad_image(tmp_path):
    rows = _rows(tmp_path)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    (tmp_path / "images" / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "images" / "junk.png").write_bytes(b"not an image at all")
    _bomb_png(tmp_path / "images" / "bomb.png")
    for name in ("cut.png", "junk.png", "bomb.png"):
        path = _write(tmp_path, [rows[0], rows[2], {**rows[1], "id": "bad", "image": f"images/{name}"}])
        assert len(perturb.load_samples(path)) == 3  # without decode only paths are checked
        image = re.escape(str((tmp_path / "images" / name).resolve()))
        with pytest.raises(DataError, match=rf"^{re.escape(path)}:3: the image {image} of sample 'bad' cannot be decoded"):
            perturb.load_samples(path, decode=True)
        assert S.unreadable(tmp_path / "images" / name)  # the converters' check too (data/common.py)
        with pytest.raises(DataError, match=name):
            perturb.load_image({"id": "bad", "image": str(tmp_path / "images" / name)})
    many = [{**rows[1], "id": f"ok-{i}", "image": str(_image(tmp_path / "many" / f"{i}.png"))} for i in range(40)]
    (tmp_path / "many" / "7.png").write_bytes(b"junk")  # enough images for the thread pool
    with pytest.raises(DataError, match=r":8: the image .*7.png of sample 'ok-7' .*\(replace the image"):
        perturb.load_samples(_write(tmp_path, many), decode=True)


# ---- model -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    cache = {}

    def get(fam):
        if fam not in cache:
            m, p = M.load(make_tiny(fam, str(root / fam)))
            cache[fam] = (m.eval(), p, str(root / fam))
        return cache[fam]
    return get


def _samples():
    red = Image.new("RGB", (40, 30), (200, 10, 10))
    return [
        dict(id="img-1", task="image_heavy", image=red, question="What is shown in the image ?",
             options=["red", "blue", "green", "shape"], answer=2, source="toy"),
        dict(id="txt-1", task="text_heavy", image=None, question="How many is 2 ?", options=["2", "3"],
             answer=0, source="toy"),
        dict(id="vqa-1", task="vqa", image=red, question="Which color is this shape in the picture of the "
             "main object ?", options=["red", "blue", "green"], answer=1, source="toy"),
    ]


@pytest.mark.parametrize("fam", FAMILIES)
def test_logits_of_embed_equal_the_models_own_forward(tiny, fam):
    m, p, _ = tiny(fam)
    batch = P.collate(p, _samples())
    assert len(set(batch["attention_mask"].sum(1).tolist())) == 3  # rows of different lengths: padding matters
    with torch.no_grad():
        ref = m(**M.model_inputs(batch)).logits
        embeds, image_mask = M.embed(m, batch)
        got = M.logits(m, embeds, batch)
        again = M.logits(m, embeds, batch)  # no state carried from one call to the next (Qwen's rope_deltas)
    assert torch.allclose(got, ref, atol=1e-5) and torch.equal(got, again)
    assert image_mask.tolist() == (batch["input_ids"] == m.config.image_token_id).tolist()
    assert image_mask.sum(1).min() > 0


@pytest.mark.parametrize("fam", list(M.FAMILIES))  # every family in the table, those of test_families.py too
def test_labels_cover_exactly_the_answer_tokens(tiny, fam):
    m, p, _ = tiny(fam)
    samples = _samples()
    batch = P.collate(p, samples)
    tok = p.tokenizer
    for row, s in enumerate(samples):
        n = int(batch["attention_mask"][row].sum())
        where = (batch["labels"][row] != -100).nonzero().flatten().tolist()
        assert where == [n - 2, n - 1]  # the letter and the end of sequence close the real tokens
        assert tok.convert_ids_to_tokens(batch["labels"][row, where].tolist()) == [perturb.LETTERS[s["answer"]],
                                                                                   tok.eos_token]
        assert batch["labels"][row, where].tolist() == batch["input_ids"][row, where].tolist()
    letters = P.option_token_ids(p, 4)
    assert tok.convert_ids_to_tokens(letters) == ["A", "B", "C", "D"]
    plain = P.collate(p, samples, train=False)
    assert (plain["labels"] == -100).all()
    assert plain["input_ids"].shape[1] == batch["input_ids"].shape[1] - 2
    # the loss transformers computes from these labels is our sft_loss
    with torch.no_grad():
        out = m(**M.model_inputs(batch), labels=batch["labels"])
    assert losses.sft_loss(out.logits, batch["labels"]).item() == pytest.approx(out.loss.item(), rel=1e-5)


def test_a_sequence_longer_than_max_length_is_an_error_naming_the_sample(tiny):
    _, p, _ = tiny("llava")
    with pytest.raises(ValueError, match="img-1.*max_length=10"):
        P.collate(p, _samples()[:1], max_length=10)


@pytest.mark.parametrize("fam", FAMILIES)
def test_only_the_vision_encoder_is_frozen(tiny, fam):
    m, _, _ = tiny(fam)
    M.freeze(m)
    frozen = {n for n, q in m.named_parameters() if not q.requires_grad}
    trainable = {n for n, q in m.named_parameters() if q.requires_grad}
    vision = {"llava": "model.vision_tower.", "qwen2.5-vl": "model.visual.blocks.", "instructblip": "vision_model."}
    projector = {"llava": "model.multi_modal_projector.", "qwen2.5-vl": "model.visual.merger.",
                 "instructblip": "language_projection."}
    assert any(n.startswith(vision[fam]) for n in frozen)
    assert not any(n.startswith(vision[fam]) for n in trainable)
    assert any(n.startswith(projector[fam]) for n in trainable)
    assert any("layers.0.self_attn.q_proj" in n for n in trainable)  # the LLM
    assert any("embed_tokens" in n for n in trainable)
    if fam == "instructblip":
        assert {n for n in frozen if n.startswith("qformer.")} and "query_tokens" in frozen
    M.train_mode(m)
    modules = dict(m.named_modules())
    assert all(not mod.training for n, mod in modules.items() if n and (n + ".").startswith(M.FAMILIES[fam]["frozen"]))
    assert any(mod.training for mod in modules.values())
    M.train_mode(m, False)
    for q in m.parameters():
        q.requires_grad_(True)


@pytest.mark.parametrize("fam", ["llava", "instructblip", "qwen2.5-vl"])
def test_tiny_checkpoint_loads_with_plain_transformers(tiny, fam):
    m, p, folder = tiny(fam)
    assert os.path.exists(os.path.join(folder, "model.safetensors"))
    plain = transformers.AutoModelForImageTextToText.from_pretrained(folder).eval()
    assert type(plain) is type(m)
    batch = P.collate(p, _samples())
    with torch.no_grad():
        assert torch.equal(plain(**M.model_inputs(batch)).logits, m(**M.model_inputs(batch)).logits)
    if fam != "qwen2.5-vl":  # a Qwen processor needs torchvision (docs/format.md, 'Output folders')
        plain_processor = transformers.AutoProcessor.from_pretrained(folder)  # ours may add to it (InstructBLIP)
        assert isinstance(p, type(plain_processor)) and type(plain_processor).__module__.startswith("transformers")


def test_pgd_on_a_tiny_model_raises_the_loss_and_leaves_parameter_grads(tiny):
    m, p, _ = tiny("llava")
    batch = P.collate(p, _samples())
    embeds, image_mask = M.embed(m, batch)
    mask = losses.modality_mask(batch["tasks"], image_mask, batch["labels"], batch["attention_mask"])
    assert mask[0].any() and mask[1].any() and not mask[2].any()
    base = embeds.detach()

    def loss_fn(delta):
        return losses.sft_loss(M.logits(m, base + delta, batch), batch["labels"])
    before = {n: None if q.grad is None else q.grad.clone() for n, q in m.named_parameters()}
    delta = losses.pgd(loss_fn, base, mask, eps=0.5, alpha=50.0, steps=3, rule="raw")
    assert all(q.grad is None for q in m.parameters()) and all(v is None for v in before.values())
    assert delta.abs().max() <= 0.5 and (delta[~mask] == 0).all() and delta[mask].abs().sum() > 0
    with torch.no_grad():
        assert loss_fn(delta).item() > loss_fn(torch.zeros_like(base)).item()
        rand = losses.gaussian_noise(base, mask, sigma=0.5 / 3)
        assert loss_fn(delta).item() > loss_fn(rand).item()
    # the clean graph survives the attack: the training loss still backpropagates into the weights
    losses.sft_loss(M.logits(m, embeds + delta, batch), batch["labels"]).backward()
    assert m.get_input_embeddings().weight.grad.abs().sum() > 0
    m.zero_grad(set_to_none=True)


# ---- evaluate and diagnose -------------------------------------------------------------------------------

def _write_dataset(folder, n=6):
    """A few image-heavy, text-heavy and VQA samples (docs/format.md, 'A sample'), images on disk."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    colors = {"red": (220, 20, 20), "blue": (20, 20, 220), "green": (20, 200, 20)}
    rows = []
    for i in range(n):
        name = list(colors)[i % 3]
        Image.new("RGB", (24 + i, 24), colors[name]).save(os.path.join(folder, "images", f"{i}.png"))
        rows.append(dict(id=f"img-{i}", task="image_heavy", image=f"images/{i}.png", source="shapes",
                         question="What is shown in the image ?" + " really" * i, options=list(colors),
                         answer=i % 3))
        rows.append(dict(id=f"txt-{i}", task="text_heavy", image=None, source="sums", question=f"How many is {i} ?",
                         options=[str(i), str(i + 1), str(i + 2), str(i + 3)], answer=0))
        rows.append(dict(id=f"vqa-{i}", task="vqa", image=f"images/{i}.png", source="vqa",
                         question="Which color is this ?", options=list(colors)[:2], answer=i % 2))
    path = os.path.join(folder, "test.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


def test_evaluate_probs_are_a_softmax_over_the_letter_logits(tiny, tmp_path):
    import evaluate
    m, p, folder = tiny("llava")
    data = _write_dataset(str(tmp_path / "data"), n=3)
    rows = evaluate.run(folder, [data], str(tmp_path / "out"), batch_size=4, loaded=(m, p))
    samples = {s["id"]: s for s in perturb.load_samples(data)}
    expected = [(s, n) for s in samples.values() for n in perturb.interventions_for(s["task"])]
    assert [(r["id"], r["intervention"]) for r in rows] == [(s["id"], n) for s, n in expected]
    ri = perturb.ri_pool(list(samples.values()))
    for r in rows:  # one sample at a time, the whole logits tensor, the letters picked by hand
        s = perturb.perturb(samples[r["id"]], r["intervention"], evaluate.rng_for(0, samples[r["id"]], r["intervention"]),
                            size=P.image_size(p), ri_images=ri)
        b = P.collate(p, [s], train=False)
        with torch.no_grad():
            last = m(**M.model_inputs(b)).logits[0, -1]
        letters = [p.tokenizer.convert_tokens_to_ids(perturb.LETTERS[i]) for i in range(len(s["options"]))]
        want = torch.softmax(last[letters], -1)
        assert torch.allclose(torch.tensor(r["probs"]), want, atol=1e-5)
        assert r["pred"] == int(want.argmax()) and r["answer"] == s["answer"]
    assert diagnose_reads(str(tmp_path / "out" / "predictions.jsonl"))


def diagnose_reads(path):
    import diagnose
    return diagnose.read(path)


def test_evaluate_resume_gives_the_file_of_an_uninterrupted_run(tiny, tmp_path, monkeypatch):
    import evaluate
    m, p, folder = tiny("qwen2.5-vl")
    data = _write_dataset(str(tmp_path / "data"), n=3)
    out = tmp_path / "out"
    evaluate.run(folder, [data], str(out), batch_size=2, loaded=(m, p))
    full = (out / "predictions.jsonl").read_text()
    lines = full.splitlines(keepends=True)
    (out / "predictions.jsonl").write_text("".join(lines[:7]) + lines[7][:15])  # killed mid-line
    scored = []
    real = evaluate.score
    monkeypatch.setattr(evaluate, "score", lambda *a: scored.append(len(a[2])) or real(*a))
    evaluate.run(folder, [data], str(out), batch_size=2, resume=True, loaded=(m, p))
    assert (out / "predictions.jsonl").read_text() == full
    assert 0 < sum(scored) < len(lines)  # the finished batches were not scored again


def test_evaluate_under_torchrun_equals_a_single_process(tiny, tmp_path):
    _, _, folder = tiny("llava")
    data = _write_dataset(str(tmp_path / "data"), n=3)
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node"]
    args = ["evaluate.py", "--model", folder, "--data", data, "--batch-size", "3", "--out"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for n in (1, 2):
        subprocess.run(base + [str(n), "--master_port", str(29500 + n)] + args + [str(tmp_path / f"n{n}")],
                       check=True, env=env, cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True)
    one = (tmp_path / "n1" / "predictions.jsonl").read_text()
    assert one and one == (tmp_path / "n2" / "predictions.jsonl").read_text()


def _pred(id, task, source, name, probs, pred, answer):
    return dict(id=id, task=task, source=source, intervention=name, probs=probs, pred=pred, answer=answer)


def _handmade():
    """Two sources; a tie broken by pred; a sample missing an intervention."""
    return [
        _pred("a", "image_heavy", "cls", "orig", [0.7, 0.2, 0.1], 0, 0),
        _pred("a", "image_heavy", "cls", "md", [0.1, 0.8, 0.1], 1, 0),
        _pred("a", "image_heavy", "cls", "uf", [0.6, 0.3, 0.1], 0, 0),
        _pred("b", "image_heavy", "cls", "orig", [0.5, 0.5, 0.0], 1, 1),
        _pred("b", "image_heavy", "cls", "md", [0.5, 0.5, 0.0], 0, 1),   # the same tie, another pick: a flip
        _pred("b", "image_heavy", "cls", "uf", [0.2, 0.7, 0.1], 1, 1),
        _pred("c", "image_heavy", "cls", "orig", [0.1, 0.1, 0.8], 2, 0),
        _pred("c", "image_heavy", "cls", "md", [0.1, 0.1, 0.8], 2, 0),   # no uf row for c
        _pred("t", "text_heavy", "qa", "orig", [0.9, 0.1], 0, 0),
        _pred("t", "text_heavy", "qa", "fb", [0.4, 0.6], 1, 0),
        _pred("u", "text_heavy", "qa", "orig", [0.3, 0.7], 1, 1),
        _pred("u", "text_heavy", "qa", "fb", [0.2, 0.8], 1, 1),
    ]


def test_diagnose_numbers_equal_an_independent_computation(tmp_path):
    import diagnose
    path = tmp_path / "run" / "predictions.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps(r) + "\n" for r in _handmade()))
    got = diagnose.diagnose(str(path), n_boot=500, seed=7)
    assert json.loads((tmp_path / "run" / "diagnosis.json").read_text()) == got

    def boot(flips):
        rng = np.random.default_rng(7)
        means = [np.mean([flips[j] for j in rng.integers(0, len(flips), len(flips))]) for _ in range(500)]
        return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]
    cls, qa = got["cls"], got["qa"]
    assert list(cls) == ["orig", "uf", "md"] and list(qa) == ["orig", "fb"]
    assert cls["orig"] == {"n": 3, "acc": pytest.approx(2 / 3), "delta_cp": 0.0, "ci": [0.0, 0.0], "tv": 0.0}
    assert cls["md"]["n"] == 3 and cls["md"]["acc"] == 0.0
    assert cls["md"]["delta_cp"] == pytest.approx(2 / 3)  # a flips, b's tie resolves the other way, c stays
    assert cls["md"]["tv"] == pytest.approx((0.6 + 0.0 + 0.0) / 3)
    assert cls["md"]["ci"] == pytest.approx(boot([1, 1, 0]))
    assert cls["uf"] == {"n": 2, "acc": 1.0, "delta_cp": 0.0, "ci": [0.0, 0.0], "tv": pytest.approx((0.1 + 0.3) / 2)}
    assert qa["fb"]["delta_cp"] == pytest.approx(0.5) and qa["fb"]["acc"] == pytest.approx(0.5)
    assert qa["fb"]["ci"] == pytest.approx(boot([1, 0]))
    assert diagnose.worst(cls) == ("md", 0.0) and diagnose.worst(qa) == ("fb", 0.5)
    table = diagnose.table(got)
    assert "| cls | md | 3 | 0.0 | 0.667 |" in table and "worst (md)" in table


def test_evaluate_copies_question_id_into_predictions(tiny, tmp_path):
    import evaluate
    m, p, folder = tiny("llava")
    data = _write_dataset(str(tmp_path / "data"), n=2)
    rows = [json.loads(line) for line in open(data)]
    for r in rows:
        if r["task"] == "vqa":
            r["question_id"] = "q"  # both VQA samples: two passes of one question
    with open(data, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    out = evaluate.run(folder, [data], str(tmp_path / "out"), batch_size=4, loaded=(m, p))
    assert [r.get("question_id") for r in out if r["source"] == "vqa"] == ["q", "q"]
    assert all("question_id" not in r for r in out if r["source"] != "vqa")
    assert _read_jsonl(tmp_path / "out" / "predictions.jsonl") == out


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_diagnose_circular_accuracy_needs_every_pass_of_a_question_right_and_counts_whole_questions_only(tmp_path):
    import diagnose
    passes = [("q0", "p0", 1, 1), ("q0", "p1", 0, 0), ("q0", "p2", 2, 2),   # all right
              ("q1", "p3", 0, 0), ("q1", "p4", 1, 0), ("q1", "p6", 2, 2),   # one pass wrong
              ("q2", "p5", 1, 1)]                                            # 1 of its 3 passes, right: left out
    rows = [dict(_pred(pid, "vqa", "mmbench", "orig", [0.8 if j == pred else 0.1 for j in range(3)], pred, ans),
                 question_id=qid) for qid, pid, pred, ans in passes]
    rows += _handmade()
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = diagnose.diagnose(str(path), n_boot=50)
    assert got["mmbench"]["orig"]["acc"] == pytest.approx(6 / 7)
    assert got["mmbench"]["orig"]["circular_acc"] == pytest.approx(1 / 2)  # q0 of the whole q0, q1 (not 2/3 with q2)
    assert got["mmbench"]["orig"]["circular_incomplete"] == 1
    assert "circular_acc" not in got["cls"]["orig"] and "circular_acc" not in got["qa"]["fb"]
    assert ("| mmbench | orig | 7 | 85.7 | 0.000 | [0.000, 0.000] | 0.000 | 50.0 (1 incomplete questions left out) |"
            in diagnose.table(got))


@pytest.mark.parametrize("edit, line, message", [
    (lambda rows: rows[4].update(task="text_heavy", intervention="fb"), 5, "id 'b' has task.* on line 4"),
    (lambda rows: rows[1].update(probs=[0.2, 0.2, 0.2]), 2, "probs must be a distribution"),
    (lambda rows: rows.pop(8), 9, "'fb' row of id 't' has no 'orig' row"),
    (lambda rows: rows[0].update(pred=1), 1, "pred 1 is not an argmax"),
    (lambda rows: rows[3].update(intervention="fb"), 4, "intervention 'fb' does not apply to task 'image_heavy'"),
    (lambda rows: rows[5].update(intervention="md"), 6, "a second 'md' row for id 'b'"),
    (lambda rows: rows[0].update(pred=None), 1, "pred None is not an option index below 3"),  # logits rows parse
    (lambda rows: rows[1].update(probs=None), 2, "probs must be a distribution over >= 2 options, not None"),
    (lambda rows: rows[2].update(score="generated"), 3, "score 'generated' is not one of logits, generate"),
    (lambda rows: [r.update(score="generate", probs=None) for r in rows] and rows[2].update(pred=-1), 3,
     "pred -1 is not an option index"),
    (lambda rows: [r.update(score="generate", probs=None, n_options=3) for r in rows] and rows[3].update(pred=3), 4,
     "pred 3 is not an option index below 3"),  # n_options, written by evaluate.py, bounds a generated answer
    (lambda rows: [r.update(score="generate", probs=None, n_options=3) for r in rows] and rows[1].update(n_options=1),
     2, "n_options 1 is not a number of options"),
])
def test_diagnose_reports_bad_predictions_with_their_line(tmp_path, edit, line, message):
    import diagnose
    rows = _handmade()
    edit(rows)
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=re.escape(f"{path}:{line}: ") + message):
        diagnose.read(str(path))


def _generated(id, task, source, name, pred, answer, probs=None):
    return dict(_pred(id, task, source, name, probs, pred, answer), score="generate", text="...")


def test_diagnose_counts_unparsed_generated_answers_as_wrong_and_as_an_answer_of_their_own(tmp_path, capsys):
    import diagnose
    answers = [("g1", "orig", 0, 0), ("g1", "md", None, 0), ("g2", "orig", None, 1), ("g2", "md", None, 1),
               ("g3", "orig", 1, 1), ("g3", "md", 0, 1)]
    rows = [_generated(i, "image_heavy", "cls", name, pred, answer) for i, name, pred, answer in answers]
    rows += [_generated("g4", "image_heavy", "cls", "orig", 2, 1, [0.2, 0.3, 0.5]),
             _generated("g4", "image_heavy", "cls", "md", 1, 1, [0.6, 0.4, 0.0]),  # a generated pred: not the argmax
             _generated("t", "text_heavy", "qa", "orig", 0, 0), _generated("t", "text_heavy", "qa", "fb", 0, 0)]
    path = tmp_path / "gen" / "predictions.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = diagnose.diagnose(str(path), n_boot=50)
    assert json.loads((tmp_path / "gen" / "diagnosis.json").read_text()) == got
    cls, qa = got["cls"], got["qa"]
    # by hand: orig right for g1, g3; md right for g4 only; md changes g1 (0 -> unparsed), g3 and g4, not g2
    assert (cls["orig"]["acc"], cls["orig"]["unparsed"]) == (2 / 4, 1)
    assert (cls["md"]["acc"], cls["md"]["delta_cp"], cls["md"]["unparsed"]) == (1 / 4, 3 / 4, 2)
    assert cls["md"]["tv"] == pytest.approx(0.5 * (0.4 + 0.1 + 0.5))  # g4, the one pair with probs on both sides
    assert qa["fb"] == {"n": 1, "acc": 1.0, "delta_cp": 0.0, "ci": [0.0, 0.0]}  # no probs: no tv; no unparsed
    table = diagnose.table(got)
    assert "| source | intervention | n | acc | delta_cp | 95% CI | TV | unparsed |" in table
    assert re.search(r"^\| cls \| md \| 4 \| 25\.0 \| 0\.750 \| \[.*\] \| 0\.500 \| 2 \|$", table, re.MULTILINE)
    assert "| qa | fb | 1 | 100.0 | 0.000 | [0.000, 0.000] | - | 0 |" in table
    (tmp_path / "logits").mkdir()
    (tmp_path / "logits" / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _handmade()))
    diagnose.main([str(tmp_path / "logits" / "predictions.jsonl"), str(path)])
    assert "the runs were scored differently (logits: logits, gen: generate)" in capsys.readouterr().err


@pytest.mark.parametrize("first_score, later, line, message", [
    (None, 4, 4, "a 'generate'-scored row after 'logits'-scored ones (line 1)"),   # no score key: logits
    ("generate", 2, 2, "a 'logits'-scored row after 'generate'-scored ones (line 1)"),
])
def test_diagnose_refuses_a_file_that_mixes_logits_and_generated_answers(tmp_path, first_score, later, line, message):
    import diagnose
    rows = _handmade()
    if first_score:
        rows = [dict(r, score="generate") for r in rows]
        del rows[later - 1]["score"]
    else:
        rows[later - 1]["score"] = "generate"
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=re.escape(f"{path}:{line}: {message}")):
        diagnose.read(str(path))


def test_labels_name_any_number_of_runs_by_the_path_parts_that_differ():
    import diagnose
    assert diagnose.labels(["/x/a/eval/p.jsonl", "/x/b/eval/p.jsonl", "/x/c/d/eval/p.jsonl"]) == ["a", "b", "c/d"]
    assert diagnose.labels(["/x/a/p.jsonl", "/x/a/p.jsonl"]) == ["A", "B"]
    assert diagnose.labels(["out/a/p.jsonl"]) == ["out/a/p.jsonl"]


def _saved_figures(monkeypatch):
    """Every matplotlib figure saved from now on, kept to read what was drawn."""
    from matplotlib.figure import Figure
    saved, savefig = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (saved.append(fig), savefig(fig, *a, **k))[1])
    return saved


@pytest.mark.parametrize("relative", [False, True])
def test_radar_chart_has_one_labelled_polygon_per_run_over_the_image_and_text_heavy_cells(tmp_path, monkeypatch,
                                                                                          relative):
    import diagnose
    saved = _saved_figures(monkeypatch)
    paths = []
    for name, edit in (("vanilla", {}), ("ours", {1: 0, 7: 0})):   # ours keeps a's answer and gets c right under md
        rows = _handmade() + [_pred("v", "vqa", "vqa", "orig", [0.6, 0.4], 0, 0)]  # VQA gets no axis
        for i, pred in edit.items():
            rows[i].update(pred=pred, probs=[0.8, 0.1, 0.1])
        paths.append(tmp_path / name / "eval" / "predictions.jsonl")
        paths[-1].parent.mkdir(parents=True)
        paths[-1].write_text("".join(json.dumps(r) + "\n" for r in rows))
    png = tmp_path / "radar.png"
    diagnose.main(["--chart", str(png)] + ["--relative"] * relative + [str(q) for q in paths])
    (ax,) = saved[0].axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["cls\norig", "cls\nuf", "cls\nmd", "qa\norig", "qa\nfb"]
    # by hand from _handmade: cls orig 2/3 right, uf 2/2, md 0/3 (ours: a and c right, 2/3); qa orig 2/2, fb 1/2
    accs = {"vanilla": [2 / 3, 1, 0, 1, 1 / 2], "ours": [2 / 3, 1, 2 / 3, 1, 1 / 2]}
    for line, (name, acc) in zip(ax.get_lines(), accs.items()):
        orig = [acc[0]] * 3 + [acc[3]] * 2
        want = [100 * a / o if relative else 100 * a for a, o in zip(acc, orig if relative else [1] * 5)]
        assert line.get_label() == name and list(line.get_ydata()) == pytest.approx(want + want[:1])  # closed
    assert len(ax.get_lines()) == 2 and saved[0].texts[0].get_text().startswith("accuracy relative" if relative
                                                                              else "accuracy (%)")
    image = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)
    assert Image.open(png).size == (700, 700)
    counts = [int((image == c).all(1).sum()) for c in ([31, 119, 180], [255, 127, 14], [44, 160, 44])]  # C0 C1 C2
    assert counts[0] > 300 and counts[1] > 300 and counts[2] == 0  # drawn polygons, not legend marks alone


def test_radar_chart_refuses_predictions_without_image_or_text_heavy_rows(tmp_path):
    import diagnose
    path = tmp_path / "predictions.jsonl"
    path.write_text(json.dumps(_pred("v", "vqa", "vqa", "orig", [0.6, 0.4], 0, 0)) + "\n")
    with pytest.raises(SystemExit) as e:
        diagnose.main(["--chart", str(tmp_path / "radar.png"), str(path)])
    assert str(e.value.code) == (f"error: {path}: no image-heavy or text-heavy rows, and the radar chart's axes are "
                                 "their sources x interventions (VQA has no interference to chart)")
    assert not (tmp_path / "radar.png").exists() and not (tmp_path / "diagnosis.json").exists()


def test_toy_ablation_row_has_the_worst_heuristic_and_each_attack_radius_and_pgds_means(tmp_path, monkeypatch):
    import toy
    def cell(n, acc):
        return dict(n=n, acc=acc)
    summary = {"toy-shapes": {"orig": cell(4, 1.0), "uf": cell(4, 0.75), "md": cell(4, 0.5),
                              "attack@0.5std": cell(4, 0.25), "attack@1std": cell(4, 0.0)},
               "toy-stated": {"orig": cell(3, 1.0), "ri": cell(3, 1 / 3), "attack@0.5std": cell(3, 2 / 3)},
               "toy-known": {"orig": cell(1, 0.0), "ri": cell(1, 1.0), "attack@0.5std": cell(1, 0.0)},
               "toy-colors": {"orig": cell(5, 0.8)}}
    # by hand: text-heavy pools its two sources by their sizes (3 and 1); "perturbed" is the worst heuristic only
    assert toy.row(summary) == pytest.approx({
        "image_heavy clean": 100, "image_heavy perturbed": 50, "text_heavy clean": 75, "text_heavy perturbed": 50,
        "vqa clean": 80, "image_heavy attack@0.5std": 25, "image_heavy attack@1std": 0, "text_heavy attack@0.5std": 50})
    (tmp_path / "run").mkdir()
    steps = [dict(step=0, loss=1.0, pgd_move=0.5, adv_over_clean=2.0), dict(step=1, loss=0.5, pgd_move=1.0,
                                                                           adv_over_clean=1.0)]
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    assert toy.moved(str(tmp_path / "run")) == dict(pgd_move=0.75, adv_over_clean=1.5)
    (tmp_path / "run" / "metrics.jsonl").write_text(json.dumps(dict(step=0, loss=1.0)) + "\n")  # no PGD: fft-aug
    assert toy.moved(str(tmp_path / "run")) == dict(pgd_move=None, adv_over_clean=None)
    # the attacked subset: the first ATTACK_N of each of the two kinds, in the split's order
    rows = [dict(id=f"{t}{i}", task=t) for i in range(4) for t in ("image_heavy", "text_heavy", "vqa")]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(toy, "args", SimpleNamespace(data=str(tmp_path)), raising=False)
    monkeypatch.setattr(toy, "ATTACK_N", 2)
    with open(toy.attacked_samples()) as f:
        assert [json.loads(line)["id"] for line in f] == ["image_heavy0", "text_heavy0", "image_heavy1", "text_heavy1"]


def test_toy_ablation_chart_shows_the_mean_and_the_spread_over_seeds(tmp_path, monkeypatch):
    import toy
    saved = _saved_figures(monkeypatch)
    columns = ["image_heavy clean", "vqa clean"]
    results = {"vanilla": [{"image_heavy clean": 90, "vqa clean": 100}, {"image_heavy clean": 96, "vqa clean": 100}],
               "ours": [{"image_heavy clean": 99, "vqa clean": 98}, {"image_heavy clean": 100, "vqa clean": 100}]}
    toy.chart(results, columns, str(tmp_path / "ablation.png"))
    (ax,) = saved[0].axes
    assert Image.open(tmp_path / "ablation.png").size == (900, 450)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["image\nclean", "vqa\nclean"] and "seeds" in ax.get_ylabel()
    bars = [c for c in ax.containers if hasattr(c, "patches")]
    assert [b.get_label() for b in bars] == ["vanilla", "ours"]
    for bar, mean, spread in zip(bars, [[93, 100], [99.5, 99]], [[3, 0], [0.5, 1]]):  # population std of two seeds
        assert [p.get_height() for p in bar.patches] == pytest.approx(mean)
        ends = [y for seg in bar.errorbar.lines[2][0].get_segments() for y in seg[:, 1]]
        assert ends == pytest.approx([y for m, s in zip(mean, spread) for y in (m - s, m + s)])


def test_evaluate_refuses_an_out_of_other_settings_unless_overwrite(tiny, tmp_path):
    import evaluate
    m, p, folder = tiny("llava")
    data = _write_dataset(str(tmp_path / "data"), n=1)
    out = tmp_path / "out"
    evaluate.run(folder, [data], str(out), interventions=["orig"], loaded=(m, p))
    first = (out / "predictions.jsonl").read_text()
    (out / "diagnosis.json").write_text("{}")  # diagnose.py ran on the first predictions
    with pytest.raises(evaluate.RunError, match="holds predictions of other settings .seed 0 then, 1 now.*--overw"):
        evaluate.run(folder, [data], str(out), interventions=["orig"], seed=1, loaded=(m, p))
    assert (out / "predictions.jsonl").read_text() == first and (out / "diagnosis.json").exists()
    rows = evaluate.run(folder, [data], str(out), interventions=["orig"], seed=1, overwrite=True, loaded=(m, p))
    assert len(rows) == 3 and _read_jsonl(out / "predictions.jsonl") == rows
    assert not (out / "diagnosis.json").exists() and json.loads((out / "run.json").read_text())["seed"] == 1


def test_evaluate_resume_refuses_another_model_seed_or_data(tiny, tmp_path):
    import shutil
    import evaluate
    m, p, folder = tiny("llava")
    data = _write_dataset(str(tmp_path / "data"), n=1)
    model, out = str(tmp_path / "model"), str(tmp_path / "out")
    shutil.copytree(folder, model)
    evaluate.run(model, [data], out, interventions=["orig"], loaded=(m, p))
    full = open(os.path.join(out, "predictions.jsonl")).read()

    def resume(**kw):
        return evaluate.run(kw.pop("model", model), [data], out, ["orig"], resume=True, loaded=(m, p), **kw)
    with pytest.raises(evaluate.RunError, match=f"model {re.escape(model)} then, {re.escape(folder)} now"):
        resume(model=folder)
    with pytest.raises(evaluate.RunError, match="seed 0 then, 1 now"):
        resume(seed=1)
    os.utime(os.path.join(model, "model.safetensors"), ns=(0, 0))  # trained again into the same folder
    with pytest.raises(evaluate.RunError, match=r"weights model.safetensors \[\d+, \d+\] then, \[\d+, 0\] now"):
        resume()
    shutil.copy2(os.path.join(folder, "model.safetensors"), model)
    resume(batch_size=1)  # the batch size changes float noise only
    assert open(os.path.join(out, "predictions.jsonl")).read() == full
    rows = _read_jsonl(data)
    rows[0]["answer"] = 1  # the same ids, other data
    with open(data, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with pytest.raises(evaluate.RunError, match=f"data {re.escape(os.path.abspath(data))} [0-9a-f]+ then"):
        resume()


def test_evaluate_refuses_a_sample_past_the_language_models_context(tiny, tmp_path):
    import evaluate
    _, _, folder = tiny("llava")
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps(dict(id="txt-long", task="text_heavy", image=None, source="sums", answer=0,
                                    question="How many is" + " one" * 6000 + " ?", options=["1", "2"])) + "\n")
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--model", folder, "--data", str(data), "--out", str(tmp_path / "out"), "--interventions",
                       "orig"])
    assert re.fullmatch(r"error: sample 'txt-long': \d+ tokens.* max_length=4096.*max_position_embeddings.*",
                        str(e.value.code))


def _only_instructions(tmp_path, data):
    rows = [dict(r, task="vqa", options=None, answer="red") for r in _read_jsonl(data) if r["task"] == "vqa"]
    with open(data, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return []


def _bad_line_on_resume(tmp_path, data, tiny):
    import evaluate
    m, p, folder = tiny("llava")
    evaluate.run(folder, [data], str(tmp_path / "out"), interventions=["orig"], dtype=torch.float32, loaded=(m, p))
    path = tmp_path / "out" / "predictions.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + '{"id": "txt-0", "interv\n' + "".join(lines[2:]))  # a hand edit gone wrong
    return ["--resume", "--dtype", "float32"]


@pytest.mark.parametrize("case, message", [
    ("instructions", r"error: .*test.jsonl: no sample with options to score"),
    ("interventions", r"error: --interventions md apply to none of the data's tasks \(text_heavy\): pick from orig rp"),
    ("batch size", r"error: --batch-size 0: must be at least 1"),
    ("out is a file", r"error: .*out: --out is a file"),
    ("out under a file", r"error: .*out/sub: cannot write there"),
    ("bad line on resume", r"error: .*predictions.jsonl:2: not a predictions line"),
])
def test_evaluate_stops_in_one_line_before_loading_the_model(tiny, tmp_path, monkeypatch, case, message):
    import evaluate
    data = _write_dataset(str(tmp_path / "data"), n=1)
    _, _, folder = tiny("llava")
    out, extra = str(tmp_path / "out"), ["--interventions", "orig"]
    if case == "instructions":
        _only_instructions(tmp_path, data)
    if case == "interventions":
        rows = [r for r in _read_jsonl(data) if r["task"] == "text_heavy"]
        with open(data, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        extra = ["--interventions", "md"]
    if case == "batch size":
        extra += ["--batch-size", "0"]
    if case.startswith("out "):
        (tmp_path / "out").write_text("not a folder")
        out = out if case == "out is a file" else os.path.join(out, "sub")
    if case == "bad line on resume":
        extra += _bad_line_on_resume(tmp_path, data, tiny)
    monkeypatch.setattr(M, "load", lambda *a, **k: pytest.fail("the model loaded before the check"))
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--model", folder, "--data", data, "--out", out] + extra)
    assert re.match(message, str(e.value.code)) and "\n" not in str(e.value.code)


def test_diagnose_writes_one_diagnosis_per_input_file(tmp_path):
    import diagnose
    rows = _handmade()
    (tmp_path / "x.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "y.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["source"] == "qa"))
    diagnose.main([str(tmp_path / "x.jsonl"), str(tmp_path / "y.jsonl")])
    x, y = (json.loads((tmp_path / f"{n}.diagnosis.json").read_text()) for n in "xy")
    assert set(x) == {"cls", "qa"} and set(y) == {"qa"} and x["qa"] == y["qa"]
    assert not (tmp_path / "diagnosis.json").exists()


def test_diagnose_names_two_runs_by_their_paths_shows_n_and_warns_of_other_samples(tmp_path, capsys):
    import diagnose
    paths = []
    for name, rows in (("vanilla", _handmade()), ("ours", [r for r in _handmade() if r["id"] != "c"])):
        paths.append(tmp_path / name / "eval" / "predictions.jsonl")
        paths[-1].parent.mkdir(parents=True)
        paths[-1].write_text("".join(json.dumps(r) + "\n" for r in rows))
    diagnose.main([str(q) for q in paths])
    out, err = capsys.readouterr()
    assert ("| source | intervention | acc vanilla | acc ours | delta_cp vanilla | delta_cp ours | n vanilla | n ours |"
            in out)
    assert "| cls | md | 0.0 | 0.0 | 0.667 | 1.000 | 3 | 2 |" in out  # a and b flip in both; c only in vanilla
    assert "warning: the runs cover different samples" in err and "cls: 1 samples missing from ours (c)" in err
    assert "scored differently" not in err  # neither file says, so both are logits


# ---- the toy world ---------------------------------------------------------------------------------------

def test_toy_world_is_deterministic_valid_and_split(tmp_path):
    cmd = [sys.executable, "data/toy/prepare.py", "--n-train", "20", "--n-test", "10", "--out"]
    here = os.path.dirname(os.path.abspath(__file__))
    for name in ("a", "b"):
        subprocess.run(cmd + [str(tmp_path / name)], check=True, cwd=here, capture_output=True)
    for split in ("train", "test"):
        assert (tmp_path / "a" / f"{split}.jsonl").read_bytes() == (tmp_path / "b" / f"{split}.jsonl").read_bytes()
    train = perturb.load_samples(str(tmp_path / "a" / "train.jsonl"))
    test = perturb.load_samples(str(tmp_path / "a" / "test.jsonl"))
    assert len(train) == 60 and len(test) == 30
    assert not {s["id"] for s in train} & {s["id"] for s in test}
    assert {s["task"] for s in test} == set(TASKS)
    image = Image.open(train[0]["image"])
    assert image.size == (32, 32) and image.tobytes() == Image.open(tmp_path / "b" / "images" / "train" /
                                                                    "00000.png").tobytes()
    vocab = set((tmp_path / "a" / "vocab.txt").read_text().split())
    tok = make_tokenizer(vocab)
    for s in train + test:
        text = perturb.render(perturb.perturb(s, "uf" if s["task"] == "image_heavy" else "orig", 0))
        assert tok.unk_token_id not in tok(text)["input_ids"], text  # the word-level tokenizer knows every word


def test_toy_text_questions_state_their_colour_or_ask_a_known_one(tmp_path):
    here = os.path.dirname(os.path.abspath(__file__))
    subprocess.run([sys.executable, "data/toy/prepare.py", "--n-train", "200", "--n-test", "100", "--out",
                    str(tmp_path)], check=True, cwd=here, capture_output=True)
    spec = importlib.util.spec_from_file_location("toy_prepare", os.path.join(here, "data", "toy", "prepare.py"))
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    colour_of = {thing: c for c, things in prepare.KNOWN.items() for thing in things}
    assert len(colour_of) == sum(map(len, prepare.KNOWN.values()))  # no thing has two colours
    samples = [s for split in ("train", "test") for s in perturb.load_samples(str(tmp_path / f"{split}.jsonl"))]
    text = [s for s in samples if s["task"] == "text_heavy"]
    known = [s for s in text if s["source"] == "toy-known"]
    assert 0.35 < len(known) / len(text) < 0.65 and {s["source"] for s in text} == {"toy-known", "toy-stated"}
    for s in text:
        words = s["question"].split()
        assert words[-6:-2] == ["What", "color", "are", "the"] and words[-1] == "?"  # as VQA asks
        if s["source"] == "toy-known":  # the colour the world gives the thing, never stated
            assert len(words) == 6 and s["options"][s["answer"]] == colour_of[words[-2]]
        else:  # "The dots are red . What color are the dots ?"
            assert words[:3] == ["The", words[-2], "are"] and s["options"][s["answer"]] == words[3]


def test_the_toy_world_shows_interference_and_its_mitigation(tmp_path):
    """toy.py with the default world, fewer test samples, half the vanilla and 40% of the fine-tuning steps
    (seed 0; about 2 min on 2 cores): the vanilla model is fooled by misleading descriptions (measured:
    delta_cp 0.83 with 2 threads), the `ours` model is not (0.00), both well above chance. (The
    text-heavy side shows too, 0.18 under FB on the 33 known-colour questions, 0.00 after `ours`, but with
    so few questions it is left to the quick start. 80 fine-tuning steps leave MD at 0.18, so 120 it is;
    with 500 samples per task and 500 vanilla steps, an older world's MD delta_cp was 0.30 with 1 thread
    and 0.18 with 2: too little training makes the effect depend on the machine.)"""
    out, data = tmp_path / "out", tmp_path / "data"
    subprocess.run([sys.executable, "toy.py", "--out", str(out), "--data", str(data), "--n-test", "60",
                    "--vanilla-steps", "400", "--finetune-steps", "120"], check=True, cwd=os.path.dirname(os.path.abspath(__file__)),
                   capture_output=True)
    vanilla, ours = (json.loads((out / "seed0" / name / "eval" / "diagnosis.json").read_text())
                     for name in ("vanilla", "ours"))
    assert vanilla["toy-shapes"]["md"]["delta_cp"] >= 0.5
    assert ours["toy-shapes"]["md"]["delta_cp"] <= min(0.1, vanilla["toy-shapes"]["md"]["delta_cp"] - 0.4)
    for summary in (vanilla, ours):
        assert all(summary[source]["orig"]["acc"] > 0.5 for source in summary)  # chance is 0.25


def test_toy_stops_rather_than_reuse_models_of_another_world(tmp_path):
    """toy.py reuses the models under --out; ones trained on another world (here: fewer captions) would
    give that world's numbers under this one's name, so it stops before touching anything."""
    out, data = tmp_path / "out", tmp_path / "data"
    world = dict(n_train=2000, n_test=300, vanilla_steps=800, finetune_steps=300, caption_rate=0.7)
    out.mkdir()
    (out / "world.json").write_text(json.dumps(world))
    r = subprocess.run([sys.executable, "toy.py", "--out", str(out), "--data", str(data), "--caption-rate", "0.5"],
                       cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True, text=True)
    assert r.returncode != 0 and "another toy world" in r.stderr and "'caption_rate': 0.5" in r.stderr
    assert not data.exists() and json.loads((out / "world.json").read_text()) == world

def test_diagnose_compares_two_runs_and_can_evaluate_first(tiny, tmp_path, capsys):
    import diagnose
    for name, flip in (("a", False), ("b", True)):
        rows = _handmade()
        if flip:  # run b keeps sample a's answer under md
            rows[1].update(probs=[0.8, 0.1, 0.1], pred=0)
        (tmp_path / name).mkdir()
        (tmp_path / name / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    diagnose.main([str(tmp_path / "a" / "predictions.jsonl"), str(tmp_path / "b" / "predictions.jsonl")])
    out = capsys.readouterr().out
    assert "| cls | md | 0.0 | 33.3 | 0.667 | 0.333 |" in out
    assert (tmp_path / "a" / "diagnosis.json").exists() and (tmp_path / "b" / "diagnosis.json").exists()
    _, _, folder = tiny("llava")
    data = os.path.dirname(_write_dataset(str(tmp_path / "data"), n=2))  # a folder: its test.jsonl is read
    diagnose.main(["--model", folder, "--data", data, "--out", str(tmp_path / "eval")])
    summary = json.loads((tmp_path / "eval" / "diagnosis.json").read_text())
    assert set(summary) == {"shapes", "sums", "vqa"} and summary["sums"]["fb"]["n"] == 2


def test_mse_consistency_matches_float64_formula_and_trains_the_perturbed_side_only():
    g = torch.Generator().manual_seed(2)
    a = (torch.randn(3, 2, 7, generator=g) * 3).requires_grad_(True)
    b = (torch.randn(3, 2, 7, generator=g) * 3).requires_grad_(True)
    mask = torch.tensor([[True, True], [True, False], [False, False]])
    per_token = [sum((float(y) - float(x)) ** 2 for x, y in zip(a[i, j].double(), b[i, j].double())) / 7
                 for i in range(3) for j in range(2) if mask[i, j]]
    for tau in (1.0, 2.0):  # a temperature does not enter the MSE
        assert losses.consistency(a, b, "mse", tau, mask, "sum").item() == pytest.approx(sum(per_token), rel=1e-5)
        got = losses.consistency(a, b, "mse", tau, mask)
        assert got.item() == pytest.approx(sum(per_token) / 3, rel=1e-5)
    unmasked = [sum((float(y) - float(x)) ** 2 for x, y in zip(a[i, j], b[i, j])) / 7
                for i in range(3) for j in range(2)]
    assert losses.consistency(a, b, "mse").item() == pytest.approx(sum(unmasked) / 6, rel=1e-5)
    assert losses.consistency(a, a.detach().clone(), "mse").item() == 0
    got.backward()
    assert a.grad is None  # the original is a detached target; d/db = 2 (b - a) / V per valid token / count
    expected = 2 * (b - a).detach().double() / 7 / 3 * mask[..., None]
    assert torch.allclose(b.grad.double(), expected, atol=1e-6) and b.grad[~mask].abs().sum() == 0


def test_toy_smoke_runs_every_stage_once(tmp_path):
    """toy.py --smoke, the check to run after a change: data, a tiny model, 5 steps of ours, evaluation and diagnosis,
    every intervention of each task in the diagnosis."""
    subprocess.run([sys.executable, "toy.py", "--smoke", "--out", str(tmp_path)], check=True,
                   cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True)
    ours = tmp_path / "smoke" / "ours"
    assert [json.loads(line)["step"] for line in open(ours / "metrics.jsonl")] == [0, 1, 2, 3, 4]
    summary = json.loads((ours / "eval" / "diagnosis.json").read_text())
    assert set(summary["toy-shapes"]) == {"orig", "uf", "md"} and set(summary["toy-known"]) == {"orig", "rp", "ri",
                                                                                               "fb", "fw"}


def test_the_libraries_under_model_py_never_import_it():
    """model.py imports tiny.py (make_tiny) and prompts.py, and neither imports it back: no circle, and a processor
    carries its family's row (processor.row) instead of prompts.py reading model.FAMILIES."""
    code = "import sys, tiny, prompts, samples, perturb; print(sorted(m for m in ('model', 'train') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    assert out.stdout.strip() == "[]"
