"""Tests of the families beyond the first three (Qwen2-VL, LLaVA-NeXT on Vicuna and on Mistral, InternVL): tiny random-init
checkpoints of the real transformers classes, saved and loaded back by model.load(folder) as a hub download is.
Run all tests: python -m pytest -q test_*.py
"""
import json
import os

import pytest
import torch
import transformers
from PIL import Image

import model as M
import perturb
import prompts as P
from test_core import _write_dataset
from test_train import _metrics, _train, toy  # noqa: F401 (toy: the toy data, a pytest fixture)
from model import make_tiny
from tiny import INTERNVL_TOKENS

FAMILIES = ["qwen2-vl", "llava-next", "llava-next-mistral", "internvl"]
TRAINED = ["qwen2-vl", "llava-next", "internvl"]  # llava-next-mistral is llava-next's row with another LLM and template


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    cache = {}

    def get(fam):
        if fam not in cache:
            folder = make_tiny(fam, str(root / fam))
            m, p = M.load(folder)
            cache[fam] = (m.eval(), p, folder)
        return cache[fam]
    return get


def _samples():
    """Images of three shapes (Qwen's grid and LLaVA-NeXT's tiles follow it) and a text-heavy sample's pixels."""
    return [
        dict(id="img-1", task="image_heavy", image=Image.new("RGB", (40, 30), (200, 10, 10)),
             question="What is shown in the image ?", options=["red", "blue", "green", "shape"], answer=2, source="t"),
        dict(id="vqa-1", task="vqa", image=Image.new("RGB", (90, 20), (10, 200, 10)),
             question="Which color is this shape ?", options=["red", "blue", "green"], answer=1, source="t"),
        dict(id="txt-1", task="text_heavy", image=None, question="How many is 2 ?", options=["2", "3"], answer=0,
             source="t"),
    ]


@pytest.mark.parametrize("fam", FAMILIES)
def test_a_tiny_checkpoint_loads_as_its_family_from_config_json(tiny, fam):
    m, p, folder = tiny(fam)
    assert m.family == p.family == fam and p.row is M.FAMILIES[fam] and type(m) is M.FAMILIES[fam]["cls"]
    config = json.load(open(os.path.join(folder, "config.json")))
    assert M.checkpoint_family(folder) == fam and config["text_config"]["model_type"] == (
        "mistral" if fam.endswith("mistral") else "llama" if fam.startswith("llava") else
        "qwen2" if fam == "internvl" else "qwen2_vl_text")


@pytest.mark.parametrize("fam", FAMILIES)
def test_logits_of_embed_equal_the_models_own_forward_and_each_sample_alone(tiny, fam):
    m, p, _ = tiny(fam)
    samples = _samples()
    batch = P.collate(p, samples)
    n = batch["attention_mask"].sum(1).tolist()
    assert len(set(n)) == 3  # rows of different lengths: padding matters
    with torch.no_grad():
        ref = m(**M.model_inputs(batch)).logits
        embeds, image_mask = M.embed(m, batch)
        got = M.logits(m, embeds, batch)
        again = M.logits(m, embeds, batch)  # no state carried from one call to the next (Qwen's rope_deltas)
        alone = [m(**M.model_inputs(P.collate(p, [s]))).logits[0] for s in samples]
    assert torch.allclose(got, ref, atol=1e-5) and torch.equal(got, again)
    for row, one in enumerate(alone):  # the padded batch (image tiles included) changes no sample's logits
        assert one.shape[0] == n[row] and torch.allclose(ref[row, :n[row]], one, atol=1e-5)
    ids = batch["input_ids"]
    assert image_mask.tolist() == (ids == m.config.image_token_id).tolist()
    size = P.image_size(p)
    sizes = [s["image"].size if s["image"] else (size, size) for s in samples]
    markers = 2 * (fam == "internvl")  # InternVL's processor inserts <img> and </img> around an image's tokens
    assert image_mask.sum(1).tolist() == [P.n_image_tokens(p, wh) - markers for wh in sizes]
    assert len(set(image_mask.sum(1).tolist())) == 3  # the image tokens follow the image's size
    if fam == "internvl":  # tiles of the encoder's size (and a thumbnail), image_seq_length tokens each
        tiles = [p.image_processor(Image.new("RGB", wh), crop_to_patches=True, return_tensors="pt")["pixel_values"]
                 .shape[0] for wh in sizes]
        assert tiles[0] > tiles[1] > tiles[2] == 1 and batch["pixel_values"].shape[0] == sum(tiles)
        assert image_mask.sum(1).tolist() == [p.image_seq_length * t for t in tiles]
        start, end = (p.tokenizer.convert_tokens_to_ids(t) for t in ("<img>", "</img>"))
        first = image_mask.int().argmax(1)
        assert ids[range(3), first - 1].tolist() == [start] * 3
        assert ids[range(3), first + image_mask.sum(1)].tolist() == [end] * 3
    if fam.startswith("llava-next"):  # [images, most tiles, C, H, W]: the images have 3, 4 and 3 tiles
        tiles = [p.image_processor(Image.new("RGB", wh), return_tensors="pt")["pixel_values"].shape[1] for wh in sizes]
        assert tiles == [3, 4, 3] and batch["pixel_values"].shape[:2] == (3, 4)
        assert batch["pixel_values"][0, 3:].abs().sum() == 0 < batch["pixel_values"][0, 2].abs().sum()
        assert batch["image_sizes"].tolist() == [[h, w] for w, h in sizes]


def test_each_family_renders_its_chat_templates_text(tiny):
    """What the published chat templates write for one image and a question, with the generation prompt."""
    s = _samples()[0]
    text = perturb.render(s)
    expected = {"qwen2-vl": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                            f"<|vision_start|><|image_pad|><|vision_end|>{text}<|im_end|>\n<|im_start|>assistant\n",
                "llava-next": f"USER: <image>\n{text} ASSISTANT:",
                "llava-next-mistral": f"[INST] <image>\n{text} [/INST]",
                # OpenGVLab/InternVL3-1B-hf's chat_template.jinja: no system turn, "<IMG_CONTEXT>\n" for the image
                "internvl": f"<|im_start|>user\n<IMG_CONTEXT>\n{text}<|im_end|>\n<|im_start|>assistant\n"}
    for fam in FAMILIES:
        p = tiny(fam)[1]
        assert P.prompt_text(p, s) == expected[fam]
        if fam == "qwen2-vl":  # the authors diagnosed it (Table 7) through its template with their system prompt
            assert P.prompt_text(p, s, style="authors") == (
                f"<|im_start|>system\n{P.AUTHORS_SYSTEM_EVAL}<|im_end|>\n<|im_start|>user\n<|vision_start|>"
                f"<|image_pad|><|vision_end|>{P.render_authors(s)}<|im_end|>\n<|im_start|>assistant\n")
            continue
        with pytest.raises(ValueError, match=f"not written for the {fam} family: use 'ours'"):
            P.prompt_text(p, s, style="authors")  # the authors trained and released none of these


# OpenGVLab/InternVL3-{1B,2B,14B}-hf chat_template.jinja (481 bytes, "Update processor (#2)"), as transformers'
# models/internvl/convert_internvl_weights_to_hf.py writes it
INTERNVL_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{% if message['content'] "
                     "is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if "
                     "content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'video' %}{{ "
                     "'<video>\n' }}{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}"
                     "{% endif %}{{'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n'"
                     " }}{% endif %}")


def test_internvl_prompt_is_what_its_hub_chat_template_renders(tiny):
    p = tiny("internvl")[1]
    assert len(INTERNVL_TEMPLATE.encode()) == 481
    for s in _samples()[:2]:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": perturb.render(s)}]}]
        assert P.prompt_text(p, s) == p.tokenizer.apply_chat_template(
            messages, chat_template=INTERNVL_TEMPLATE, tokenize=False, add_generation_prompt=True)


def test_internvl_on_the_real_tokenizer_gives_the_hub_ids():
    """InternVL3's tokenizer is Qwen2.5-VL's with named <img>, </img>, <IMG_CONTEXT> (and <video>) and <quad> ... </box>
    added (convert_internvl_weights_to_hf.py's write_tokenizer): <IMG_CONTEXT> is the -hf config's image_token_id."""
    from hub import qwen
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    folder = qwen.tokenizer().name_or_path  # built once into hub/.cache (its vocabulary from a pinned registry package)
    tok = transformers.AutoTokenizer.from_pretrained(folder, extra_special_tokens=INTERNVL_TOKENS)
    tok.add_tokens(["<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"], special_tokens=True)
    assert tok.convert_tokens_to_ids(["<img>", "</img>", "<IMG_CONTEXT>"]) == [151665, 151666, 151667]
    p = P.InternVLImageProcessor(GotOcr2ImageProcessorPil(size={"height": 448, "width": 448}), tok)
    p.family, p.row = "internvl", M.FAMILIES["internvl"]
    s = dict(_samples()[0], image=Image.new("RGB", (448, 448)))
    batch = P.collate(p, [s])
    ids = batch["input_ids"][0].tolist()
    # <|im_start|> user \n <img> <IMG_CONTEXT> x 256 </img> \n ... <|im_end|> \n <|im_start|> assistant \n C <|im_end|>
    assert ids[:4] == [151644, 872, 198, 151665] and ids.count(151667) == 256 and ids[260:262] == [151666, 198]
    assert ids[-7:] == [151645, 198, 151644, 77091, 198, 34, 151645]  # the answer C (34), then <|im_end|>
    assert (batch["labels"][0] != -100).nonzero().flatten().tolist() == [len(ids) - 2, len(ids) - 1]
    assert P.option_token_ids(p, 4) == [32, 33, 34, 35]  # "A" to "D"
    assert P.n_image_tokens(p, (448, 448)) == 258 and P.n_image_tokens(p, (900, 448)) == 3 * 256 + 2


@pytest.mark.parametrize("fam", FAMILIES)
def test_lengths_are_the_lengths_collate_gives(tiny, fam):
    _, p, _ = tiny(fam)
    samples = _samples() + [dict(_samples()[0], id="tall", image=Image.new("RGB", (20, 90))),
                            dict(_samples()[1], id="chat", options=None, answer="a green shape")]
    size = P.image_size(p)
    sizes = [s["image"].size if s["image"] else (size, size) for s in samples]
    for train in (True, False):
        collated = [P.collate(p, [s], train=train)["attention_mask"].shape[1] for s in samples]
        assert P.lengths(p, samples, sizes, train) == collated
    assert len({P.n_image_tokens(p, wh) for wh in sizes}) >= 3


@pytest.mark.parametrize("fam", TRAINED)
def test_two_steps_of_ours_train_and_export_a_folder_plain_transformers_loads(toy, tmp_path, monkeypatch, fam):
    data, _ = toy
    words = open(os.path.join(os.path.dirname(data), "vocab.txt")).read().split()
    base = make_tiny(fam, str(tmp_path / "base"), words)
    out = str(tmp_path / "out")
    g = _train(["--model", base, "--data", data, "--out", out, "--preset", "ours", "--max-steps", "2", "--lr", "1e-3",
                "--eps", "0.05"], monkeypatch)
    rows = _metrics(out)
    assert len(rows) == 2 and all(r["sft"] > 0 and r["adv"] > 0 and r["cons"] > 0 for r in rows)
    plain = transformers.AutoModelForImageTextToText.from_pretrained(out)
    assert type(plain) is M.FAMILIES[fam]["cls"]
    state, trained = plain.state_dict(), g["full"]
    assert set(state) <= set(trained) and all(torch.equal(state[k], trained[k]) for k in state)
    original = dict(M.load(base)[0].named_parameters())
    frozen = M.FAMILIES[fam]["frozen"]
    assert all(torch.equal(q, original[n]) for n, q in plain.named_parameters() if n.startswith(frozen))
    changed = {n for n, q in plain.named_parameters() if not torch.equal(q, original[n])}
    assert any(".layers.0.self_attn.q_proj" in n for n in changed)
    assert any(n.startswith(("model.multi_modal_projector.", "model.visual.merger.")) for n in changed)
    assert M.load_processor(out).family == fam


@pytest.mark.parametrize("fam", TRAINED)
def test_evaluate_writes_a_softmax_over_the_letter_logits(tiny, tmp_path, fam):
    import evaluate
    m, p, folder = tiny(fam)
    data = _write_dataset(str(tmp_path / "data"), n=2)
    rows = evaluate.run(folder, [data], str(tmp_path / "out"), batch_size=4, loaded=(m, p))
    samples = {s["id"]: s for s in perturb.load_samples(data)}
    assert {(r["id"], r["intervention"]) for r in rows} == {(s["id"], n) for s in samples.values()
                                                           for n in perturb.interventions_for(s["task"])}
    ri = perturb.ri_pool(list(samples.values()))
    for r in rows[::3]:  # one sample at a time, the whole logits tensor, the letters picked by hand
        s = perturb.perturb(samples[r["id"]], r["intervention"], evaluate.rng_for(0, samples[r["id"]], r["intervention"]),
                            size=P.image_size(p), ri_images=ri)
        with torch.no_grad():
            last = m(**M.model_inputs(P.collate(p, [s], train=False))).logits[0, -1]
        letters = [p.tokenizer.convert_tokens_to_ids(perturb.LETTERS[i]) for i in range(len(s["options"]))]
        assert torch.allclose(torch.tensor(r["probs"]), torch.softmax(last[letters], -1), atol=1e-5)
    assert len(open(tmp_path / "out" / "predictions.jsonl").readlines()) == len(rows)
