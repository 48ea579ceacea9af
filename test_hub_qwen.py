"""The Qwen2.5-VL path on the real Qwen2/2.5 tokenizer and the hub's config files (hub/qwen.py), through a tiny
random-init checkpoint that keeps them. Expected ids are the published ones or come from the hub's JSON files.
  python -m pytest -q test_hub_qwen.py
"""
import base64
import itertools
import json
import unicodedata

import pytest
import regex
import torch
from PIL import Image

import model as M
import perturb
import prompts as P
from hub import qwen
from test_core import _write_dataset

QWEN_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
TEXTS = ["Hello world", "A", "A.\nB. cat", "你好，世界！这是一个测试。", "  two spaces\n\n\ttab\r\n", "x = f(3.14159) # 12345",
         "naïve café Ünïcödé", "🙂 emoji, ¿qué?", "don't it's WE'LL", "<|im_start|>user\nHi<|im_end|>\n<|image_pad|>"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = qwen.make_tiny_qwen(str(tmp_path_factory.mktemp("tiny-qwen")))
    m, p = M.load(folder)
    return m.eval(), p, folder


def _sample(image, task="image_heavy", id="s0"):
    return dict(id=id, task=task, image=image, source="t", question="What is shown in the image?",
                options=["dog", "cat", "car", "tree"], answer=1)


def test_real_tokenizer_has_the_published_ids():
    tok = qwen.tokenizer()

    def ids(s):
        return tok(s, add_special_tokens=False)["input_ids"]

    assert ids("A") == [32] and ids("Hello") == [9707] and ids("\n") == [198] and ids("Hello world") == [9707, 1879]
    assert [ids(s)[0] for s in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                                "<|image_pad|>")] == [151643, 151644, 151645, 151652, 151653, 151655]
    added = json.loads((qwen.HUB / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert {i: tok.convert_ids_to_tokens(int(i)) for i in added} == {i: a["content"] for i, a in added.items()}
    assert len(tok) == 151665 and tok.eos_token_id == 151645 and tok.pad_token_id == 151643 and tok.bos_token is None


def test_real_tokenizer_encodes_as_tiktoken_bpe_on_the_ranks():
    with open(qwen.ranks_file(), "rb") as f:  # the pinned ranks read by hand, then tiktoken's BPE
        ranks = {base64.b64decode(token): int(rank) for token, rank in map(bytes.split, f)}

    def bpe(piece):
        parts = [bytes([b]) for b in piece]
        while len(parts) > 1:
            r, i = min((ranks.get(a + b, len(ranks)), i) for i, (a, b) in enumerate(itertools.pairwise(parts)))
            if r == len(ranks):
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return [ranks[p] for p in parts]

    tok = qwen.tokenizer()
    for text in TEXTS[:-1]:
        want = [i for piece in regex.findall(QWEN_REGEX, unicodedata.normalize("NFC", text))
                for i in bpe(piece.encode("utf-8"))]
        assert tok(text, add_special_tokens=False)["input_ids"] == want, text


def test_options_are_the_letters_the_model_emits_after_its_prompt(tiny):
    _, p, _ = tiny
    after = p.tokenizer("<|im_start|>assistant\nA", add_special_tokens=False)["input_ids"]
    assert after[-1] == 32 and after[:-1] == [151644, 77091, 198]  # <|im_start|> "assistant" "\n"
    assert P.option_token_ids(p, 4) == [32, 33, 34, 35]


def test_prompt_is_the_checkpoint_chat_template(tiny):
    _, p, _ = tiny
    s = _sample(None, task="text_heavy")
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": perturb.render(s)}]}]
    ours = P.prompt_text(p, s)
    assert ours == p.tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
    assert ours == p.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)


def test_labels_are_the_letter_and_the_end_of_turn(tiny):
    _, p, _ = tiny
    s = _sample(None, task="text_heavy")
    b = P.collate(p, [s], train=True)
    labels = b["labels"][0][b["labels"][0] != -100].tolist()
    assert labels == [33, 151645]  # "B" <|im_end|>
    # the template closes the assistant's turn with "<|im_end|>\n"; generation stops at <|im_end|> (the eos),
    # so the "\n" is the separator before a next turn and is not trained
    user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": perturb.render(s)}]}]
    full = p.tokenizer.apply_chat_template(user + [{"role": "assistant", "content": "B"}], tokenize=False)
    prompt = p.tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert full[len(prompt):] == "B<|im_end|>\n"
    assert p.tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"] == labels + [198]


@pytest.mark.parametrize("w, h", [(448, 448), (640, 480)])
def test_image_tokens_match_the_real_processor_and_the_batch_runs(tiny, w, h):
    m, p, _ = tiny
    # smart_resize of Qwen2-VL: each side rounded to a multiple of 28 (patch 14 x merge 2), within the pixel budget
    gh, gw = round(h / 28) * 2, round(w / 28) * 2
    image = Image.new("RGB", (w, h), (200, 30, 30))
    b = P.collate(p, [_sample(image), _sample(None, task="text_heavy", id="s1")], train=True)
    side = P.image_size(p) // 14  # the random pixels of the text-heavy sample: a 448 px square
    assert P.image_size(p) == 448
    assert b["image_grid_thw"].tolist() == [[1, gh, gw], [1, side, side]]
    assert (b["input_ids"] == 151655).sum(1).tolist() == [gh * gw // 4, side * side // 4]
    assert b["pixel_values"].shape == (gh * gw + side * side, 3 * 2 * 14 * 14)
    with torch.no_grad():
        want = m(**M.model_inputs(b)).logits
        got = M.logits(m, M.embed(m, b)[0], b)
    assert want.shape == (2, b["input_ids"].shape[1], 151936)
    assert torch.allclose(got, want, atol=1e-5)


def test_evaluate_then_diagnose_on_the_real_tokenizer(tiny, tmp_path):
    import diagnose
    import evaluate
    m, p, folder = tiny
    data = _write_dataset(str(tmp_path / "data"), n=2)
    rows = evaluate.run(folder, [data], str(tmp_path / "out"), batch_size=4, loaded=(m, p))
    assert len(rows) == 2 * (3 + 5 + 1)  # image-heavy orig uf md, text-heavy orig rp ri fb fw, vqa orig
    assert all(abs(sum(r["probs"]) - 1) < 1e-5 for r in rows)
    got = diagnose.diagnose(str(tmp_path / "out" / "predictions.jsonl"), n_boot=20)
    assert set(got) == {"shapes", "sums", "vqa"} and got["sums"]["fb"]["n"] == 2


def test_save_then_load_keeps_the_tokenization(tiny, tmp_path):
    m, p, _ = tiny
    _, p2 = M.load(M.save(m, p, str(tmp_path / "again")))
    built = qwen.tokenizer()
    want = [built(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    for tok in (p.tokenizer, p2.tokenizer):
        assert [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS] == want
        assert [tok.decode(tok(t, add_special_tokens=False)["input_ids"]) for t in TEXTS] == TEXTS
    assert p2.tokenizer.chat_template == p.tokenizer.chat_template
    assert (p2.image_processor.size.shortest_edge, p2.image_processor.size.longest_edge) == (3136, 12845056)


def test_hub_files_load_through_the_project_processor(tmp_path):
    """A folder laid out as a hub download (the hub's JSON files and a tokenizer.json) loads with the class
    model.load uses, with the hub's pixel budget and chat template."""
    for f in qwen.HUB.glob("*.json"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    qwen.tokenizer().backend_tokenizer.save(str(tmp_path / "tokenizer.json"))
    p = M.FAMILIES["qwen2.5-vl"]["processor"].from_pretrained(str(tmp_path))
    assert (p.image_processor.size.shortest_edge, p.image_processor.size.longest_edge) == (3136, 12845056)
    assert p.chat_template == json.loads((qwen.HUB / "chat_template.json").read_text())["chat_template"]
    assert p.tokenizer("<|im_end|>A")["input_ids"] == [151645, 32]


def test_the_hubs_generation_config_is_kept(tiny):
    m, _, _ = tiny
    assert m.generation_config.eos_token_id == qwen.hub_json("generation_config.json")["eos_token_id"] == [151645, 151643]


def test_a_photo_past_max_length_says_how_many_tokens_its_image_takes(tiny):
    """Within the hub's pixel budget (12.8M px) a full-HD photo keeps its resolution: 39 x 69 merged patches, 2691
    image tokens, past train.py's default --max-length 2048 with a one-line question. The error must say that the
    image takes them, or the user looks for long text."""
    _, p, _ = tiny
    with pytest.raises(ValueError) as e:
        P.collate(p, [_sample(Image.new("RGB", (1920, 1080)))], max_length=2048)
    assert "'s0'" in str(e.value) and "2691" in str(e.value), str(e.value)


def test_an_image_qwen_cannot_take_names_its_sample(tiny):
    """Qwen2-VL's smart_resize refuses an aspect ratio over 200 (a 1200 x 5 banner); mid-run, an error without
    the sample's id leaves the user to search the data for it."""
    _, p, _ = tiny
    with pytest.raises(ValueError, match="'s0'"):
        P.collate(p, [_sample(Image.new("RGB", (1200, 5)))])


def test_authors_prompt_is_their_chat_template_row_and_trains_the_bare_letter(tiny):
    """QwenDataset.py: apply_chat_template([system, user(image, question)], add_generation_prompt=True) + answer, the
    system message empty for VQA rows; src/predict.py's evaluation rows carry qa_image_prompt. QwenDataCollator labels
    what follows "assistant\\n": the letter alone, no <|im_end|>."""
    from test_hub import AUTHORS_EVAL, AUTHORS_QUESTION, AUTHORS_TRAIN
    _, p, _ = tiny
    letter = _sample(None, task="text_heavy")
    reply = dict(_sample(Image.new("RGB", (64, 64)), task="vqa"), options=None, answer="A cat.")
    cases = [(letter, True, AUTHORS_TRAIN, AUTHORS_QUESTION, "B"), (letter, False, AUTHORS_EVAL, AUTHORS_QUESTION, ""),
             (reply, True, "", "What is shown in the image?", "A cat.")]
    for s, train, system, text, answer in cases:
        prompt = (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|>"
                  f"<|vision_end|>{text}<|im_end|>\n<|im_start|>assistant\n")
        assert P.prompt_text(p, s, train, style="authors") == prompt
        chat = [{"role": "system", "content": [{"type": "text", "text": system}]},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        assert p.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == prompt
        b = P.collate(p, [s], train=train, style="authors")
        want = p.tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
        at, n = want.index(151655), int((b["input_ids"][0] == 151655).sum())  # <|image_pad|>, expanded
        assert b["input_ids"][0].tolist() == want[:at] + [151655] * n + want[at + 1:], (s["task"], train)
        labels = b["labels"][0][b["labels"][0] != -100].tolist()
        assert labels == p.tokenizer(answer, add_special_tokens=False)["input_ids"], (s["task"], train)
    assert P.answer_ids(p, "B", style="authors") == [33]  # "B", no <|im_end|>; ours: [33, 151645]
    assert P.option_token_ids(p, 4, style="authors") == [32, 33, 34, 35] == P.option_token_ids(p, 4)
