"""Tests of evaluate.py --score generate: parsing a generated answer for its option, greedy generation in
batches equal to one sample at a time for the three families, the rows it writes, and run.json's guard.
Tiny random-init checkpoints of the real classes (test_core.py's), CPU, a few seconds.
"""
import json
import os

import pytest
import torch

import evaluate
import model as M
import perturb
import samples as S
import prompts as P
from test_core import FAMILIES, _samples, _write_dataset, tiny  # noqa: F401 (tiny is a fixture)

FOUR = ["cat", "dog", "car", "tree"]


@pytest.mark.parametrize("text, options, expected", [
    ("B", FOUR, 1), ("B.", FOUR, 1), ("(B)", FOUR, 1), ("B:", FOUR, 1), ("C) car", FOUR, 2), ("**D**", FOUR, 3),
    ("Answer: C", FOUR, 2), ("The answer is (C)", FOUR, 2), ("The answer is D.", FOUR, 3),
    ("A", FOUR, 0), ("A. cat", FOUR, 0), ("A is correct", FOUR, 0), ("I think it is B", FOUR, 1),
    ("b", FOUR, 1), ("(b)", FOUR, 1), ("a", FOUR, 0), ("answer: c", FOUR, 2),  # lowercase where it is no prose
    ("it is b", FOUR, 1),
    ("dog", FOUR, 1), ("Dog.", FOUR, 1), ("a dog", FOUR, 1), ("A dog is shown", FOUR, 1),  # an option's text
    ("The answer is a dog", FOUR, 1), ("a hot dog", ["dog", "hot dog", "cat"], 1),
    ("The answer is vitamin C", ["vitamin C", "iron", "zinc"], 0),  # a letter inside an option is no letter
    ("A dog", ["dog", "cat"], 0),  # the article, followed by option A's own text
    ("a dog is shown", ["cat", "bird"], None), ("A bird", FOUR, None),  # the article, naming no option
    ("a dog, not a cat", FOUR, None),  # two options named
    ("b is it", FOUR, None), ("maybe c", FOUR, None),  # a lowercase letter inside prose
    ("E", FOUR, None), ("The answer is E", FOUR, None), ("(e)", FOUR, None),  # past the options
    ("", FOUR, None), ("   ", FOUR, None), (None, FOUR, None), ("T-shirt it's", FOUR, None),
])
def test_parse_answer_reads_the_option_a_generated_answer_names(text, options, expected):
    assert P.parse_answer(text, options) == expected


def _alone(m, p, sample, max_new_tokens, repetition_penalty, style="ours"):
    """Greedy text of one sample, no padding: the prompt sliced off by its own length."""
    b = P.collate(p, [sample], train=False, style=style)
    with torch.no_grad():
        out = m.generate(**M.model_inputs(b), do_sample=False, max_new_tokens=max_new_tokens,
                         repetition_penalty=repetition_penalty)
    new = out[0, b["input_ids"].shape[1]:].tolist()
    return p.tokenizer.decode([i for i in new if i not in p.tokenizer.all_special_ids])


@pytest.mark.parametrize("fam", FAMILIES)
def test_batched_generation_equals_one_sample_at_a_time(tiny, fam):
    m, p, _ = tiny(fam)
    samples = _samples()
    samples = [samples[1], samples[0], samples[2]]  # the longest in the middle: rows padded on both sides of it
    assert len(set(P.collate(p, samples, train=False)["attention_mask"].sum(1).tolist())) == 3
    batched = evaluate.generate(m, p, samples, max_new_tokens=5, repetition_penalty=1.2)
    alone = [_alone(m, p, s, 5, 1.2) for s in samples]
    assert batched == alone and all(alone)
    assert all(len(p.tokenizer(t, add_special_tokens=False)["input_ids"]) <= 5 for t in batched)  # new tokens only


def test_generate_scoring_writes_text_and_parsed_pred_and_counts_unparsed(tiny, tmp_path, capsys):
    m, p, folder = tiny("llava")
    data = _write_dataset(str(tmp_path / "data"), n=3)
    out = tmp_path / "out"
    evaluate.main(["--model", folder, "--data", data, "--out", str(out), "--score", "generate", "--batch-size", "4",
                   "--max-new-tokens", "3", "--repetition-penalty", "1.2", "--interventions", "orig", "md", "ri"])
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    samples = {s["id"]: s for s in perturb.load_samples(data)}
    ri = perturb.ri_pool(list(samples.values()))
    counts = {}
    for r in rows:
        s = samples[r["id"]]
        s = perturb.perturb(s, r["intervention"], evaluate.rng_for(0, s, r["intervention"]), size=P.image_size(p),
                            ri_images=ri)
        assert r["score"] == "generate" and r["probs"] is None and r["n_options"] == len(s["options"])
        assert r["text"] == _alone(m, p, s, 3, 1.2)
        assert r["pred"] == P.parse_answer(r["text"], s["options"])
        counts.setdefault(r["intervention"], [0, 0])
        counts[r["intervention"]][0] += r["pred"] is None
        counts[r["intervention"]][1] += 1
    printed = ", ".join(f"{n} {k}/{total}" for n, (k, total) in counts.items())
    assert f"answers naming no option (counted wrong): {printed}\n" in capsys.readouterr().out
    settings = json.loads((out / "run.json").read_text())
    assert (settings["score"], settings["max_new_tokens"], settings["repetition_penalty"]) == ("generate", 3, 1.2)


def test_unparsed_answers_count_as_wrong_and_are_printed_per_intervention(tiny, tmp_path, capsys, monkeypatch):
    # a random tiny model rarely names an option, so the answers are chosen here: the right letter for image
    # questions, the article and no option for text questions, option B's text for VQA
    m, p, folder = tiny("llava")
    data = _write_dataset(str(tmp_path / "data"), n=3)
    said = {"image_heavy": lambda s: f"({perturb.LETTERS[s['answer']]})", "text_heavy": lambda s: "A dog is shown",
            "vqa": lambda s: f"a {s['options'][1]}"}
    monkeypatch.setattr(evaluate, "generate", lambda m, p, samples, *a: [said[s["task"]](s) for s in samples])
    evaluate.main(["--model", folder, "--data", data, "--out", str(tmp_path / "out"), "--score", "generate",
                   "--interventions", "orig", "md", "rp"])
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert [(r["id"][:3], r["pred"]) for r in rows if r["intervention"] == "orig"] == [
        ("img", 0), ("txt", None), ("vqa", 1), ("img", 1), ("txt", None), ("vqa", 1), ("img", 2), ("txt", None),
        ("vqa", 1)]
    printed = capsys.readouterr().out
    assert "answers naming no option (counted wrong): orig 3/9, md 0/3, rp 3/3\n" in printed
    assert "| sums | 0.0 | - | 0.0 |" in printed and "| shapes | 100.0 | 100.0 | - |" in printed
    assert "| vqa | 33.3 | - | - |" in printed  # answers 0, 1, 0: option B is right once in three


def test_resume_refuses_another_scoring_or_prompt(tiny, tmp_path):
    m, p, folder = tiny("llava")
    data = _write_dataset(str(tmp_path / "data"), n=1)
    out = str(tmp_path / "out")
    rows = evaluate.run(folder, [data], out, ["orig"], loaded=(m, p))
    assert {r["score"] for r in rows} == {"logits"} and all(isinstance(r["probs"], list) and "text" not in r
                                                           for r in rows)

    def resume(**kw):
        return evaluate.run(folder, [data], out, ["orig"], resume=True, loaded=(m, p), **kw)
    with pytest.raises(evaluate.RunError, match="score logits then, generate now"):
        resume(scoring="generate")
    with pytest.raises(evaluate.RunError, match="prompt ours then, authors now"):
        resume(style="authors")
    resume(max_new_tokens=3)  # generation's settings mean nothing to letter logits
    run_json = os.path.join(out, "run.json")
    saved = json.load(open(run_json))
    json.dump({k: v for k, v in saved.items() if k not in ("score", "prompt")}, open(run_json, "w"))
    resume()  # a run.json written before --score and --prompt existed: letter logits, our prompt
    evaluate.run(folder, [data], out, ["orig"], scoring="generate", max_new_tokens=2, overwrite=True, loaded=(m, p))
    with pytest.raises(evaluate.RunError, match="max_new_tokens 2 then, 3 now"):
        resume(scoring="generate", max_new_tokens=3)
    with pytest.raises(evaluate.RunError, match="score generate then, logits now"):
        resume()


def test_prompt_authors_reaches_the_letter_logits_and_generation(tiny, tmp_path):
    m, p, folder = tiny("llava")
    data = _write_dataset(str(tmp_path / "data"), n=2)
    samples = {s["id"]: s for s in perturb.load_samples(data)}
    ours = evaluate.run(folder, [data], str(tmp_path / "ours"), ["orig"], loaded=(m, p))
    authors = evaluate.run(folder, [data], str(tmp_path / "authors"), ["orig"], style="authors", loaded=(m, p))
    letters = P.option_token_ids(p, 4, style="authors")
    for r, o in zip(authors, ours):
        s = perturb.perturb(samples[r["id"]], "orig", evaluate.rng_for(0, samples[r["id"]], "orig"), size=P.image_size(p))
        b = P.collate(p, [s], train=False, style="authors")
        with torch.no_grad():
            last = m(**M.model_inputs(b)).logits[0, -1]
        assert torch.allclose(torch.tensor(r["probs"]), torch.softmax(last[letters[:len(s["options"])]], -1), atol=1e-5)
        assert not torch.allclose(torch.tensor(r["probs"]), torch.tensor(o["probs"]), atol=1e-4)
    gen = evaluate.run(folder, [data], str(tmp_path / "gen"), ["orig"], style="authors", scoring="generate",
                       max_new_tokens=3, loaded=(m, p))
    assert [r["text"] for r in gen] == [
        _alone(m, p, perturb.perturb(samples[r["id"]], "orig", evaluate.rng_for(0, samples[r["id"]], "orig"),
                                     size=P.image_size(p)), 3, 1.0, style="authors") for r in gen]


def test_protocol_authors_sets_their_flags_and_the_facts_file_and_canvas_reach_the_interventions(tiny, tmp_path,
                                                                                                  monkeypatch):
    m, p, folder = tiny("llava")
    data = _write_dataset(str(tmp_path / "data"), n=2)
    facts = tmp_path / "facts.txt"
    facts.write_text("\ufeffThe Nile flows north.\n\nHoney never spoils.\n", encoding="utf-8")
    made, real = [], perturb.perturb
    monkeypatch.setattr(perturb, "perturb", lambda *a, **kw: made.append((a[1], kw["size"], real(*a, **kw))) or made[-1][2])
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"error: --k-facts 3: UF prepends 1 to 2 facts \(.*facts.txt; more with"):
        evaluate.main(["--model", folder, "--data", data, "--out", str(out), "--facts-file", str(facts),
                       "--k-facts", "3"])
    evaluate.main(["--model", folder, "--data", data, "--out", str(out), "--protocol", "authors", "--score", "logits",
                   "--facts-file", str(facts), "--k-facts", "3", "--interventions", "orig", "uf", "fb"])
    saved = json.loads((out / "run.json").read_text())
    assert (saved["prompt"], saved["score"], saved["canvas_size"], saved["facts_replacement"]) == (
        "authors", "logits", 336, True)  # --score given explicitly wins over the protocol's generate
    assert saved["facts_file"] == S.sha256(str(facts)) and "repetition_penalty" not in saved
    uf = [s for name, size, s in made if name == "uf" and size != 1]
    assert uf and all(s["question"].count("The Nile flows north.") + s["question"].count("Honey never spoils.") == 3
                      for s in uf)  # 3 facts drawn from 2: with replacement, from the file alone
    canvases = [s["image"] for name, size, s in made if name == "fb" and size != 1]
    assert canvases and all(im.size == (336, 336) for im in canvases)
    # the same switch through diagnose.py's one command: run.json says the authors' prompt and generation
    import diagnose
    diagnose.main(["--model", folder, "--data", data, "--out", str(tmp_path / "d"), "--protocol", "authors"])
    saved = json.loads((tmp_path / "d" / "run.json").read_text())
    assert (saved["prompt"], saved["score"], saved["repetition_penalty"], saved["canvas_size"]) == (
        "authors", "generate", 1.2, 336)
