"""evaluate.py --shortcuts (issue 18, point 3): each image through the vision tower once and an image-heavy sample's
prefix through the language model once for its orig/uf/md rows give the probabilities of one whole pass a row.
  python -m pytest -q test_share.py
"""
import json

import pytest
from PIL import Image

import evaluate
import model as M
import perturb
import prompts as P
import shortcuts
from test_core import _write_dataset, tiny  # noqa: F401 (tiny is a session-scoped fixture)

FAMILIES = ["llava", "qwen2.5-vl", "instructblip"]
VISION = {"llava": lambda m: m.model.vision_tower, "qwen2.5-vl": lambda m: m.model.visual}


def _rows(p, folder):
    """Two image-heavy samples under orig/uf/md and a text-heavy one under orig/rp/ri/fb/fw, as evaluate.py makes
    them: rows of several lengths, so one batch of them is right-padded."""
    Image.new("RGB", (40, 30), (200, 10, 10)).save(folder / "red.png")
    Image.new("RGB", (30, 40), (10, 10, 200)).save(folder / "blue.png")
    samples = [dict(id="a", task="image_heavy", image=str(folder / "red.png"), question="What is shown in the "
                    "image ?", options=["red", "blue", "green", "shape"], answer=2, source="toy"),
               dict(id="t", task="text_heavy", image=None, question="How many is 2 ?", options=["2", "3"], answer=0,
                    source="sums"),
               dict(id="b", task="image_heavy", image=str(folder / "blue.png"), question="What is shown ?",
                    options=["red", "blue"], answer=1, source="toy")]
    ri = perturb.ri_pool(samples)
    return [perturb.perturb(s, n, evaluate.rng_for(0, s, n), size=P.image_size(p), ri_images=ri, k=3)
            for s in samples for n in perturb.interventions_for(s["task"])]


def _letters(p, rows):
    return P.option_token_ids(p, max(len(s["options"]) for s in rows))


@pytest.mark.parametrize("fam", FAMILIES)
def test_shared_probabilities_equal_one_whole_pass_a_row(tiny, tmp_path, monkeypatch, fam):
    """llava and qwen share the prefix (it covers every row's image); instructblip's rows differ from position 0
    (its query tokens read the instruction), which the comparison finds: no prefix there."""
    m, p, _ = tiny(fam)
    rows = _rows(p, tmp_path)
    batch = P.collate(p, rows, train=False)
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 3
    stops, prefix = [], M.prefix
    monkeypatch.setattr(M, "prefix", lambda *a: stops.append(a[-1]) or prefix(*a))
    on = evaluate.score(m, p, rows, _letters(p, rows), shortcuts=True)
    off = evaluate.score(m, p, rows, _letters(p, rows), shortcuts=False)  # the model's own forward, whole rows
    assert max(abs(a - b) for x, y in zip(on, off, strict=True) for a, b in zip(x, y, strict=True)) < 1e-5
    image = batch["input_ids"] == m.config.image_token_id
    last_image = int((image.cumsum(1) == image.sum(1, keepdim=True)).int().argmax(1).max())
    assert stops == ([] if fam == "instructblip" else [stops[0]]) and all(s > last_image for s in stops)


@pytest.mark.parametrize("fam", ["llava", "qwen2.5-vl"])
def test_the_prefix_cache_is_read(tiny, tmp_path, monkeypatch, fam):
    """Another prefix's keys and values under the same rest of the rows move the image-heavy rows' probabilities:
    the equality above is not that of a pass that ignores the cache."""
    m, p, _ = tiny(fam)
    rows = _rows(p, tmp_path)
    off = evaluate.score(m, p, rows, _letters(p, rows), shortcuts=False)
    prefix = M.prefix
    monkeypatch.setattr(M, "prefix", lambda model, embeds, batch, stop: prefix(model, embeds.flip(0), batch, stop))
    wrong = evaluate.score(m, p, rows, _letters(p, rows), shortcuts=True)
    moved = [max(abs(a - b) for a, b in zip(x, y)) for x, y, s in zip(wrong, off, rows) if s["task"] == "image_heavy"]
    assert min(moved) > 1e-4


@pytest.mark.parametrize("fam", ["llava", "qwen2.5-vl"])
def test_the_vision_tower_sees_each_distinct_image_once(tiny, tmp_path, fam):
    m, p, _ = tiny(fam)
    rows = _rows(p, tmp_path)
    seen = []

    def count(module, args, kwargs, out):  # images per call: LLaVA's pixel_values, Qwen's grid_thw rows
        seen.append(len(kwargs.get("grid_thw", args[1] if len(args) > 1 else args[0])))
    hook = VISION[fam](m).register_forward_hook(count, with_kwargs=True)
    try:
        evaluate.score(m, p, rows, _letters(p, rows), shortcuts=True)
        on, seen[:] = list(seen), []
        evaluate.score(m, p, rows, _letters(p, rows), shortcuts=False)
    finally:
        hook.remove()
    images = {(im.size, im.tobytes()) for im in (perturb.load_image(s, P.image_size(p)) for s in rows)}
    # a: 3 rows, b: 3 rows, t: orig and rp the same random pixels, ri one of a's or b's images, fb, fw
    assert on == [len(images)] == [5] and seen == [len(rows)] == [11]


def test_an_image_heavy_samples_jobs_share_a_batch():
    jobs = [(dict(id=f"i{k}", task="image_heavy", image=None, question="q " * (7 - k), options=["a", "b"]), n)
            for k in range(3) for n in ("orig", "uf", "md")]
    jobs += [(dict(id=f"t{k}", task="text_heavy", image=None, question="q " * k, options=["a", "b"]), n)
             for k in range(2) for n in ("orig", "rp")]

    def apply(s, name, size):  # uf longest, then md: the image-heavy jobs of one sample have three lengths
        return dict(s, question={"uf": "x " * 9, "md": "y "}.get(name, "") + s["question"])
    for size in (1, 2, 3, 4, 8):
        batches = shortcuts.make_batches(jobs, size, apply)
        assert sorted(i for b in batches for i in b) == list(range(len(jobs))) and all(len(b) <= size for b in batches)
        if size >= 3:
            home = {jobs[i][0]["id"]: k for k, b in enumerate(batches) for i in b}
            assert all(i in batches[home[jobs[i][0]["id"]]] for i in range(9))  # a sample's jobs in one batch
    # by length (of a sample's longest job): the text-heavy jobs, then i2, i1, i0; a sample never cut where it fits
    assert shortcuts.make_batches(jobs, 4, apply) == [[9, 10, 11, 12], [6, 7, 8], [3, 4, 5], [0, 1, 2]]
    assert shortcuts.make_batches(jobs, 8, apply) == [[9, 10, 11, 12, 6, 7, 8], [3, 4, 5, 0, 1, 2]]


@pytest.mark.parametrize("fam", ["llava", "qwen2.5-vl"])
def test_predictions_with_shortcuts_on_equal_off_and_resume_across(tiny, tmp_path, fam):
    m, p, folder = tiny(fam)
    data = _write_dataset(str(tmp_path / "data"), n=3)
    common = ["--model", folder, "--data", data, "--batch-size", "4", "--interventions", "orig", "uf", "md", "rp", "fb"]
    runs = {}
    for s in ("on", "off"):
        evaluate.main(common + ["--out", str(tmp_path / s), "--shortcuts", s])
        runs[s] = [json.loads(line) for line in (tmp_path / s / "predictions.jsonl").read_text().splitlines()]
    on, off = runs["on"], runs["off"]
    assert [(r["id"], r["intervention"], r["pred"]) for r in on] == [(r["id"], r["intervention"], r["pred"])
                                                                     for r in off]
    assert max(abs(a - b) for x, y in zip(on, off) for a, b in zip(x["probs"], y["probs"], strict=True)) < 1e-5
    assert (tmp_path / "on" / "run.json").read_text() == (tmp_path / "off" / "run.json").read_text()
    evaluate.main(common + ["--out", str(tmp_path / "on"), "--shortcuts", "off", "--resume"])  # same settings
    assert [json.loads(line) for line in (tmp_path / "on" / "predictions.jsonl").read_text().splitlines()] == on
