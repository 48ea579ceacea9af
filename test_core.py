"""Tests of the core: losses against formulas written out here, the three model families against
their own transformers forward, the interventions' contracts. Tiny random-init checkpoints of the
real classes, built offline; CPU, a few minutes. Run: python -m pytest -q test_core.py
"""
import base64
import copy
import csv
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

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

import losses
import model as M
import perturb
from perturb import APPLIES, TASKS, DataError

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
    with pytest.raises(ValueError):
        losses.consistency(a, b, "mse")


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


def test_pgd_step_is_equation_7_and_respects_eps_and_mask():
    embeds = torch.zeros(2, 5, 4)
    mask = torch.tensor([[True, False, True, False, False], [False] * 5])
    w = torch.randn(2, 5, 4)
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
    signed = losses.pgd(lambda d: (w * d).sum(), embeds, mask, eps=eps, alpha=0.01, steps=1, sign=True,
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
    descs = set()
    for seed in range(200):
        out = perturb.perturb(s, "md", seed)
        desc = out["question"][: -len(s["question"]) - 1]
        assert not _names(desc, "cat") and not _names(desc, "cats"), desc
        assert out["md_option"] in (1, 3)
        if out["md_option"] == 1:
            assert desc == facts["1"]
        else:
            assert desc in [t.format(wrong="rabbit") for t in perturb.md_templates("eval")]
        descs.add(desc)
    assert facts["1"] in descs and len(descs) > 2


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
    pool = perturb.ri_pool(samples, folder=str(extra))
    assert pool == sorted(pool) and len(pool) == 4 and all(os.path.isabs(p) for p in pool)
    assert not any(p.endswith(".txt") for p in pool)
    picked = {perturb.perturb(samples[2], "ri", seed, ri_images=pool)["image"] for seed in range(60)}
    assert picked == set(pool)
    with pytest.raises(ValueError, match="ri_images"):
        perturb.perturb(samples[2], "ri", 0)
    with pytest.raises(ValueError):
        perturb.ri_pool([samples[2]])


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


# ---- model -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    cache = {}

    def get(fam):
        if fam not in cache:
            m, p = M.load(M.make_tiny(fam, str(root / fam)))
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
    batch = M.collate(p, _samples())
    assert len(set(batch["attention_mask"].sum(1).tolist())) == 3  # rows of different lengths: padding matters
    with torch.no_grad():
        ref = m(**M.model_inputs(batch)).logits
        embeds, image_mask = M.embed(m, batch)
        got = M.logits(m, embeds, batch)
        again = M.logits(m, embeds, batch)  # no state carried from one call to the next (Qwen's rope_deltas)
    assert torch.allclose(got, ref, atol=1e-5) and torch.equal(got, again)
    assert image_mask.tolist() == (batch["input_ids"] == m.config.image_token_id).tolist()
    assert image_mask.sum(1).min() > 0


@pytest.mark.parametrize("fam", FAMILIES)
def test_labels_cover_exactly_the_answer_tokens(tiny, fam):
    m, p, _ = tiny(fam)
    samples = _samples()
    batch = M.collate(p, samples)
    tok = p.tokenizer
    for row, s in enumerate(samples):
        n = int(batch["attention_mask"][row].sum())
        where = (batch["labels"][row] != -100).nonzero().flatten().tolist()
        assert where == [n - 2, n - 1]  # the letter and the end of sequence close the real tokens
        assert tok.convert_ids_to_tokens(batch["labels"][row, where].tolist()) == [perturb.LETTERS[s["answer"]],
                                                                                   tok.eos_token]
        assert batch["labels"][row, where].tolist() == batch["input_ids"][row, where].tolist()
    letters = M.option_token_ids(p, 4)
    assert tok.convert_ids_to_tokens(letters) == ["A", "B", "C", "D"]
    plain = M.collate(p, samples, train=False)
    assert (plain["labels"] == -100).all()
    assert plain["input_ids"].shape[1] == batch["input_ids"].shape[1] - 2
    # the loss transformers computes from these labels is our sft_loss
    with torch.no_grad():
        out = m(**M.model_inputs(batch), labels=batch["labels"])
    assert losses.sft_loss(out.logits, batch["labels"]).item() == pytest.approx(out.loss.item(), rel=1e-5)


def test_a_sequence_longer_than_max_length_is_an_error_naming_the_sample(tiny):
    _, p, _ = tiny("llava")
    with pytest.raises(ValueError, match="img-1.*max_length=10"):
        M.collate(p, _samples()[:1], max_length=10)


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
    batch = M.collate(p, _samples())
    with torch.no_grad():
        assert torch.equal(plain(**M.model_inputs(batch)).logits, m(**M.model_inputs(batch)).logits)
    if fam != "qwen2.5-vl":  # a Qwen processor needs torchvision (SPEC section 6)
        assert type(transformers.AutoProcessor.from_pretrained(folder)) is type(p)


def test_pgd_on_a_tiny_model_raises_the_loss_and_leaves_parameter_grads(tiny):
    m, p, _ = tiny("llava")
    batch = M.collate(p, _samples())
    embeds, image_mask = M.embed(m, batch)
    mask = losses.modality_mask(batch["tasks"], image_mask, batch["labels"], batch["attention_mask"])
    assert mask[0].any() and mask[1].any() and not mask[2].any()
    base = embeds.detach()

    def loss_fn(delta):
        return losses.sft_loss(M.logits(m, base + delta, batch), batch["labels"])
    before = {n: None if q.grad is None else q.grad.clone() for n, q in m.named_parameters()}
    delta = losses.pgd(loss_fn, base, mask, eps=0.5, alpha=50.0, steps=3, sign=False)
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
    """A few image-heavy, text-heavy and VQA samples in SPEC section 1 format, images on disk."""
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
                            size=M.image_size(p), ri_images=ri)
        b = M.collate(p, [s], train=False)
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


@pytest.mark.parametrize("edit, line, message", [
    (lambda rows: rows[4].update(task="text_heavy", intervention="fb"), 5, "id 'b' has task.* on line 4"),
    (lambda rows: rows[1].update(probs=[0.2, 0.2, 0.2]), 2, "probs must be a distribution"),
    (lambda rows: rows.pop(8), 9, "'fb' row of id 't' has no 'orig' row"),
    (lambda rows: rows[0].update(pred=1), 1, "pred 1 is not an argmax"),
    (lambda rows: rows[3].update(intervention="fb"), 4, "intervention 'fb' does not apply to task 'image_heavy'"),
    (lambda rows: rows[5].update(intervention="md"), 6, "a second 'md' row for id 'b'"),
])
def test_diagnose_reports_bad_predictions_with_their_line(tmp_path, edit, line, message):
    import diagnose
    rows = _handmade()
    edit(rows)
    path = tmp_path / "predictions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=re.escape(f"{path}:{line}: ") + message):
        diagnose.read(str(path))


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
    tok = M.make_tokenizer(vocab)
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
    """toy.py with the default world and vanilla training, fewer test samples and half the fine-tuning
    steps (seed 0; about 2.8 min on 2 cores): the vanilla model is fooled by misleading descriptions
    (measured: delta_cp 0.88 with 2 threads), the `ours` model is not (0.00), both well above chance.
    (The text-heavy side shows too, 0.09 under RI on the 33 known-colour questions, 0.00 after `ours`,
    but with so few questions it is left to the quick start. With 500 samples per task and 500 vanilla
    steps, an older world's MD delta_cp was 0.30 with 1 thread and 0.18 with 2: too little training makes
    the effect depend on the machine.)"""
    out, data = tmp_path / "out", tmp_path / "data"
    subprocess.run([sys.executable, "toy.py", "--out", str(out), "--data", str(data), "--n-test", "60",
                    "--finetune-steps", "150"], check=True, cwd=os.path.dirname(os.path.abspath(__file__)),
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

# ---- train.py --------------------------------------------------------------------------------------------

HERE = os.path.dirname(os.path.abspath(__file__))
PRESET_TERMS = {"fft-vqa": (False, False), "fft-aug": (False, False), "kl": (False, True), "js": (False, True),
                "rg": (True, False), "pgd": (True, False), "ours": (True, True)}  # (adversarial, consistency)


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """2 image-heavy, 2 text-heavy and 4 VQA toy samples (one global batch of 8 at the default ratios),
    and tiny models of each family that know the toy words."""
    root = tmp_path_factory.mktemp("toy")
    subprocess.run([sys.executable, "data/toy/prepare.py", "--n-train", "4", "--n-test", "1", "--out", str(root)],
                   check=True, cwd=HERE, capture_output=True)
    rows = [json.loads(line) for line in open(root / "train.jsonl")]
    keep = [r for t, n in (("image_heavy", 2), ("text_heavy", 2), ("vqa", 4)) for r in
            [r for r in rows if r["task"] == t][:n]]
    (root / "mini.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep))
    words = (root / "vocab.txt").read_text().split()
    models = {fam: M.make_tiny(fam, str(root / fam), words) for fam in FAMILIES}
    return str(root / "mini.jsonl"), models


def _train(argv, monkeypatch):
    """Runs train.py in this process (a process group of one) and returns its globals."""
    import runpy
    env = dict(os.environ)
    monkeypatch.setattr(sys, "argv", ["train.py"] + argv)
    try:
        return runpy.run_path(os.path.join(HERE, "train.py"), run_name="__main__")
    finally:
        if torch.distributed.is_initialized():  # a run stopped by an error leaves its group behind
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(env)


def _metrics(folder):
    return [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]


def _weights(folder):
    """The parameters of a saved folder as plain transformers loads them."""
    return dict(transformers.AutoModelForImageTextToText.from_pretrained(folder).named_parameters())


@pytest.mark.parametrize("preset", list(PRESET_TERMS) + ["vanilla"])
def test_each_preset_trains_only_what_it_should(toy, tmp_path, monkeypatch, preset):
    data, models = toy
    out = str(tmp_path / preset)
    _train(["--model", models["llava"], "--data", data, "--out", out, "--preset", preset, "--lr", "1e-3",
            "--eps", "0.05"] + ([] if preset == "vanilla" else ["--max-steps", "2"]), monkeypatch)
    before, after = _weights(models["llava"]), _weights(out)
    assert before.keys() == after.keys()
    frozen = [k for k in before if k.startswith("model.vision_tower.")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)  # the vision tower never changes
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    if preset == "vanilla":
        assert not changed and not _metrics(out)  # no training: the base model, exported for evaluation
        return
    assert any(k.startswith("model.multi_modal_projector.") for k in changed)
    assert any(k.startswith("model.language_model.layers.") for k in changed)
    adversarial, consistent = PRESET_TERMS[preset]
    for row in _metrics(out):
        assert (row["adv"] > 0) == adversarial and (row["cons"] > 0) == consistent and row["sft"] > 0


@pytest.mark.parametrize("fam", FAMILIES)
def test_the_output_folder_is_the_trained_model_for_plain_transformers(toy, tmp_path, monkeypatch, fam):
    data, models = toy
    out = str(tmp_path / fam)
    g = _train(["--model", models[fam], "--data", data, "--out", out, "--max-steps", "2", "--lr", "1e-3"], monkeypatch)
    trained = g["full"]  # the weights the training process held at the end, gathered from its shards
    plain = transformers.AutoModelForImageTextToText.from_pretrained(out).eval()
    state = plain.state_dict()
    assert set(state) <= set(trained) and all(torch.equal(state[k], trained[k]) for k in state)
    base, processor = M.load(models[fam])
    base.load_state_dict(trained)
    batch = M.collate(processor, [perturb.perturb(s, "orig", 0, size=M.image_size(processor))
                                  for s in perturb.load_samples(data)])
    with torch.no_grad():
        assert torch.equal(plain(**M.model_inputs(batch)).logits, base.eval()(**M.model_inputs(batch)).logits)
    frozen = M.FAMILIES[fam]["frozen"]
    original = dict(M.load(models[fam])[0].named_parameters())
    assert all(torch.equal(q, original[n]) for n, q in plain.named_parameters() if n.startswith(frozen))
    if fam == "instructblip":
        assert any(n.startswith("qformer.") for n, _ in plain.named_parameters())


@pytest.mark.parametrize("fam", FAMILIES)
def test_two_processes_train_like_one_and_the_loss_falls(toy, tmp_path, fam):
    """Rank 1 starts on the meta device and receives its shards and buffers from rank 0."""
    data, models = toy
    common = ["train.py", "--model", models[fam], "--data", data, "--max-steps", "6", "--lr", "2e-3",
              "--warmup", "0", "--eps", "0.05", "--out"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable] + common + [str(tmp_path / "one"), "--batch-size", "8"], check=True, cwd=HERE,
                   env=env, capture_output=True)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(29533 + list(FAMILIES).index(fam))]
                         + common + [str(tmp_path / "two"), "--batch-size", "4"], cwd=HERE, env=env,
                         capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-5000:]
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert len(one) == len(two) == 6
    for a, b in zip(one, two):
        for k in ("loss", "sft", "adv", "cons", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-7), (a["step"], k)
    assert one[-1]["sft"] < one[0]["sft"] and one[-1]["loss"] < one[0]["loss"]
    w1, w2 = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)


def test_a_killed_run_resumes_with_the_same_losses(toy, tmp_path):
    import signal
    import time
    data, models = toy
    argv = [sys.executable, "train.py", "--model", models["llava"], "--data", data, "--max-steps", "30",
            "--save-every", "3", "--lr", "1e-3", "--eps", "0.05", "--out"]
    subprocess.run(argv + [str(tmp_path / "whole")], check=True, cwd=HERE, capture_output=True)
    run = subprocess.Popen(argv + [str(tmp_path / "cut")], cwd=HERE, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    while not (tmp_path / "cut" / "ckpt-00000006").exists() and run.poll() is None:
        time.sleep(0.01)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert not (tmp_path / "cut" / "model.safetensors").exists()  # it really died before the end
    subprocess.run(argv + [str(tmp_path / "cut"), "--resume"], check=True, cwd=HERE, capture_output=True)
    whole, cut = _metrics(tmp_path / "whole"), _metrics(tmp_path / "cut")
    assert [r["step"] for r in cut] == list(range(30))
    for a, b in zip(whole, cut):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["lr"] == b["lr"]
    w1, w2 = _weights(tmp_path / "whole"), _weights(tmp_path / "cut")
    assert all(torch.allclose(w1[k], w2[k], atol=1e-6) for k in w1)
    again = subprocess.run(argv + [str(tmp_path / "cut")], cwd=HERE, capture_output=True, text=True)
    assert again.returncode == 1 and "pass --resume" in again.stderr  # a fresh run never deletes checkpoints
    assert (tmp_path / "cut" / "ckpt-00000030").exists()


def test_bad_training_data_fails_before_training_naming_the_line(toy, tmp_path):
    data, models = toy
    lines = open(data).read().splitlines()
    lines[2] = lines[2].replace('"answer": ', '"answer": 9, "x": ')
    bad = os.path.join(os.path.dirname(data), "bad.jsonl")  # beside the images it refers to
    open(bad, "w").write("\n".join(lines) + "\n")
    res = subprocess.run([sys.executable, "train.py", "--model", models["llava"], "--data", bad, "--out",
                          str(tmp_path / "out")], cwd=HERE, capture_output=True, text=True)
    assert res.returncode != 0 and f"error: {bad}:3: answer 9 is not among" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "out").exists()


def test_non_finite_losses_skip_steps_and_then_stop(toy, tmp_path, monkeypatch):
    data, models = toy
    out = str(tmp_path / "nan")
    with pytest.raises(SystemExit, match="2 non-finite losses in a row"):
        _train(["--model", models["llava"], "--data", data, "--out", out, "--max-steps", "6", "--lr", "1e30",
                "--warmup", "0", "--max-bad-steps", "2"], monkeypatch)
    rows = _metrics(out)
    assert len(rows) >= 1 and all(math.isfinite(r["loss"]) for r in rows)
    assert not os.path.exists(os.path.join(out, "model.safetensors"))


def test_accumulation_and_activation_checkpointing_leave_the_step_unchanged(toy, tmp_path, monkeypatch):
    data, models = toy
    common = ["--model", models["llava"], "--data", data, "--max-steps", "3", "--lr", "1e-3", "--eps", "0.05"]
    _train(common + ["--out", str(tmp_path / "plain")], monkeypatch)
    _train(common + ["--out", str(tmp_path / "accum"), "--batch-size", "4", "--grad-accum", "2"], monkeypatch)
    g = _train(common + ["--out", str(tmp_path / "ckpt"), "--activation-checkpointing"], monkeypatch)
    assert g["hf_model"].is_activation_checkpointing
    plain = _metrics(tmp_path / "plain")
    for other in ("accum", "ckpt"):
        for a, b in zip(plain, _metrics(tmp_path / other)):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"],
                                                                                                       rel=1e-4)


# ---- bench.py: profile, compute floor, memory plan (what it measures is never asserted as a time) -------

def test_profile_times_every_phase_without_changing_the_step(toy, tmp_path, monkeypatch):
    data, models = toy
    common = ["--model", models["llava"], "--data", data, "--max-steps", "2", "--lr", "1e-3", "--eps", "0.05",
              "--pgd-steps", "3", "--save-every", "0", "--no-export"]
    _train(common + ["--out", str(tmp_path / "plain")], monkeypatch)
    _train(common + ["--out", str(tmp_path / "profiled"), "--profile"], monkeypatch)
    plain, profiled = _metrics(tmp_path / "plain"), _metrics(tmp_path / "profiled")
    for a, b in zip(plain, profiled):
        assert a["loss"] == b["loss"] and a["tokens"] == b["tokens"] > 0 and "phases" not in a
    for m in profiled:
        assert set(m["phases"]) == {"data", "embed", "noise", "pgd1", "pgd2", "pgd3", "forward", "backward",
                                    "optimizer"} and all(v > 0 for v in m["phases"].values())
        assert m["peak_mem"] > 2**20
    assert sum(profiled[0]["phases"].values()) <= profiled[0]["time"]  # laps partition the step
    assert os.listdir(tmp_path / "profiled") == ["metrics.jsonl"]  # --save-every 0 --no-export: nothing else
    mini = [json.loads(line) for line in open(data)]  # 4 image/text originals + 4 twins + 4 VQA rows
    _, processor = M.load(models["llava"])
    rows = [perturb.perturb(s, "orig", 0, size=M.image_size(processor)) for s in perturb.load_samples(data)]
    originals = int(M.collate(processor, rows, train=True)["attention_mask"].sum())
    assert len(mini) == 8 and profiled[0]["tokens"] > originals  # the twins' tokens count too


def test_the_compute_floor_counts_row_passes():
    import bench
    # fft-aug at the paper's mix: B originals + B/2 twins, forward 1 + backward 2 per row = 4.5 B
    assert bench.floor("fft-aug", 2) == 1.0 and bench.floor("js", 2) == bench.floor("kl", 2) == 1.0
    assert bench.floor("fft-vqa", 2) == pytest.approx(3 / 4.5)  # B VQA rows, no twins
    assert bench.floor("rg", 2) == pytest.approx((4.5 + 3 * 1.0) / 4.5)  # + one pass over the B perturbed rows
    # + T PGD steps over those B rows, forward 1 + backward w.r.t. delta 1
    assert bench.floor("ours", 2) == bench.floor("pgd", 2) == pytest.approx((4.5 + 3 + 2 * 2) / 4.5)
    assert bench.floor("ours", 3) - bench.floor("ours", 2) == pytest.approx(2 / 4.5)


def test_the_memory_plan_is_the_published_architecture_sharded_as_fsdp2_does():
    import bench
    world = 4
    r = bench.plan("llava-1.5-7b", world, rows=20, length=700)
    assert r["total"] == 7_063_427_072  # llava-hf/llava-1.5-7b-hf's parameter count
    config, _ = M.make_parts("llava", (), **bench.ARCHS["llava-1.5-7b"])
    with torch.device("meta"):
        m = transformers.LlavaForConditionalGeneration(config)
    # FSDP2 splits every tensor on dim 0 into world chunks; rank 0 holds the first (largest) one
    shard = {n: -(-q.shape[0] // world) * q[0].numel() for n, q in m.named_parameters()}
    trained = [n for n in shard if not n.startswith("model.vision_tower.")]
    assert r["params"] == 4 * sum(shard.values()) and r["grads"] == 4 * sum(shard[n] for n in trained)
    assert r["adam"] == 2 * r["grads"]
    embed = m.model.language_model.embed_tokens.weight.numel()
    assert r["unit"] > 2 * embed  # the root unit: embedding table + lm head (+ projector) in bf16
    assert bench.plan("llava-1.5-13b", 8, 20, 700)["total"] == pytest.approx(13.35e9, rel=1e-3)


def test_bench_times_each_preset_on_the_same_batches(tmp_path, capsys):
    import bench
    bench.main(["--arch", "tiny", "--presets", "fft-aug", "ours", "--extra-pgd-steps", "1", "3", "--steps", "1",
                "--out", str(tmp_path), "--plan"])
    results = json.load(open(tmp_path / "speed-tiny.json"))
    assert list(results) == ["fft-aug", "ours", "ours T=1", "ours T=3"]
    assert [results[k]["floor"] for k in results] == [bench.floor("fft-aug", 2), bench.floor("ours", 2),
                                                      bench.floor("ours", 1), bench.floor("ours", 3)]
    assert not any(k.startswith("pgd") and v for k, v in results["fft-aug"]["phases"].items())
    assert results["ours T=3"]["phases"]["pgd3"] > 0 and results["ours"]["phases"]["pgd3"] == 0
    tokens = {k: r["tokens"] * r["step"] for k, r in results.items()}  # the same batches: the same tokens
    assert len({round(t) for t in tokens.values()}) == 1
    out = capsys.readouterr().out
    assert "| fft-aug |" in out and "| 1.00 | 1.00 |" in out and "each extra PGD step" in out


# ---- dataset converters ---------------------------------------------------------------------------------

def _photo(path, color=(10, 20, 30)):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)
    return path


def _png_bytes(color=(200, 0, 0)):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def _run(name, *args, ok=True):
    res = subprocess.run([sys.executable, f"data/{name}/prepare.py", *map(str, args)], cwd=HERE,
                         capture_output=True, text=True)
    if ok:
        assert res.returncode == 0, res.stderr
    return res


def _read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _bytes(path):
    with open(path, "rb") as f:
        return f.read()


def _write_json(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)
    return path


def _write_parquet(path, rows):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.mark.parametrize("name,extra", [
    ("miniimagenet", []), ("caltech101", []), ("openbookqa", []), ("mmlu", []), ("scienceqa", []),
    ("mmbench", []), ("seedbench", []), ("llava_instruct", []), ("authors", ["--task", "vqa"])])
def test_every_converter_names_a_missing_src(tmp_path, name, extra):
    missing = tmp_path / "not-downloaded"
    res = _run(name, "--src", missing, "--out", tmp_path / "out", *extra, ok=False)
    assert res.returncode != 0 and str(missing) in res.stderr and "Traceback" not in res.stderr


# ---- image-heavy ---------------------------------------------------------------------------------------

def _miniimagenet(root):
    layout = {"train": ["n01", "n02"], "val": ["n03"], "test": ["n04", "n05"]}
    for split, classes in layout.items():
        for k, cls in enumerate(classes):
            for i in range(3):
                _photo(str(root / split / cls / f"{cls}{i:08d}.jpg"), (k * 40, i * 60, 90))
    (root / "train" / "n01" / "notes.txt").write_text("not an image")
    names = root / "names.txt"
    names.write_text("n01 tench, Tinca tinca\nn02,goldfish\nn03 great white shark\nn04 jay\nn05 house finch\n")
    return {"n01": "tench", "n02": "goldfish", "n03": "great white shark", "n04": "jay", "n05": "house finch"}


def test_miniimagenet_samples_disjoint_splits_with_named_options_deterministically(tmp_path):
    names = _miniimagenet(tmp_path / "src")
    args = ["--src", tmp_path / "src", "--names", tmp_path / "src" / "names.txt", "--n-train", 8, "--n-test", 4]
    res = _run("miniimagenet", *args, "--out", tmp_path / "a")
    _run("miniimagenet", *args, "--out", tmp_path / "b")
    assert "found 15 images of 5 classes" in res.stdout and "ignored 1 non-image files" in res.stdout
    for split, n in (("train", 8), ("test", 4)):
        assert _bytes(tmp_path / "a" / f"{split}.jsonl") == _bytes(tmp_path / "b" / f"{split}.jsonl")
        rows = _read(tmp_path / "a" / f"{split}.jsonl")
        assert len(rows) == n and f"kept {n}, skipped 0" in res.stdout
        for r in rows:
            cls = r["id"].split("-")[2]
            assert r["id"].startswith(f"miniimagenet-{split}-n0") and r["task"] == "image_heavy"
            assert r["question"] == "What is the main object in the image?" and r["source"] == "miniimagenet"
            assert len(r["options"]) == 4 == len(set(r["options"])) and set(r["options"]) <= set(names.values())
            assert r["options"][r["answer"]] == names[cls]
            assert (tmp_path / "a" / r["image"]).is_file() and r["image"].startswith(f"images/{split}/")
        assert len(perturb.load_samples(tmp_path / "a" / f"{split}.jsonl")) == n
    train, test = (_read(tmp_path / "a" / f"{s}.jsonl") for s in ("train", "test"))
    assert not {r["id"].split("-", 2)[2] for r in train} & {r["id"].split("-", 2)[2] for r in test}
    answers = [r["answer"] for r in train + test]
    assert len(set(answers)) > 1  # shuffled, not always in first place


def test_miniimagenet_csv_layout_reports_missing_image_and_folder_names(tmp_path):
    src = tmp_path / "src"
    for i, cls in enumerate(["golden_retriever", "tank", "lion", "ant", "dome"]):
        _photo(str(src / "images" / f"{cls}{i}.jpg"), (i * 50, 0, 0))
    (src / "train.csv").write_text("filename,label\n" + "".join(
        f"{c}{i}.jpg,{c}\n" for i, c in enumerate(["golden_retriever", "tank", "lion", "ant", "dome"]))
        + "gone.jpg,tank\n")
    res = _run("miniimagenet", "--src", src, "--out", tmp_path / "out", "--n-train", 10, "--n-test", 0)
    rows = _read(tmp_path / "out" / "train.jsonl")
    assert len(rows) == 5 and "kept 5, skipped 1: 1 missing image" in res.stdout and "only 5 were left" in res.stdout
    assert "golden retriever" in {o for r in rows for o in r["options"]}


def test_caltech_ignores_background_and_holds_out_per_class(tmp_path):
    root = tmp_path / "caltech" / "101_ObjectCategories"
    classes = ["accordion", "car_side", "Faces_easy", "panda", "yin_yang"]
    for k, cls in enumerate(classes + ["BACKGROUND_Google"]):
        for i in range(1, 7):
            _photo(str(root / cls / f"image_{i:04d}.jpg"), (k * 40, i * 30, 0))
    args = ["--n-train", 100, "--n-test", 10]
    res = _run("caltech101", "--src", tmp_path / "caltech", "--out", tmp_path / "a", *args)
    _run("caltech101", "--src", root, "--out", tmp_path / "b", *args)
    assert "found 30 images of 5 classes" in res.stdout and "only 20 were available" in res.stdout
    labels = {c.replace("_", " ") for c in classes}
    for split, n in (("train", 20), ("test", 10)):
        assert _bytes(tmp_path / "a" / f"{split}.jsonl") == _bytes(tmp_path / "b" / f"{split}.jsonl")
        rows = perturb.load_samples(tmp_path / "a" / f"{split}.jsonl")
        assert len(rows) == n
        for r in rows:
            assert "BACKGROUND" not in r["id"] and set(r["options"]) <= labels and len(r["options"]) == 4
            assert r["options"][r["answer"]] == r["id"].split("-")[2].replace("_", " ")
    per_class = [r["id"].split("-")[2] for r in _read(tmp_path / "a" / "test.jsonl")]
    assert sorted(per_class) == sorted(classes * 2)
    test_ids = {r["id"].split("-", 2)[2] for r in _read(tmp_path / "a" / "test.jsonl")}
    assert not test_ids & {r["id"].split("-", 2)[2] for r in _read(tmp_path / "a" / "train.jsonl")}


# ---- text-heavy ----------------------------------------------------------------------------------------

OBQA = [("7-980", "The sun is responsible for", ["puppies learning new tricks", "plants sprouting", "a flood",
                                                 "a star"], "B"),
        ("7-584", "When standing miles away from Mount Rushmore", ["the mountains seem very close",
                                                                   "the mountains are boring", "they seem small",
                                                                   "the mountains seem smaller"], "D"),
        ("8-376", "Which is empty?", ["a box", "", "a cup", "a jar"], "A")]


def _obqa_jsonl(folder, rows):
    os.makedirs(folder, exist_ok=True)
    with open(folder / "train.jsonl", "w") as f:
        for id_, stem, texts, key in rows:
            f.write(json.dumps({"id": id_, "question": {"stem": stem, "choices": [
                {"text": t, "label": l} for t, l in zip(texts, "ABCD")]}, "answerKey": key}) + "\n")
    return folder / "train.jsonl"


def test_openbookqa_reads_jsonl_and_parquet_layouts_alike(tmp_path):
    _obqa_jsonl(tmp_path / "orig" / "Main", OBQA)
    with open(tmp_path / "orig" / "Main" / "dev.jsonl", "w") as f:
        f.write(json.dumps({"id": "9-1", "question": {"stem": "Dev?", "choices": [
            {"text": "x", "label": "A"}, {"text": "y", "label": "B"}]}, "answerKey": "B"}) + "\n")
    _write_parquet(str(tmp_path / "hf" / "main" / "train-00000-of-00001.parquet"), [
        {"id": i, "question_stem": s, "choices": {"text": t, "label": list("ABCD")}, "answerKey": k}
        for i, s, t, k in OBQA])
    _write_parquet(str(tmp_path / "hf" / "main" / "validation-00000-of-00001.parquet"), [
        {"id": "9-1", "question_stem": "Dev?", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "B"}])
    _write_parquet(str(tmp_path / "hf" / "additional" / "train-00000-of-00001.parquet"), [
        {"id": "0-0", "question_stem": "ignored", "choices": {"text": ["a", "b"], "label": ["A", "B"]},
         "answerKey": "A"}])
    res = _run("openbookqa", "--src", tmp_path / "orig", "--out", tmp_path / "a")
    _run("openbookqa", "--src", tmp_path / "hf", "--out", tmp_path / "b")
    assert "kept 2, skipped 1: 1 empty options" in res.stdout
    for split in ("train", "validation"):
        assert _bytes(tmp_path / "a" / f"{split}.jsonl") == _bytes(tmp_path / "b" / f"{split}.jsonl")
    train = perturb.load_samples(tmp_path / "a" / "train.jsonl")
    assert [r["id"] for r in train] == ["openbookqa-train-7-980", "openbookqa-train-7-584"]
    assert train[0]["options"] == OBQA[0][2] and train[0]["answer"] == 1 and train[1]["answer"] == 3
    assert all(r["task"] == "text_heavy" and r["image"] is None and r["source"] == "openbookqa" for r in train)
    assert train[0]["question"] == "The sun is responsible for"
    val = _read(tmp_path / "a" / "validation.jsonl")
    assert val[0]["id"] == "openbookqa-validation-9-1" and val[0]["options"] == ["x", "y"] and val[0]["answer"] == 1


def test_openbookqa_bad_answer_key_names_file_and_line(tmp_path):
    path = _obqa_jsonl(tmp_path / "Main", [OBQA[0], OBQA[1][:3] + ("E",)])
    res = _run("openbookqa", "--src", tmp_path, "--out", tmp_path / "out", ok=False)
    assert res.returncode != 0 and f"{path}:2: answerKey 'E'" in res.stderr


def _mmlu_csv(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def test_mmlu_accepts_letter_and_index_answers_in_csv_and_parquet(tmp_path):
    src = tmp_path / "csv" / "data"
    _mmlu_csv(src / "test" / "abstract_algebra_test.csv", [
        ["Find the degree of Q(sqrt(2)) over Q.", "0", "4", "2", "6", "C"],
        ["Is 7, a prime?", "yes", "no", "maybe", "never", "0"],
        ["Empty option?", "a", "", "c", "d", "A"]])
    _mmlu_csv(src / "dev" / "abstract_algebra_dev.csv", [["Dev q", "a", "b", "c", "d", "B"]])
    _mmlu_csv(src / "auxiliary_train" / "race.csv", [["Aux q", "a", "b", "c", "d", "D"]])
    _mmlu_csv(src / "val" / "abstract_algebra_val.csv", [["Val q", "a", "b", "c", "d", "1"]])
    res = _run("mmlu", "--src", tmp_path / "csv", "--out", tmp_path / "a")
    assert "kept 2, skipped 1: 1 empty options" in res.stdout
    test = perturb.load_samples(tmp_path / "a" / "test.jsonl")
    assert [r["answer"] for r in test] == [2, 0] and test[0]["options"] == ["0", "4", "2", "6"]
    assert [r["id"] for r in test] == ["mmlu-test-000000", "mmlu-test-000001"]
    assert all(r["task"] == "text_heavy" and r["image"] is None and r["subject"] == "abstract_algebra" for r in test)
    train = perturb.load_samples(tmp_path / "a" / "train.jsonl")
    assert sorted((r["question"], r["answer"]) for r in train) == [("Aux q", 3), ("Dev q", 1)]
    assert _read(tmp_path / "a" / "validation.jsonl")[0]["answer"] == 1
    hf = tmp_path / "hf"
    rows = [{"question": "Find the degree of Q(sqrt(2)) over Q.", "subject": "abstract_algebra",
             "choices": ["0", "4", "2", "6"], "answer": 2},
            {"question": "Is 7, a prime?", "subject": "abstract_algebra", "choices": ["yes", "no", "maybe", "never"],
             "answer": 0}]
    _write_parquet(str(hf / "all" / "test-00000-of-00001.parquet"), rows)
    _write_parquet(str(hf / "abstract_algebra" / "test-00000-of-00001.parquet"), rows)  # the same rows again
    _write_parquet(str(hf / "all" / "dev-00000-of-00001.parquet"), [
        {"question": "Dev q", "subject": "abstract_algebra", "choices": list("abcd"), "answer": "B"}])
    _run("mmlu", "--src", hf, "--out", tmp_path / "b")
    assert _bytes(tmp_path / "a" / "test.jsonl") == _bytes(tmp_path / "b" / "test.jsonl")
    assert [r["answer"] for r in _read(tmp_path / "b" / "train.jsonl")] == [1]


def test_mmlu_bad_answer_errors_with_file_and_line(tmp_path):
    path = _mmlu_csv(tmp_path / "data" / "test" / "anatomy_test.csv", [
        ["ok", "a", "b", "c", "d", "A"], ["bad", "a", "b", "c", "d", "E"]])
    res = _run("mmlu", "--src", tmp_path, "--out", tmp_path / "out", ok=False)
    assert res.returncode != 0 and f"{path}:2: answer 'E'" in res.stderr


# ---- VQA -----------------------------------------------------------------------------------------------

def _problem(split, image, hint="", answer=0):
    return {"question": "Which animal is shown?", "choices": ["cat", "dog"], "answer": answer, "hint": hint,
            "image": image, "split": split, "task": "closed choice", "lecture": "", "solution": ""}


def test_scienceqa_keeps_image_items_with_hint_context(tmp_path):
    src = tmp_path / "scienceqa"
    _write_json(str(src / "problems.json"), {
        "1": _problem("train", "image.png", hint="The picture was taken at a farm."),
        "2": _problem("train", None, hint="No picture."),
        "10": _problem("test", "image.png", answer=1),
        "4": _problem("val", "image.png")})
    _photo(str(src / "images" / "train" / "1" / "image.png"))
    _photo(str(src / "test" / "10" / "image.png"))  # the layout without images/
    res = _run("scienceqa", "--src", src, "--out", tmp_path / "out")
    assert "train.jsonl: kept 1, skipped 1: 1 no image" in res.stdout
    assert "validation.jsonl: kept 0, skipped 1: 1 missing image" in res.stdout
    train = perturb.load_samples(tmp_path / "out" / "train.jsonl")
    assert train[0]["id"] == "scienceqa-train-1" and train[0]["task"] == "vqa"
    assert train[0]["question"] == "Context: The picture was taken at a farm.\nWhich animal is shown?"
    assert train[0]["options"] == ["cat", "dog"] and train[0]["answer"] == 0 and train[0]["source"] == "scienceqa"
    test = perturb.load_samples(tmp_path / "out" / "test.jsonl")
    assert test[0]["question"] == "Which animal is shown?" and test[0]["answer"] == 1


def test_scienceqa_parquet_layout_decodes_images_and_skips_imageless(tmp_path):
    row = dict(_problem("train", None), image={"bytes": _png_bytes(), "path": None})
    del row["split"]
    _write_parquet(str(tmp_path / "hf" / "data" / "test-00000-of-00001-f0e7.parquet"),
                   [row, dict(row, image=None, question="Text only?")])
    res = _run("scienceqa", "--src", tmp_path / "hf", "--out", tmp_path / "out")
    assert "test.jsonl: kept 1, skipped 1: 1 no image" in res.stdout
    rows = perturb.load_samples(tmp_path / "out" / "test.jsonl")
    assert rows[0]["id"] == "scienceqa-test-00000" and rows[0]["question"] == "Which animal is shown?"
    with Image.open(rows[0]["image"]) as im:
        assert im.size == (8, 8) and im.getpixel((0, 0)) == (200, 0, 0)


def _b64_image(color):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="JPEG")
    return base64.b64encode(buf.getvalue()).decode()


MMB_COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
               "l2-category", "comment", "split"]


def _mmbench_tsv(path, rows, columns=MMB_COLUMNS):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(columns)
        for r in rows:
            w.writerow([r.get(c, "") for c in columns])
    return path


def test_mmbench_keeps_two_option_rows_and_hints(tmp_path):
    path = _mmbench_tsv(tmp_path / "MMBench_DEV_EN.tsv", [
        dict(index="0", question='Which "shape" is this?', hint="nan", A="circle", B="square", C="star",
             D="heart", answer="B", category="shape", image=_b64_image((0, 0, 255)), split="dev"),
        dict(index="1", question="Is it day?", hint="The sky is bright.", A="yes", B="no", answer="A",
             category="time", image=_b64_image((255, 255, 0)), split="dev"),
        dict(index="2", question="Same image, other question?", hint="", A="red", B="blue", C="green",
             answer="C", image="0", split="dev"),
        dict(index="3", question="Broken image?", A="a", B="b", answer="A", image="!!not base64!!" * 30)])
    res = _run("mmbench", "--src", path, "--out", tmp_path / "out")
    assert "kept 3, skipped 1: 1 missing or undecodable image" in res.stdout
    rows = perturb.load_samples(tmp_path / "out" / "test.jsonl")
    assert [r["id"] for r in rows] == ["mmbench-test-0", "mmbench-test-1", "mmbench-test-2"]
    assert rows[0]["question"] == 'Which "shape" is this?' and rows[0]["answer"] == 1 and len(rows[0]["options"]) == 4
    assert rows[1]["question"] == "Context: The sky is bright.\nIs it day?" and rows[1]["options"] == ["yes", "no"]
    assert rows[2]["options"] == ["red", "blue", "green"] and rows[2]["answer"] == 2
    assert all(r["task"] == "vqa" and r["source"] == "mmbench" and r["image"].endswith(".png") for r in rows)
    with Image.open(rows[2]["image"]) as im:
        assert im.format == "PNG" and im.convert("RGB").getpixel((4, 4))[2] > 200  # the blue image of row 0


def test_mmbench_skips_a_test_tsv_without_answers_and_errors_on_answer_without_option(tmp_path):
    _mmbench_tsv(tmp_path / "MMBench_TEST_EN.tsv", [dict(index="0", question="q", A="a", B="b",
                                                         image=_b64_image((1, 2, 3)))],
                 columns=[c for c in MMB_COLUMNS if c != "answer"])
    res = _run("mmbench", "--src", tmp_path / "MMBench_TEST_EN.tsv", "--out", tmp_path / "out", ok=False)
    assert res.returncode != 0 and "no answer column" in res.stdout
    dev = _mmbench_tsv(tmp_path / "MMBench_DEV_EN.tsv", [
        dict(index="0", question="q", A="a", B="b", answer="A", image=_b64_image((1, 2, 3))),
        dict(index="1", question="q", A="a", B="b", answer="C", image=_b64_image((1, 2, 3)))])
    res = _run("mmbench", "--src", dev, "--out", tmp_path / "out", ok=False)
    assert res.returncode != 0 and f"{dev}:3: answer 'C'" in res.stderr


def _seed_question(qid, data_id, data_type="image", answer="A", type_id=1):
    return {"question_id": qid, "question": f"Question {qid}?", "choice_a": "one", "choice_b": "two",
            "choice_c": "three", "choice_d": "four", "answer": answer, "data_type": data_type,
            "data_id": data_id, "question_type_id": type_id}


def test_seedbench_keeps_image_items_and_skips_videos(tmp_path):
    _photo(str(tmp_path / "SEED-Bench-image" / "1454426_2591111986.jpg"))
    _photo(str(tmp_path / "SEED-Bench-image" / "777_1.jpg"), (0, 255, 0))
    src = _write_json(str(tmp_path / "SEED-Bench.json"), {"questions": [
        _seed_question("101669", "1454426_2591111986", answer="C"),
        _seed_question("101670", "777_1.jpg", answer="D"),
        _seed_question("101671", "1454426_2591111986", answer="A"),
        _seed_question("101672", "gone_1"),
        _seed_question("v1738", "94328.webm", "video", type_id=10),
        _seed_question("v1962", "P03/P03_24.MP4", "video", type_id=11)], "question_type": {"Scene Understanding": 1}})
    res = _run("seedbench", "--src", src, "--out", tmp_path / "out")
    assert "kept 3, skipped 3: 2 video questions, 1 missing image" in res.stdout
    rows = perturb.load_samples(tmp_path / "out" / "test.jsonl")
    assert [(r["id"], r["answer"]) for r in rows] == [("seedbench-test-101669", 2), ("seedbench-test-101670", 3),
                                                       ("seedbench-test-101671", 0)]
    assert rows[0]["options"] == ["one", "two", "three", "four"] and rows[0]["question"] == "Question 101669?"
    assert rows[0]["image"] == rows[2]["image"] and all(r["task"] == "vqa" for r in rows)
    _write_json(src, {"questions": [_seed_question("1", "777_1.jpg"), _seed_question("2", "777_1.jpg", answer="E")]})
    res = _run("seedbench", "--src", src, "--out", tmp_path / "bad", ok=False)
    assert res.returncode != 0 and "questions[1]: answer 'E'" in res.stderr and str(src) in res.stderr


def _llava(root):
    _photo(str(root / "coco" / "train2017" / "000000033471.jpg"))
    _photo(str(root / "gqa" / "images" / "2354786.jpg"))
    return _write_json(str(root / "llava_v1_5_mix665k.json"), [
        {"id": "000000033471", "image": "coco/train2017/000000033471.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
            {"from": "gpt", "value": "The bus in the image is white and red."},
            {"from": "human", "value": "What feature can be seen on the back of the bus?"},
            {"from": "gpt", "value": "The back of the bus features an advertisement."}]},
        {"id": "i6IyJda_0", "model": "", "conversations": [
            {"from": "human", "value": "Write a poem."}, {"from": "gpt", "value": "Roses are red."}]},
        {"id": "ocr1", "image": "ocr_vqa/images/gone.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWho wrote this book?"}, {"from": "gpt", "value": "Nobody."}]},
        {"id": "2354786", "image": "gqa/images/2354786.jpg", "conversations": [
            {"from": "human", "value": "Is the sky dark?\n<image>"}, {"from": "gpt", "value": "Yes"}]}])


def test_llava_instruct_first_exchange_all_turns_and_image_paths(tmp_path):
    src = _llava(tmp_path / "llava")
    out = tmp_path / "data" / "llava_instruct"
    res = _run("llava_instruct", "--src", src, "--out", out)
    assert "2 samples from 4 conversations" in res.stdout
    assert ("train.jsonl: kept 2, skipped 2: 1 conversations with a missing image file, "
            "1 conversations without image") in res.stdout
    rows = _read(out / "train.jsonl")
    assert [r["id"] for r in rows] == ["llava_instruct-train-000000", "llava_instruct-train-000003"]
    assert rows[0]["question"] == "What are the colors of the bus in the image?"
    assert rows[0]["answer"] == "The bus in the image is white and red." and rows[0]["options"] is None
    assert rows[1]["question"] == "Is the sky dark?" and rows[1]["answer"] == "Yes"
    assert all(r["task"] == "vqa" and r["source"] == "llava_instruct" for r in rows)
    assert rows[0]["source_id"] == "000000033471"
    assert rows[0]["image"] == "../../llava/coco/train2017/000000033471.jpg"
    assert all(os.path.isfile(os.path.join(out, r["image"])) for r in rows)
    _run("llava_instruct", "--src", src, "--out", tmp_path / "all", "--all-turns", "--copy-images")
    rows = _read(tmp_path / "all" / "train.jsonl")
    assert [r["id"] for r in rows] == ["llava_instruct-train-000000-0", "llava_instruct-train-000000-1",
                                       "llava_instruct-train-000003-0"]
    assert rows[1]["question"] == ("USER: What are the colors of the bus in the image? ASSISTANT: The bus in the "
                                   "image is white and red.\nWhat feature can be seen on the back of the bus?")
    assert rows[1]["answer"] == "The back of the bus features an advertisement."
    assert rows[0]["image"] == "images/coco/train2017/000000033471.jpg"
    assert (tmp_path / "all" / rows[0]["image"]).is_file()


def test_llava_instruct_malformed_conversation_names_the_item(tmp_path):
    src = _write_json(str(tmp_path / "bad.json"), [{"id": "a", "image": "x.jpg", "conversations": [
        {"from": "gpt", "value": "hi"}, {"from": "human", "value": "hello"}]}])
    res = _run("llava_instruct", "--src", src, "--out", tmp_path / "out", ok=False)
    assert res.returncode != 0 and f"{src}: item 0:" in res.stderr


# ---- the authors' released layout ----------------------------------------------------------------------

def test_authors_layout_options_in_letter_order_and_facts_by_index(tmp_path):
    folder = tmp_path / "caltech-101"
    _photo(str(folder / "images" / "image_0001.jpg"))
    _photo(str(folder / "image_0002.jpg"))
    fact = "The picture seems to describe a car. Cars have four wheels."
    _write_json(str(folder / "multiple_choice_data_train.json"), [
        {"id": "a1b2", "question": "What type of object is in this photo?", "image": "image_0001.jpg",
         "multiple_choices": {"B": "cat", "A": "dog", "D": "tree", "C": "car"}, "multiple_choices_answer": "B",
         "facts": {"car": fact}},
        {"id": "c3d4", "question": "What type of object is in this photo?", "image": "image_0002.jpg",
         "multiple_choices": {"A": "dog", "B": "cat"}, "multiple_choices_answer": "A", "facts": {"B": "Cats purr."}}])
    _write_json(str(folder / "multiple_choice_data_test.json"), [
        {"id": "e5", "question": "What?", "image": "gone.jpg", "multiple_choices": {"A": "x", "B": "y"},
         "multiple_choices_answer": "A"}])
    res = _run("authors", "--src", folder, "--task", "image_heavy", "--out", tmp_path / "out")
    assert "train.jsonl: kept 2, skipped 0" in res.stdout
    assert "test.jsonl: kept 0, skipped 1: 1 missing image" in res.stdout
    rows = perturb.load_samples(tmp_path / "out" / "train.jsonl")
    assert rows[0]["id"] == "caltech-101-train-a1b2" and rows[0]["source"] == "caltech-101"
    assert rows[0]["options"] == ["dog", "cat", "car", "tree"] and rows[0]["answer"] == 1
    assert rows[0]["facts"] == {"2": fact} and rows[1]["facts"] == {"1": "Cats purr."}
    assert rows[0]["task"] == "image_heavy" and rows[0]["question"] == "What type of object is in this photo?"


def test_authors_text_heavy_has_null_image_and_bad_answer_errors(tmp_path):
    src = _write_json(str(tmp_path / "MMLU" / "multiple_choice_data_test.json"), [
        {"id": "m1", "question": "2 + 2 =", "image": "ignored.jpg", "multiple_choices": {"A": "3", "B": "4"},
         "multiple_choices_answer": "B"}])
    _run("authors", "--src", src, "--task", "text_heavy", "--name", "mmlu", "--out", tmp_path / "out")
    rows = perturb.load_samples(tmp_path / "out" / "test.jsonl")
    assert rows == [dict(id="mmlu-test-m1", task="text_heavy", image=None, question="2 + 2 =", options=["3", "4"],
                         answer=1, source="mmlu")]
    _write_json(src, [{"question": "q", "multiple_choices": {"A": "3", "B": "4"}, "multiple_choices_answer": "C"}])
    res = _run("authors", "--src", src, "--task", "text_heavy", "--out", tmp_path / "bad", ok=False)
    assert res.returncode != 0 and f"{src}: item 0: multiple_choices_answer 'C'" in res.stderr


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


def test_instruction_samples_train_on_their_reply_and_are_never_scored(toy, tmp_path, monkeypatch):
    import evaluate
    data, models = toy
    rows = [json.loads(line) for line in open(data)]
    image = next(r["image"] for r in rows if r["image"])
    free = [dict(id=f"chat-{i}", task="vqa", image=image, question="What is in the image ?", options=None,
                 answer="the dots are red", source="chat") for i in range(4)]
    path = os.path.join(os.path.dirname(data), "chat.jsonl")  # beside the toy images
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows + free)
    samples = perturb.load_samples(path)
    m, p = M.load(models["llava"])
    batch = M.collate(p, [samples[-1]])
    answer = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert p.tokenizer.convert_ids_to_tokens(answer) == ["the", "dots", "are", "red", "</s>"]
    assert perturb.render(samples[-1]) == "What is in the image ?"
    jobs, _ = evaluate.load_data([path], list(APPLIES))
    assert len(jobs) > 0 and not any(s["source"] == "chat" for s, _ in jobs)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(dict(free[0], task="text_heavy", image=None)) + "\n")
    with pytest.raises(DataError, match=f"{bad}:1: options null needs task vqa"):
        perturb.load_samples(str(bad))
    out = str(tmp_path / "run")
    _train(["--model", models["llava"], "--data", path, "--out", out, "--max-steps", "2", "--ratio-image", "0",
            "--ratio-text", "0"], monkeypatch)
    assert len(_metrics(out)) == 2 and all(r["sft"] > 0 for r in _metrics(out))
