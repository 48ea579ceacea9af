"""Tests of the generic path: evaluate.py on a model type in no row of model.FAMILIES (Idefics3, transformers'
Idefics3ForConditionalGeneration, tiny and random-init, saved with its processor and chat template), its prompt
and letters from the chat template, its image tokens from the processor, and training's refusal. CPU, seconds.
"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch
import transformers
from PIL import Image
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors

import diagnose
import evaluate
import model as M
import perturb
import prompts as P

# HuggingFaceM4/Idefics3-8B-Llama3's chat template (the DEFAULT_CHAT_TEMPLATE of transformers' modernvbert, which
# copies it; transformers' tests/models/idefics3/test_processing_idefics3.py has the same with <|im_start|>):
# capitalised roles, ":" glued to the role when the turn opens with an image, "<end_of_utterance>\n" after each
# turn, and the generation prompt "Assistant:" with no space after it, which an assistant's text turn writes as
# "Assistant: "
TEMPLATE = ("<|begin_of_text|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]"
            "['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if "
            "line['type'] == 'text' %}{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}"
            "{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
SPECIALS = ["<unk>", "<|begin_of_text|>", "<end_of_utterance>", "<pad>", "<image>", "<fake_token_around_image>",
            "<global-img>"] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
# words with the space before them as tokens of their own (as BPE's "ĠB"): " B" after "Assistant:" is not "B"
PIECES = r"\n| ?\w+| ?[^\w\s]"
FOUR = ["red", "blue", "green", "shape"]


def _tokenizer(texts):
    """A word-level tokenizer over the pieces of texts (and every letter, bare and after a space), BOS added."""
    letters = set(perturb.LETTERS) | {" " + c for c in perturb.LETTERS}
    words = {w for t in texts for w in re.findall(PIECES, t)} | letters
    vocab = {w: i for i, w in enumerate(SPECIALS + sorted(words))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(PIECES), behavior="isolated")
    tk.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                      special_tokens=[("<|begin_of_text|>", 1)])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|begin_of_text|>",
                                               eos_token="<end_of_utterance>", pad_token="<pad>", unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[4:]})
    return tok


def _samples(folder):
    """Image-heavy samples whose images Idefics3 cuts into different numbers of tiles, text-heavy and VQA ones."""
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    rows = []
    images = [((40, 30), (220, 20, 20)), ((20, 70), (20, 20, 220)), ((64, 64), (20, 200, 20))]  # 5, 3, 5 tiles
    for i, (size, color) in enumerate(images):
        Image.new("RGB", size, color).save(os.path.join(folder, "images", f"{i}.png"))
        rows += [dict(id=f"img-{i}", task="image_heavy", image=f"images/{i}.png", source="shapes", answer=i,
                      question="What is shown in the image ?" + " really" * i, options=FOUR[:3 + (i == 2)]),
                 dict(id=f"vqa-{i}", task="vqa", image=f"images/{i}.png", source="vqa",
                      question="Which color is this ?", options=FOUR[:2], answer=i % 2)]
    rows += [dict(id=f"txt-{i}", task="text_heavy", image=None, source="sums", question=f"How many is {i} ?",
                  options=[str(i), str(i + 1), str(i + 2)], answer=0) for i in range(2)]
    path = os.path.join(folder, "test.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return path


@pytest.fixture(scope="module")
def idefics3(tmp_path_factory):
    """(folder, model, processor, data): a tiny random-init Idefics3 saved as a hub checkpoint is, chat template
    included, and samples for it. Its vision encoder sees 32 px tiles (4 image tokens each after the pixel
    shuffle); its processor resizes an image's longest edge to 64 px, cut into up to 2 x 2 tiles plus the whole."""
    root = tmp_path_factory.mktemp("generic")
    data = _samples(str(root / "data"))
    texts = [perturb.render(s) for s in perturb.load_samples(data)] + [TEMPLATE, "User: Assistant: \n\n"]
    tok = _tokenizer(texts)
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
    ip = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32})
    processor = transformers.Idefics3Processor(ip, tok, image_seq_len=4, chat_template=TEMPLATE)
    ids = tok.convert_tokens_to_ids
    text = dict(model_type="llama", vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=2, pad_token_id=ids("<pad>"),
                bos_token_id=ids("<|begin_of_text|>"), eos_token_id=ids("<end_of_utterance>"),
                tie_word_embeddings=False)
    config = transformers.Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=text, scale_factor=2, image_token_id=ids("<image>"))
    torch.manual_seed(0)
    folder = str(root / "idefics3")
    transformers.Idefics3ForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    model = transformers.AutoModelForImageTextToText.from_pretrained(folder).eval()  # plain transformers, not ours
    return folder, model, transformers.AutoProcessor.from_pretrained(folder), data


def _user(text, image=None):
    return [{"role": "user", "content": [{"type": "image"} | ({"image": image} if image else {}),
                                         {"type": "text", "text": text}]}]


def test_generic_evaluate_scores_the_models_own_next_token_logits_and_diagnose_reads_them(idefics3, tmp_path, capsys):
    folder, model, processor, data = idefics3
    out = str(tmp_path / "out")
    evaluate.main(["--model", folder, "--data", data, "--out", out, "--batch-size", "16"])  # one batch: tiles padded
    assert capsys.readouterr().err.count("is in no row of model.FAMILIES: evaluated through the generic path") == 1
    rows = [json.loads(line) for line in open(os.path.join(out, "predictions.jsonl"))]
    samples = {s["id"]: s for s in perturb.load_samples(data)}
    assert sorted((r["id"], r["intervention"]) for r in rows) == sorted(
        (i, n) for i, s in samples.items() for n in perturb.interventions_for(s["task"]))
    ri, side = perturb.ri_pool(list(samples.values())), model.config.vision_config.image_size
    tok = processor.tokenizer
    # the letters as the template writes an assistant's answer after the generation prompt
    prompt_ids = tok(processor.apply_chat_template(_user("x"), add_generation_prompt=True), add_special_tokens=False)
    letters = []
    for c in perturb.LETTERS[:4]:
        answer = {"role": "assistant", "content": [{"type": "text", "text": c}]}
        reply = processor.apply_chat_template(_user("x") + [answer])
        full = tok(reply, add_special_tokens=False)["input_ids"]
        assert full[:len(prompt_ids["input_ids"])] == prompt_ids["input_ids"]
        letters.append(full[len(prompt_ids["input_ids"])])
    assert letters == tok.convert_tokens_to_ids([" A", " B", " C", " D"])  # not the bare "A": the space counts
    for r in rows:  # one sample at a time through the processor's own chat template, tokenizer and the model
        s = samples[r["id"]]
        p = perturb.perturb(s, r["intervention"], evaluate.rng_for(0, s, r["intervention"]), size=side, pool="eval",
                            ri_images=ri, k=10)
        enc = processor.apply_chat_template(_user(perturb.render(p), perturb.load_image(p, side)),
                                            add_generation_prompt=True, tokenize=True, return_dict=True,
                                            return_tensors="pt")
        with torch.no_grad():
            last = model(**enc).logits[0, -1]
        expected = torch.softmax(last[letters[:len(s["options"])]], -1)
        assert torch.allclose(torch.tensor(r["probs"]), expected, atol=1e-5), (r["id"], r["intervention"])
        assert r["pred"] == int(expected.argmax()) and r["answer"] == s["answer"]
    summary = diagnose.diagnose(os.path.join(out, "predictions.jsonl"))
    for src in ("shapes", "vqa", "sums"):
        orig = [r for r in rows if r["source"] == src and r["intervention"] == "orig"]
        assert summary[src]["orig"]["n"] == len(orig)
        assert summary[src]["orig"]["acc"] == pytest.approx(sum(r["pred"] == r["answer"] for r in orig) / len(orig))
    assert set(summary["shapes"]) == {"orig", "uf", "md"} and set(summary["sums"]) == {"orig", "rp", "ri", "fb", "fw"}


def test_generic_prompt_and_tokens_are_the_chat_templates_own(idefics3):
    folder, _, processor, data = idefics3
    p = M.load_processor(folder, generic=True)
    assert p.family == P.GENERIC and P.image_size(p) == 32  # the vision encoder's image_size
    for s in perturb.load_samples(data):
        own_text = processor.apply_chat_template(_user(perturb.render(s)), add_generation_prompt=True)
        assert P.prompt_text(p, s) == own_text
        image = perturb.load_image(s, 32)
        own = processor.apply_chat_template(_user(perturb.render(s), image), add_generation_prompt=True, tokenize=True,
                                            return_dict=True, return_tensors="pt")
        batch = P.collate(p, [s], train=False)
        assert batch["input_ids"].tolist() == own["input_ids"].tolist()  # one BOS: the template writes it
        assert torch.equal(batch["pixel_values"], own["pixel_values"])
        assert torch.equal(batch["pixel_attention_mask"], own["pixel_attention_mask"])


def test_generic_generation_in_a_batch_equals_the_chat_templates_one_sample_at_a_time(idefics3):
    folder, model, processor, data = idefics3
    p = M.load_processor(folder, generic=True)
    samples = perturb.load_samples(data)[:4]  # 5 and 3 tiles: a batch padded in its tiles and its tokens
    batched = evaluate.generate(model, p, samples, max_new_tokens=3)
    for s, text in zip(samples, batched):
        own = processor.apply_chat_template(_user(perturb.render(s), perturb.load_image(s, 32)),
                                            add_generation_prompt=True, tokenize=True, return_dict=True,
                                            return_tensors="pt")
        out = model.generate(**own, do_sample=False, max_new_tokens=3, pad_token_id=processor.tokenizer.pad_token_id)
        assert text == processor.tokenizer.decode(out[0, own["input_ids"].shape[1]:], skip_special_tokens=True)


def test_generic_image_tokens_follow_the_processors_tiles(idefics3):
    folder, _, processor, data = idefics3
    p = M.load_processor(folder, generic=True)
    sizes = [(40, 30), (20, 70), (64, 64), (10, 10), (100, 20)]
    counts = [P.n_image_tokens(p, wh) for wh in sizes]
    assert counts == [processor._get_num_multimodal_tokens(image_sizes=[wh[::-1]])["num_image_tokens"][0]
                      for wh in sizes]  # transformers' own count of each size's tiles
    assert len(set(counts)) > 1  # the tiles, and so the tokens, depend on the size
    samples = perturb.load_samples(data, decode=True)
    wh = [Image.open(s["image"]).size if s["image"] else (32, 32) for s in samples]
    got = [P.collate(p, [s], train=False)["attention_mask"].sum().item() for s in samples]
    assert P.lengths(p, samples, wh, train=False) == got


def test_training_refuses_a_model_type_in_no_table_and_evaluate_refuses_what_it_cannot_load(idefics3, tmp_path):
    folder, _, _, data = idefics3
    for refuse in (M.checkpoint_family, M.load_processor, M.load):  # train.py loads through load_processor and load
        with pytest.raises(ValueError, match=r"'idefics3' is in no row of model.FAMILIES .*evaluate.py diagnoses it "
                                             r"through the generic path.*training needs a FAMILIES row"):
            refuse(folder)
    assert M.checkpoint_family(folder, generic=True) == P.GENERIC
    with pytest.raises(evaluate.RunError, match="--prompt authors: not written for the generic family; pick ours"):
        evaluate.run(folder, [data], str(tmp_path / "a"), style="authors")
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(evaluate.RunError, match="'bert' is in no row.*nor a decoder-only one transformers' Auto"):
        evaluate.run(str(other), [data], str(tmp_path / "b"))
    (other / "config.json").write_text(json.dumps({"model_type": "pix2struct", "is_encoder_decoder": True}))
    with pytest.raises(ValueError, match="'pix2struct' is in no row.*nor a decoder-only one"):
        M.checkpoint_family(str(other), generic=True)
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")  # refused before --out
    run = subprocess.run([sys.executable, "train.py", "--model", folder, "--data", data, "--out", str(tmp_path / "t")],
                         cwd=os.path.dirname(os.path.abspath(__file__)), capture_output=True, text=True)
    assert run.returncode == 1 and not os.path.exists(tmp_path / "t")
    assert re.fullmatch(r"error: --model .*'idefics3' is in no row.*training needs a FAMILIES row.*\n", run.stderr)
