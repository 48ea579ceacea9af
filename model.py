"""The multimodal LLMs we fine-tune and diagnose: loading, saving, and access to the input embeddings that PGD
perturbs. One path for LLaVA-1.5, Qwen2.5-VL and InstructBLIP; what differs between them lives in the FAMILIES
table, their prompts (ours, or the authors') in prompts.PROMPTS: prompts.py turns samples into tokens (collate,
prompt_text, PROMPTS and option_token_ids are also importable from here). A library with no command of its own:
make_tiny writes tiny random-init checkpoints of these classes (`python tiny.py llava out/tiny-llava`).
"""
import contextlib
import json
import math
import os
import re

import huggingface_hub
import peft
import torch
import transformers

import prompts
import samples as S
import tiny
from prompts import PROMPTS, collate, option_token_ids, prompt_text  # noqa: F401 (docs/format.md's names)

ALIASES = {
    "llava-1.5-7b": "llava-hf/llava-1.5-7b-hf",
    "llava-1.5-13b": "llava-hf/llava-1.5-13b-hf",
    "qwen2.5-vl-3b": "Qwen/Qwen2.5-VL-3B-Instruct",
    "qwen2.5-vl-7b": "Qwen/Qwen2.5-VL-7B-Instruct",
    "instructblip-vicuna-7b": "Salesforce/instructblip-vicuna-7b",
    "instructblip-vicuna-13b": "Salesforce/instructblip-vicuna-13b",
    "qwen2-vl-2b": "Qwen/Qwen2-VL-2B-Instruct",
    "qwen2-vl-7b": "Qwen/Qwen2-VL-7B-Instruct",
    "llava-next-vicuna-7b": "llava-hf/llava-v1.6-vicuna-7b-hf",
    "llava-next-mistral-7b": "llava-hf/llava-v1.6-mistral-7b-hf",
    "internvl3-1b": "OpenGVLab/InternVL3-1B-hf",
    "internvl3-2b": "OpenGVLab/InternVL3-2B-hf",
}


def keep_legacy(processor):
    """transformers 5's LlamaTokenizer takes `legacy` (true in InstructBLIP's Vicuna tokenizer: text after a
    special token starts a new word, with its "▁") but leaves it out of init_kwargs, so save_pretrained drops
    it and the export tokenizes differently. Record it where saving looks."""
    for tok in (processor.tokenizer, getattr(processor, "qformer_tokenizer", None)):
        if hasattr(tok, "legacy"):
            tok.init_kwargs["legacy"] = tok.legacy
    return processor


def _expanded(processor, size):
    """The image tokens LLaVA's and Qwen2.5-VL's processors expand their placeholder into (transformers'
    own count, which takes (height, width))."""
    return processor._get_num_multimodal_tokens(image_sizes=[size[::-1]])["num_image_tokens"][0]


# Everything that differs between families, but the prompt (prompts.PROMPTS). A loaded processor carries its row
# (`processor.row`): prompts.py reads its image side there (image_size, image_tokens, image_keys).
# `frozen`: parameter-name prefixes kept fixed (vision encoder; InstructBLIP also its Q-Former).
# `projector`: the module between the vision encoder and the LLM, trained in full (under --lora too).
# `lm_keys`: batch entries the language path needs besides inputs_embeds; Qwen2.5-VL needs
# input_ids, image_grid_thw and mm_token_type_ids so that its M-RoPE positions are recomputed
# (with inputs_embeds alone it silently reuses stale rope_deltas from the previous call).
# `processor`: the class load() builds from a checkpoint's parts, whatever its processor_config.json says (ours:
# prompts.py).
# `config_keys`: config entries get_image_features needs passed (LLaVA's does not read them from the config).
# `image_tokens(processor, (width, height))`: the image tokens the processor inserts for an image of that size,
# from the size alone; `dynamic`: whether that number depends on the size (Qwen2.5-VL's dynamic resolution).
# `positions(model, batch)`, where a family has it: the language model's position ids of the whole rows, which a
# pass over a suffix must be given (Qwen's M-RoPE, from the image grid); elsewhere they continue from the cache.
LLAVA_KEYS = ("vision_feature_layer", "vision_feature_select_strategy")
FAMILIES = {
    "llava": dict(
        cls=transformers.LlavaForConditionalGeneration, processor=transformers.LlavaProcessor,
        frozen=("model.vision_tower.",), projector="model.multi_modal_projector",
        image_keys=("pixel_values",), lm_keys=("attention_mask",), lm=None, config_keys=LLAVA_KEYS,
        image_size=lambda ip: ip.crop_size["height"], image_tokens=_expanded, dynamic=False),
    "qwen2.5-vl": dict(
        cls=transformers.Qwen2_5_VLForConditionalGeneration, processor=prompts.QwenImageProcessor,
        frozen=("model.visual.patch_embed.", "model.visual.blocks."), projector="model.visual.merger",
        image_keys=("pixel_values", "image_grid_thw"),
        lm_keys=("attention_mask", "input_ids", "image_grid_thw", "mm_token_type_ids"), lm=None, config_keys=(),
        # dynamic resolution: a square of at most 448 px (256 tokens), within the processor's pixel budget
        image_size=lambda ip: min(448, 28 * int(math.sqrt(ip.size["longest_edge"]) // 28)),
        image_tokens=_expanded, dynamic=True,
        positions=lambda model, b: model.model.get_rope_index(b["input_ids"], b["mm_token_type_ids"], b["image_grid_thw"],
                                                              attention_mask=b["attention_mask"])[0]),
    "instructblip": dict(
        cls=transformers.InstructBlipForConditionalGeneration, processor=prompts.InstructBlipImageProcessor,
        frozen=("vision_model.", "qformer.", "query_tokens"), projector="language_projection",
        image_keys=("pixel_values", "qformer_input_ids", "qformer_attention_mask"),
        lm_keys=("attention_mask",), lm="language_model", config_keys=(),  # its forward insists on pixel_values
        image_size=lambda ip: ip.size["height"],
        image_tokens=lambda p, size: p.num_query_tokens, dynamic=False),  # prepended to the prompt's tokens
    # LLaVA-NeXT: anyres, the image as tiles of the encoder's size plus the whole image at that size; its image
    # tokens depend on the image's size (the unpadded grid plus one newline token a row)
    "llava-next": dict(
        cls=transformers.LlavaNextForConditionalGeneration, processor=transformers.LlavaNextProcessor,
        frozen=("model.vision_tower.",), projector="model.multi_modal_projector",
        image_keys=("pixel_values", "image_sizes"), lm_keys=("attention_mask",), lm=None, config_keys=LLAVA_KEYS,
        image_size=lambda ip: ip.crop_size["height"], image_tokens=_expanded, dynamic=True),
}
# Qwen2-VL: Qwen2.5-VL's row (M-RoPE, dynamic resolution; only the vision tower's code differs), its own classes
FAMILIES["qwen2-vl"] = dict(FAMILIES["qwen2.5-vl"], cls=transformers.Qwen2VLForConditionalGeneration,
                            processor=prompts.Qwen2ImageProcessor)
# LLaVA-NeXT on Mistral: the same row, another chat template (prompts.PROMPTS)
FAMILIES["llava-next-mistral"] = FAMILIES["llava-next"]
# InternVL (transformers' native class: the -hf checkpoints): the image as up to max_patches tiles of the encoder's
# size plus a thumbnail (InternVLProcessor's crop_to_patches, on by default whatever preprocessor_config.json says),
# image_seq_length tokens a tile between <img> and </img>; image_tokens counts those two as well (what replaces the
# prompt's one <IMG_CONTEXT>), the image mask only the <IMG_CONTEXT> tokens
FAMILIES["internvl"] = dict(
    cls=transformers.InternVLForConditionalGeneration, processor=prompts.InternVLImageProcessor,
    frozen=("model.vision_tower.",), projector="model.multi_modal_projector",
    image_keys=("pixel_values",), lm_keys=("attention_mask",), lm=None, config_keys=LLAVA_KEYS,
    image_size=lambda ip: ip.size["height"], image_tokens=_expanded, dynamic=True)
MODEL_TYPES = {"llava": "llava", "qwen2_5_vl": "qwen2.5-vl", "instructblip": "instructblip", "qwen2_vl": "qwen2-vl",
               "llava_next": "llava-next", "llava_next/mistral": "llava-next-mistral", "internvl": "internvl"}


def family(model_or_processor):
    return getattr(model_or_processor, "family", None) or family_of(model_or_processor.config.to_dict())


def family_of(config):
    """The family of a config (a dict): by its model type, and its language model's where that picks the
    template (LLaVA-NeXT on Vicuna or on Mistral). None for a model type no family has."""
    text = (config.get("text_config") or {}).get("model_type")
    return MODEL_TYPES.get(f"{config.get('model_type')}/{text}") or MODEL_TYPES.get(config.get("model_type"))


# A hub id is "name" or "org/name" (huggingface_hub's rule); anything else a user passes is a local path.
HUB_ID = re.compile(r"\w[\w.-]*(/\w[\w.-]*)?")


def where(name_or_path):
    """The local folder or hub id a --model names: an alias of ALIASES, an existing folder, or a hub id.
    A missing local path fails here at once, where transformers would try the hub for half a minute and
    then say something else; a hub-shaped name ("out/base") whose first part is a folder here counts as local."""
    if name_or_path in ALIASES:
        return ALIASES[name_or_path]
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise NotADirectoryError(f"{name_or_path}: a file, not a model folder (pass the folder with config.json)")
    parent = os.path.dirname(path)
    if parent and os.path.isdir(parent):  # "out/bsae" beside "out/base": a typo, not the hub id out/bsae
        siblings = ", ".join(sorted(os.listdir(parent))[:12])
        raise FileNotFoundError(f"{name_or_path}: no such folder; {parent} holds {siblings or 'nothing'}")
    if not HUB_ID.fullmatch(name_or_path):
        raise FileNotFoundError(f"{name_or_path}: no such folder (nor a hub id, which is 'name' or 'org/name'; "
                                f"aliases: {', '.join(ALIASES)})")
    return name_or_path


def adapter_base(path):
    """The model a PEFT adapter folder (adapter_config.json: train.py --lora's output) was trained on, resolved
    by where() and as it was then (checkpoint.check_base); None for a model folder or a hub id."""
    file = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(file):
        return None
    with open(file, encoding="utf-8") as f:
        base = json.load(f).get("base_model_name_or_path")
    try:
        base = where(base or "")
    except (FileNotFoundError, NotADirectoryError) as e:  # a base moved since, or an adapter from elsewhere
        raise type(e)(f"{file}: base_model_name_or_path {e}") from None
    import checkpoint  # (here: it imports this file) a base rebuilt or retrained since the export is refused
    return checkpoint.check_base(path, base)


def identity(name_or_path):
    """What tells one model from another when a run resumes: the hub id, or a local folder's path, its
    config.json's sha256 and its weight files' sizes and modification times (a model retrained into the
    same folder keeps its path and config; hashing 14 GB of weights at every start would be too slow)."""
    path = where(name_or_path)
    if not os.path.isdir(path):
        return {"model": path}
    config = os.path.join(path, "config.json")
    base = adapter_base(path)  # an adapter folder: its base's identity too
    return {"model": os.path.abspath(path), "config_sha256": S.sha256(config) if os.path.isfile(config) else None,
            "weights": {f: [os.path.getsize(os.path.join(path, f)), os.stat(os.path.join(path, f)).st_mtime_ns]
                        for f in sorted(os.listdir(path)) if f.endswith((".safetensors", ".bin"))},
            **({"base": identity(base)} if base else {})}


# The model types the generic path (prompts.generic_processor: a model type in no row of FAMILIES) may load
IMAGE_TEXT_TO_TEXT = transformers.models.auto.modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


def checkpoint_family(path, generic=False):
    """The family of a folder or hub id, from its config.json read as plain JSON: an unknown model type is
    refused before any of the checkpoint's code or weights is touched (only transformers' own classes load).
    generic (evaluation): a model type in no row of FAMILIES is prompts.GENERIC where AutoModelForImageTextToText
    knows it. An adapter folder has its base's family."""
    if os.path.isdir(path) and adapter_base(path):
        return checkpoint_family(adapter_base(path), generic)
    if os.path.isdir(path):
        file = os.path.join(path, "config.json")
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{path}: no config.json, so not a Hugging Face model folder "
                                    "(an interrupted export?)")
    else:
        file = huggingface_hub.hf_hub_download(path, "config.json")  # what transformers fetches first anyway
    with open(file, encoding="utf-8") as f:
        config = json.load(f)
    # an encoder-decoder (BLIP, Florence-2, Pix2Struct) has no next-token logits after a prompt to score
    model_type = config.get("model_type")
    loadable = model_type in IMAGE_TEXT_TO_TEXT and not config.get("is_encoder_decoder")
    if family_of(config) is None and generic and loadable:
        return prompts.GENERIC
    if family_of(config) is None:
        types = [(fam, *t.split("/")) for t, fam in MODEL_TYPES.items()]  # "llava_next/mistral": on that LLM
        raise ValueError(f"{path}: model type {model_type!r} is in no row of model.FAMILIES ("
                         + ", ".join(f"{fam}: model_type {t[0]!r}{' on ' + t[1] if t[1:] else ''}" for fam, *t in types)
                         + ("); evaluate.py diagnoses it through the generic path (its processor's chat template), but "
                            "training needs a FAMILIES row for it (its prompt template, frozen modules and image keys)"
                            if loadable else "), nor a decoder-only one transformers' AutoModelForImageTextToText loads"))
    return family_of(config)


def load_processor(name_or_path, generic=False):
    """The processor alone, `.family` and `.row` (its FAMILIES row) set, no weights read: enough to render and measure samples before
    the model loads. generic: a model type in no row of FAMILIES loads through the generic path (evaluation)."""
    path = where(name_or_path)
    fam = checkpoint_family(path, generic)
    if fam == prompts.GENERIC:
        return prompts.generic_processor(path)
    processor = keep_legacy(FAMILIES[fam]["processor"].from_pretrained(path))
    processor.family, processor.row = fam, FAMILIES[fam]
    return processor


def architecture(path, cls, dtype=None):
    """cls's model of the checkpoint at `path` on the meta device: its modules and shapes, no weights read."""
    with torch.device("meta"):
        return cls._from_config(transformers.AutoConfig.from_pretrained(path), dtype=dtype)


def load(name_or_path, dtype=None, device=None, meta=False, generic=False):
    """(model, processor) from a hub id, an alias of ALIASES or a local folder. meta: the architecture
    without weights, on the meta device (train.py's other ranks receive their shards from rank 0).
    generic: a model type in no row of FAMILIES loads with AutoModelForImageTextToText (evaluation only).
    An adapter folder (PEFT's) loads as its base model with the adapter merged in: evaluation at the base's speed."""
    processor = load_processor(name_or_path, generic)
    path, fam, cls = where(name_or_path), processor.family, processor.row["cls"]
    base = adapter_base(path)
    if base:
        model = load(base, dtype, meta=meta, generic=generic)[0]
        model = model if meta else peft.PeftModel.from_pretrained(model, path).merge_and_unload()
    elif meta:
        model = architecture(path, cls, dtype)
    else:
        model = cls.from_pretrained(path, dtype=dtype)
    model.family = fam
    return model.to(device) if device is not None else model, processor


def save(model, processor, folder, state_dict=None):
    """A Hugging Face folder: safetensors weights, config and processor (docs/format.md, 'Output folders'). Of a
    PeftModel (state_dict: its own names, base_model.model...), the adapter folder: adapter_config.json,
    adapter_model.safetensors, processor."""
    model.save_pretrained(folder, state_dict=state_dict)
    if isinstance(model, peft.PeftModel):  # fully_shard renamed the class (FSDPLlava...): AutoPeftModel needs the real one
        cls = processor.row["cls"]
        model.peft_config["default"].save_pretrained(folder, auto_mapping_dict={"base_model_class": cls.__name__,
                                                                                "parent_library": cls.__module__})
    if isinstance(processor, prompts.NoVideo):  # cannot be saved whole without torchvision
        processor.tokenizer.save_pretrained(folder)
        processor.image_processor.save_pretrained(folder)
    else:
        processor.save_pretrained(folder)
    return folder


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # train.py's default


def lora_config(model, r, alpha, dropout, targets=LORA_TARGETS):
    """PEFT's LoraConfig for train.py --lora: adapters on the `targets` projections (q_proj, ...) of the language
    model's blocks alone (the pattern's prefix: never the vision tower's or the Q-Former's, some of which share those
    names), the projector trained in full (modules_to_save: saved in the adapter, restored by PeftModel)."""
    return peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=lora_pattern(targets),
                           modules_to_save=[FAMILIES[family(model)]["projector"]])


def lora_pattern(targets):
    """The module names (PEFT matches them whole) of the language model's `targets` projections."""
    return r"(model\.)?language_model\..*\.(" + "|".join(map(re.escape, targets)) + ")"


def add_lora(model, name_or_path, r, alpha, dropout, targets, dtype):
    """train.py --lora: PEFT's adapters inserted in `model` itself (before sharding: FSDP2 shards each block with them
    inside), everything else frozen and stored in the compute dtype, as it is only read (7B in bf16: 13 GiB, not 26;
    FSDP2 asks one dtype of the trained parameters alone). The adapter names its base: a local folder by its
    absolute path, so the adapter loads from anywhere. Returns the PeftModel."""
    peft_model = peft.get_peft_model(model, lora_config(model, r, alpha, dropout, targets))
    base = where(name_or_path)
    peft_model.peft_config["default"].base_model_name_or_path = os.path.abspath(base) if os.path.isdir(base) else base
    with torch.no_grad():
        for q in model.parameters():
            if not q.requires_grad:
                q.data = q.data.to(dtype)
    return peft_model


def make_tiny(family, folder, words=(), seed=0, dtype=None, **dims):
    """Write a random-init checkpoint of the family's real transformers class at a tiny size (tiny.make_parts: its
    config, an offline tokenizer and the real processor), loadable by load(folder) exactly like a hub checkpoint."""
    torch.manual_seed(seed)
    config, processor = tiny.make_parts(family, words, **dims)
    model = FAMILIES[family]["cls"](config)
    os.makedirs(folder, exist_ok=True)
    return save(model.to(dtype) if dtype else model, processor, folder)


def rows_of(batch, rows, lm_keys):
    """The language-path entries of a batch restricted to some rows (one image per sample)."""
    idx = torch.tensor(list(rows), dtype=torch.long, device=batch["input_ids"].device)
    return {k: batch[k][idx] for k in set(lm_keys) | {"labels", "input_ids", "attention_mask"} if k in batch}


def model_inputs(batch):
    """The batch without our own entries: what `model(**...)` accepts."""
    return {k: v for k, v in batch.items() if k not in ("tasks", "labels", "sample_mask")}


def embed(model, batch):
    """Input embeddings with the image features in place: (B, L, D), and the (B, L) image-token mask.
    Only module calls, so the result is the same under FSDP2 when called inside the root forward.
    PGD perturbs these, and logits() runs the language model on them, so the vision tower runs once a step;
    adding delta by a hook on the first decoder layer would rerun it in every pass (docs/performance.md)."""
    f = FAMILIES[family(model)]
    ids = batch["input_ids"]
    embeds = model.get_input_embeddings()(ids)
    kwargs = {k: batch[k] for k in f["image_keys"]} | {k: getattr(model.config, k) for k in f["config_keys"]}
    feats = model.get_image_features(**kwargs).pooler_output
    feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats.flatten(0, -2)
    return _merged(model, ids, embeds, feats)


def _merged(model, ids, embeds, feats):
    """The text embeddings with the image features (all images' tokens, in order) at the image tokens."""
    image_mask = ids == model.config.image_token_id
    if image_mask.sum() != feats.shape[0]:
        raise ValueError(f"{int(image_mask.sum())} image tokens in the batch but {feats.shape[0]} image features")
    return embeds.masked_scatter(image_mask[..., None], feats.to(embeds.dtype)), image_mask


def logits(model, inputs_embeds, batch, keep=None, past=None):
    """Logits (B, L, V) of the language model on (possibly perturbed) input embeddings; with `keep`
    (a 1-D tensor of positions) only those (B, len(keep), V): the lm head is costly for small models.
    past: prefix()'s keys and values of the rows' first P positions; inputs_embeds are then the positions
    from P on (keep counts from P too), and the logits those a pass over the whole rows gives there."""
    cache = None if past is None else transformers.DynamicCache(past, config=model.config)
    return _language(model, inputs_embeds, batch, 0 if keep is None else keep, cache).logits


def prefix(model, inputs_embeds, batch, stop, grad=False):
    """The keys and values of the rows' positions before `stop`, per layer, without gradients: what
    logits(..., past=) continues from. A causal model's states there do not depend on what follows, so a
    pass over the rest of the rows on top of them gives the logits of a pass over the whole rows.
    grad: inside the autograd graph, returned with the logits of the last prefix position, which the caller
    adds to its loss times 0: FSDP2 gathers a layer's weights for backward when a gradient reaches the layer's
    output, and the last layer's output at the prefix feeds nothing else (its keys and values are inside it)."""
    cache = transformers.DynamicCache(config=model.config)
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        last = _language(model, inputs_embeds[:, :stop], batch, 1, cache).logits
    past = [(layer.keys, layer.values) for layer in cache.layers]
    return (past, last) if grad else past


def _language(model, inputs_embeds, batch, keep, cache):
    """The family's language-model call on inputs_embeds, which follow the cache's positions if there is one."""
    f = FAMILIES[family(model)]
    lm = getattr(model, f["lm"]) if f["lm"] else model
    kwargs = {k: batch[k] for k in f["lm_keys"]}
    if cache is None:
        return lm(inputs_embeds=inputs_embeds, logits_to_keep=keep, **kwargs)
    start = cache.get_seq_length()
    stop = start + inputs_embeds.shape[1]
    kwargs |= dict(attention_mask=batch["attention_mask"][:, :stop], use_cache=True, past_key_values=cache)
    if f.get("positions"):
        kwargs["position_ids"] = f["positions"](model, batch)[..., start:stop]
    with unchecked(model):
        return lm(inputs_embeds=inputs_embeds, logits_to_keep=keep, **kwargs)


# ---- evaluation's shortcut (evaluate.py --shortcuts): the vision tower once per distinct image ---------------

def embed_once(model, batch):
    """embed()'s (embeds, image_mask), each distinct image through the vision tower once: a row whose image inputs
    equal an earlier row's (compared, not assumed) takes that row's features. The image inputs are all that the
    features read (FAMILIES' image_keys): InstructBLIP's Q-Former reads the instruction too (qformer_input_ids), so
    there the rows of one image under other texts still run one each."""
    f, n = FAMILIES[family(model)], len(batch["input_ids"])
    parts = {k: batch[k].split(1) for k in f["image_keys"]}
    if "image_grid_thw" in parts:  # Qwen: pixel_values are the images' patches one after another, t*h*w an image
        parts["pixel_values"] = batch["pixel_values"].split(batch["image_grid_thw"].prod(-1).tolist())
    if any(len(v) != n for v in parts.values()):  # not one image a row (InternVL's tiles): nothing to tell apart
        return embed(model, batch)
    first = [next(q for q in range(r + 1) if all(torch.equal(v[q], v[r]) for v in parts.values())) for r in range(n)]
    distinct = sorted(set(first))
    kwargs = {k: torch.cat([v[r] for r in distinct]) for k, v in parts.items()}
    feats = list(model.get_image_features(**kwargs, **{k: getattr(model.config, k) for k in f["config_keys"]})
                 .pooler_output)  # (tokens, D) an image
    feats = torch.cat([feats[distinct.index(q)] for q in first])
    return _merged(model, batch["input_ids"], model.get_input_embeddings()(batch["input_ids"]), feats)


@contextlib.contextmanager
def unchecked(model):
    """Activation checkpointing off meanwhile: transformers' checkpointed layers drop a cache in training
    (GradientCheckpointingLayer sets past_key_values=None, with a warning only once), so passes that read or
    fill one run without it. Under checkpointing only PGD's passes over a suffix do, which need no parameter
    gradients (train.py shares the clean pass's prefix inside the graph only without checkpointing)."""
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)]
    for m in layers:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in layers:
            m.gradient_checkpointing = True


def freeze(model):
    """Freeze the vision encoder (and InstructBLIP's Q-Former): the projector and the LLM are trained."""
    frozen = FAMILIES[family(model)]["frozen"]
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith(frozen))
    return model


def train_mode(model, on=True):
    """model.train(on), but frozen modules stay in eval mode (the Q-Former's dropout would otherwise
    make two passes over the same input differ)."""
    model.train(on)
    frozen = FAMILIES[family(model)]["frozen"]
    for name, module in model.named_modules():
        if name and (name + ".").startswith(frozen):
            module.eval()
    return model


def blocks(model):
    """The transformer blocks of the vision tower and the LLM (the class's _no_split_modules inside a
    ModuleList): the units train.py shards with FSDP2 and activation checkpointing recomputes."""
    return [child for parent in model.modules() if isinstance(parent, torch.nn.ModuleList) for child in parent
            if type(child).__name__ in model._no_split_modules]
