"""The multimodal LLMs we fine-tune and diagnose: loading, prompt rendering, and access to the
input embeddings that PGD perturbs. One path for LLaVA-1.5, Qwen2.5-VL and InstructBLIP; what
differs between them lives in the FAMILIES table, their prompts (ours, or the authors') in PROMPTS.
A library with no command of its own: tiny.py builds the tiny checkpoints of these classes
(`python tiny.py llava out/tiny-llava`).
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

import perturb

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

SYSTEM_QWEN = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


class NoVideo:
    """A processor without its video half: transformers' video processors need torchvision, which has no
    build matching CPU torch here (SPEC section 6). Images are handled by the real code."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template)


class QwenImageProcessor(NoVideo, transformers.Qwen2_5_VLProcessor):
    """Qwen2.5-VL's processor without its video half."""


class Qwen2ImageProcessor(NoVideo, transformers.Qwen2VLProcessor):
    """Qwen2-VL's processor without its video half."""


class InternVLImageProcessor(transformers.InternVLProcessor):
    """InternVL's processor without its video half (as NoVideo), saved as the hub's -hf checkpoints are: unlike
    Qwen's it has a setting of its own, image_seq_length (image tokens per tile), which processor_config.json keeps."""

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length=256, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, image_seq_length=image_seq_length, chat_template=chat_template)

    def save_pretrained(self, save_directory, **kwargs):
        self.tokenizer.save_pretrained(save_directory)
        self.image_processor.save_pretrained(save_directory)
        with open(os.path.join(save_directory, "processor_config.json"), "w", encoding="utf-8") as f:
            json.dump({"image_seq_length": self.image_seq_length, "processor_class": "InternVLProcessor"}, f, indent=2)
        return save_directory


class InstructBlipImageProcessor(transformers.InstructBlipProcessor):
    """InstructBLIP's image processor built from the parts a checkpoint has (tokenizer, qformer_tokenizer/,
    image processor, num_query_tokens), whatever its processor_config.json names: the published ones name
    InstructBlipVideoProcessor, which needs torchvision and has no `image_processor`."""

    # The Q-Former reads its own copy of the instruction, through BERT's 512 learned positions (a longer one
    # crashes it). The authors' LAVIS code cuts that copy to max_txt_len=128 tokens, from the left (the
    # qformer tokenizer's truncation_side), so the Q-Former was instruction-tuned on nothing longer; we do
    # the same. The language model still gets the whole prompt.
    qformer_max_length = 128

    def __call__(self, images=None, text=None, **kwargs):
        # verbose=False: the parent tokenizes the Q-Former's copy whole, and would warn that a copy past 512 tokens
        # "will result in indexing errors", of tokens cut below and never read
        enc = super().__call__(images=images, text=text, verbose=False, **kwargs)
        if text is not None:
            q = self.qformer_tokenizer(text, truncation=True, max_length=self.qformer_max_length,
                                       padding=kwargs.get("padding", False), return_tensors=kwargs.get("return_tensors"))
            enc["qformer_input_ids"], enc["qformer_attention_mask"] = q["input_ids"], q["attention_mask"]
        return enc

    def save_pretrained(self, save_directory, **kwargs):
        # saved as the plain InstructBlipProcessor, which AutoProcessor knows (this class only adds the truncation)
        plain = transformers.InstructBlipProcessor(self.image_processor, self.tokenizer, self.qformer_tokenizer,
                                                   num_query_tokens=self.num_query_tokens)
        return plain.save_pretrained(save_directory, **kwargs)


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


# Everything that differs between families, but the prompt (PROMPTS below).
# `frozen`: parameter-name prefixes kept fixed (vision encoder; InstructBLIP also its Q-Former).
# `projector`: the module between the vision encoder and the LLM, trained in full (under --lora too).
# `lm_keys`: batch entries the language path needs besides inputs_embeds; Qwen2.5-VL needs
# input_ids, image_grid_thw and mm_token_type_ids so that its M-RoPE positions are recomputed
# (with inputs_embeds alone it silently reuses stale rope_deltas from the previous call).
# `processor`: the class load() builds from a checkpoint's parts, whatever its processor_config.json says.
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
        cls=transformers.Qwen2_5_VLForConditionalGeneration, processor=QwenImageProcessor,
        frozen=("model.visual.patch_embed.", "model.visual.blocks."), projector="model.visual.merger",
        image_keys=("pixel_values", "image_grid_thw"),
        lm_keys=("attention_mask", "input_ids", "image_grid_thw", "mm_token_type_ids"), lm=None, config_keys=(),
        # dynamic resolution: a square of at most 448 px (256 tokens), within the processor's pixel budget
        image_size=lambda ip: min(448, 28 * int(math.sqrt(ip.size["longest_edge"]) // 28)),
        image_tokens=_expanded, dynamic=True,
        positions=lambda model, b: model.model.get_rope_index(b["input_ids"], b["mm_token_type_ids"], b["image_grid_thw"],
                                                              attention_mask=b["attention_mask"])[0]),
    "instructblip": dict(
        cls=transformers.InstructBlipForConditionalGeneration, processor=InstructBlipImageProcessor,
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
                            processor=Qwen2ImageProcessor)
# LLaVA-NeXT on Mistral: the same row, another chat template (PROMPTS)
FAMILIES["llava-next-mistral"] = FAMILIES["llava-next"]
# InternVL (transformers' native class: the -hf checkpoints): the image as up to max_patches tiles of the encoder's
# size plus a thumbnail (InternVLProcessor's crop_to_patches, on by default whatever preprocessor_config.json says),
# image_seq_length tokens a tile between <img> and </img>; image_tokens counts those two as well (what replaces the
# prompt's one <IMG_CONTEXT>), the image mask only the <IMG_CONTEXT> tokens
FAMILIES["internvl"] = dict(
    cls=transformers.InternVLForConditionalGeneration, processor=InternVLImageProcessor,
    frozen=("model.vision_tower.",), projector="model.multi_modal_projector",
    image_keys=("pixel_values",), lm_keys=("attention_mask",), lm=None, config_keys=LLAVA_KEYS,
    image_size=lambda ip: ip.size["height"], image_tokens=_expanded, dynamic=True)
MODEL_TYPES = {"llava": "llava", "qwen2_5_vl": "qwen2.5-vl", "instructblip": "instructblip", "qwen2_vl": "qwen2-vl",
               "llava_next": "llava-next", "llava_next/mistral": "llava-next-mistral", "internvl": "internvl"}
SEQUENCE_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "qformer_input_ids", "qformer_attention_mask")


# The authors' system prompts (luisrui/Modality-Interference-in-MLLMs at 911003a, modules/prompt/__init__.py):
# qa_vqa_prompt_multi_choices_train, which their Llava/Qwen/InstructBlipDataset.py put before every image- and
# text-heavy training row, and qa_image_prompt, which src/predict.py passes for every evaluated row (VQA too).
# They differ in one word ("concise answer" / "concise option"); we use each where they do.
AUTHORS_SYSTEM_TRAIN = ("You are an expert at question answering. Given the question and the context image of the "
                        "question, please output the answer. Please provide a concise answer, no explanation and "
                        "further question.")
AUTHORS_SYSTEM_EVAL = ("You are an expert at question answering. Given the question and the context image of the "
                       "question, please output the answer. Please provide a concise option, no explanation and "
                       "further question.")


def render_authors(sample):
    """The authors' question text (src/construct_data.py and modules/utils/aug_utils.py build the same):
    f"Question:\n{question}\nOption:\n{choices_text}" with choices_text = "A: dog\nB: cat\n", so it ends in a
    newline. A free-form instruction sample is its question alone (their VQA rows: the first human turn)."""
    if sample["options"] is None:
        return sample["question"]
    options = "".join(f"{perturb.LETTERS[i]}: {o}\n" for i, o in enumerate(sample["options"]))
    return f"Question:\n{sample['question']}\nOption:\n{options}"


# How each family's prompt and answer are written, per style: "ours" (the default) or "authors" (the authors'
# protocol, to score their released checkpoints and train in their format). `render(sample)`: the question and
# its options; `prompt`: the whole prompt, with {text} the rendered question and {system} the system turn;
# `answer`: the text the model is trained to emit right after the prompt, and `eos` whether the end-of-sequence
# token follows it. `system` (authors only) wraps the system text as the family's template writes a system turn;
# their training rows of the VQA task have no system text: `vqa_system` None leaves the turn out (LLaVA: no
# system message), "" writes an empty one (Qwen: an empty system message; InstructBLIP: system_prompt="").
PROMPTS = {
    ("llava", "ours"): dict(render=perturb.render, prompt="USER: <image>\n{text} ASSISTANT:", answer=" {}", eos=True),
    ("qwen2.5-vl", "ours"): dict(
        render=perturb.render, prompt=SYSTEM_QWEN + "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        "{text}<|im_end|>\n<|im_start|>assistant\n", answer="{}", eos=True),
    ("instructblip", "ours"): dict(render=perturb.render, prompt="{text}", answer=" {}", eos=True),
    # the chat templates of Qwen2-VL-Instruct and Qwen2.5-VL-Instruct write the same text
    ("qwen2-vl", "ours"): dict(render=perturb.render, prompt=SYSTEM_QWEN + "<|im_start|>user\n<|vision_start|>"
                               "<|image_pad|><|vision_end|>{text}<|im_end|>\n<|im_start|>assistant\n", answer="{}",
                               eos=True),
    # llava-hf's llava-v1.6-vicuna-7b-hf template writes LLaVA-1.5's "USER: <image>\n{text} ASSISTANT:", its
    # -mistral-7b-hf one "[INST] <image>\n{text} [/INST]"
    ("llava-next", "ours"): dict(render=perturb.render, prompt="USER: <image>\n{text} ASSISTANT:", answer=" {}",
                                 eos=True),
    ("llava-next-mistral", "ours"): dict(render=perturb.render, prompt="[INST] <image>\n{text} [/INST]", answer=" {}",
                                         eos=True),
    # the chat_template.jinja of OpenGVLab/InternVL3-{1B,2B,14B}-hf (481 bytes, "Update processor (#2)"; the template of
    # transformers' models/internvl/convert_internvl_weights_to_hf.py): "<|im_start|>" + role + "\n", an image as
    # "<IMG_CONTEXT>\n", then the text, "<|im_end|>\n"; the generation prompt "<|im_start|>assistant\n"; no default
    # system turn (unlike Qwen2.5's). The processor expands <IMG_CONTEXT> into <img>, the image's tokens and </img>.
    ("internvl", "ours"): dict(render=perturb.render, prompt="<|im_start|>user\n<IMG_CONTEXT>\n{text}<|im_end|>\n"
                               "<|im_start|>assistant\n", answer="{}", eos=True),
    # modules/data/LlavaDataset.py: processor.apply_chat_template([system, user(image, question)],
    # add_generation_prompt=True) + answer; the llava-1.5 template writes a system turn as its text + " " and
    # ends in "ASSISTANT:", so a row is "{system} USER: <image>\nQuestion:\n...D: tree\n ASSISTANT:A". The answer
    # has no space: after "ASSISTANT:" LLaMA's tokenizer gives the bare "A" (29909), not "▁A" (319).
    # data_collator.py's LLaVADataCollator labels every token after "ASSISTANT:" but padding: no "</s>".
    ("llava", "authors"): dict(render=render_authors, prompt="{system}USER: <image>\n{text} ASSISTANT:",
                               system="{} ", vqa_system=None, answer="{}", eos=False),
    # modules/data/QwenDataset.py: the same conversation through Qwen2.5-VL's template, the system message
    # always given (empty for VQA rows, so no "You are a helpful assistant."):
    # "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>
    # Question:\n...<|im_end|>\n<|im_start|>assistant\nA". QwenDataCollator labels what follows "assistant\n":
    # "A" (32), no "<|im_end|>".
    ("qwen2.5-vl", "authors"): dict(
        render=render_authors, prompt="{system}<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        "{text}<|im_end|>\n<|im_start|>assistant\n", system="<|im_start|>system\n{}<|im_end|>\n", vqa_system="",
        answer="{}", eos=False),
    # modules/prompt/__init__.py, no chat template: blip_visual_format_train
    # "{system_prompt}\n{user_input} <answer> {answer}" (InstructBlipDataset.py; VQA rows system_prompt=""),
    # labels after "<answer>": "▁A" (319), no "</s>". Their evaluation prompt blip_visual_format
    # "{system_prompt}\n{user_input} <answer> " ends in a space, which LLaMA's tokenizer makes a lone "▁" (29871)
    # that training never put before the letter; we leave it out, so evaluation reads the letter token trained.
    ("instructblip", "authors"): dict(render=render_authors, prompt="{system}{text} <answer>",
                                      system="{}\n", vqa_system="", answer=" {}", eos=False),
}
# The authors diagnosed Qwen2-VL (Table 7) through the same chat template with their evaluation system prompt
# (modules/models/local.py: apply_chat_template([system, user(image, question)])); its template writes what
# Qwen2.5-VL's does, so their Qwen2.5-VL row serves
PROMPTS["qwen2-vl", "authors"] = PROMPTS["qwen2.5-vl", "authors"]
STYLES = ("ours", "authors")


def _row(processor, style):
    if style not in STYLES:
        raise ValueError(f"unknown prompt style {style!r}: expected one of {', '.join(STYLES)}")
    fam = family(processor)  # the generic family's rows were built from this processor's chat template
    rows = _family(processor)["prompts"] if fam == GENERIC else {s: r for (f, s), r in PROMPTS.items() if f == fam}
    if style not in rows:
        raise ValueError(f"prompt style {style!r} is not written for the {fam} family: use "
                         + " or ".join(repr(s) for s in rows))
    return rows[style]


def prompt_text(processor, sample, train=False, style="ours"):
    """The whole prompt string the processor receives for sample (before its image tokens are expanded and
    without the answer). Style "authors" writes their training system prompt when train and their evaluation
    one otherwise, as their training and evaluation code do."""
    row, system = _row(processor, style), ""
    if "system" in row:
        vqa = sample["task"] == "vqa"
        text = AUTHORS_SYSTEM_EVAL if not train else row["vqa_system"] if vqa else AUTHORS_SYSTEM_TRAIN
        system = "" if text is None else row["system"].format(text)
    return row["prompt"].format(system=system, text=row["render"](sample))


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
    by where(); None for a model folder or a hub id."""
    file = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(file):
        return None
    with open(file, encoding="utf-8") as f:
        base = json.load(f).get("base_model_name_or_path")
    try:
        return where(base or "")
    except (FileNotFoundError, NotADirectoryError) as e:  # a base moved since, or an adapter from elsewhere
        raise type(e)(f"{file}: base_model_name_or_path {e}") from None


def identity(name_or_path):
    """What tells one model from another when a run resumes: the hub id, or a local folder's path, its
    config.json's sha256 and its weight files' sizes and modification times (a model retrained into the
    same folder keeps its path and config; hashing 14 GB of weights at every start would be too slow)."""
    path = where(name_or_path)
    if not os.path.isdir(path):
        return {"model": path}
    config = os.path.join(path, "config.json")
    base = adapter_base(path)  # an adapter folder: its base's identity too
    return {"model": os.path.abspath(path), "config_sha256": perturb.sha256(config) if os.path.isfile(config) else None,
            "weights": {f: [os.path.getsize(os.path.join(path, f)), os.stat(os.path.join(path, f)).st_mtime_ns]
                        for f in sorted(os.listdir(path)) if f.endswith((".safetensors", ".bin"))},
            **({"base": identity(base)} if base else {})}


def checkpoint_family(path, generic=False):
    """The family of a folder or hub id, from its config.json read as plain JSON: an unknown model type is
    refused before any of the checkpoint's code or weights is touched (only transformers' own classes load).
    generic (evaluation): a model type in no row of FAMILIES is GENERIC where AutoModelForImageTextToText knows it.
    An adapter folder has its base's family."""
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
        return GENERIC
    if family_of(config) is None:
        types = [(fam, *t.split("/")) for t, fam in MODEL_TYPES.items()]  # "llava_next/mistral": on that LLM
        raise ValueError(f"{path}: model type {model_type!r} is in no row of model.FAMILIES ("
                         + ", ".join(f"{fam}: model_type {t[0]!r}{' on ' + t[1] if t[1:] else ''}" for fam, *t in types)
                         + ("); evaluate.py diagnoses it through the generic path (its processor's chat template), but "
                            "training needs a FAMILIES row for it (its prompt template, frozen modules and image keys)"
                            if loadable else "), nor a decoder-only one transformers' AutoModelForImageTextToText loads"))
    return family_of(config)


def load_processor(name_or_path, generic=False):
    """The processor alone, `.family` set, no weights read: enough to render and measure samples before
    the model loads. generic: a model type in no row of FAMILIES loads through the generic path (evaluation)."""
    path = where(name_or_path)
    fam = checkpoint_family(path, generic)
    if fam == GENERIC:
        return generic_processor(path)
    processor = keep_legacy(FAMILIES[fam]["processor"].from_pretrained(path))
    processor.family = fam
    return processor


def load(name_or_path, dtype=None, device=None, meta=False, generic=False):
    """(model, processor) from a hub id, an alias of ALIASES or a local folder. meta: the architecture
    without weights, on the meta device (train.py's other ranks receive their shards from rank 0).
    generic: a model type in no row of FAMILIES loads with AutoModelForImageTextToText (evaluation only).
    An adapter folder (PEFT's) loads as its base model with the adapter merged in: evaluation at the base's speed."""
    processor = load_processor(name_or_path, generic)
    path, fam, cls = where(name_or_path), processor.family, _family(processor)["cls"]
    base = adapter_base(path)
    if base:
        model = load(base, dtype, meta=meta, generic=generic)[0]
        model = model if meta else peft.PeftModel.from_pretrained(model, path).merge_and_unload()
    elif meta:
        with torch.device("meta"):
            model = cls._from_config(transformers.AutoConfig.from_pretrained(path), dtype=dtype)
    else:
        model = cls.from_pretrained(path, dtype=dtype)
    model.family = fam
    return model.to(device) if device is not None else model, processor


def save(model, processor, folder, state_dict=None):
    """A Hugging Face folder: safetensors weights, config and processor (SPEC section 6). Of a PeftModel (state_dict:
    its own names, base_model.model...), the adapter folder: adapter_config.json, adapter_model.safetensors, processor."""
    model.save_pretrained(folder, state_dict=state_dict)
    if isinstance(model, peft.PeftModel):  # fully_shard renamed the class (FSDPLlava...): AutoPeftModel needs the real one
        cls = _family(processor)["cls"]
        model.peft_config["default"].save_pretrained(folder, auto_mapping_dict={"base_model_class": cls.__name__,
                                                                                "parent_library": cls.__module__})
    if isinstance(processor, NoVideo):  # cannot be saved whole without torchvision
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
    return peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                           target_modules=r"(model\.)?language_model\..*\.(" + "|".join(map(re.escape, targets)) + ")",
                           modules_to_save=[FAMILIES[family(model)]["projector"]])


def image_size(processor):
    """Side of the square the family's vision encoder sees: canvases and random pixels are drawn at it."""
    return _family(processor)["image_size"](processor.image_processor)


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def answer_ids(processor, text, style="ours"):
    """Token ids of an answer (a letter, or an instruction sample's reply) as the model emits it after the
    prompt, plus end of sequence where the style trains it. Tokenized in context (after the template's tail):
    tokenizers merge."""
    return answers_ids(processor, [text], style)[0]


def _tail(row):
    """What a prompt row writes after the sample's text (format(): a generic row's braces are escaped)."""
    return row["prompt"].rsplit("{text}", 1)[1].format()


def answers_ids(processor, texts, style="ours"):
    """answer_ids of many answers, tokenized in one call."""
    row, tok = _row(processor, style), processor.tokenizer
    tail = _tail(row) or "\n"
    context, out = _ids(tok, tail), []
    fulls = tok([tail + row["answer"].format(t) for t in texts], add_special_tokens=False)["input_ids"]
    for text, full in zip(texts, fulls):
        if full[:len(context)] != context or len(full) == len(context):
            raise ValueError(f"tokenizer merges the answer {text!r} into the prompt's tail {tail!r}")
        out.append(full[len(context):] + [tok.eos_token_id] * row["eos"])
    return out


def n_image_tokens(processor, size):
    """The image tokens the family's processor inserts for an image of PIL size (width, height), without the
    image: Image.open(path).size reads only the header."""
    return _family(processor)["image_tokens"](processor, tuple(size))


def n_tokens(processor, sample, size, train=True, style="ours"):
    """The length collate gives sample (with its answer when train), from its text and its image's size."""
    return lengths(processor, [sample], [size], train, style)[0]


def lengths(processor, samples, sizes, train=True, style="ours"):
    """n_tokens of many samples, tokenized in one call (a fast tokenizer's batch runs on all cores). The
    prompt's one placeholder (LLaVA's <image>, Qwen's <|image_pad|>) is replaced by the image tokens, and
    InstructBLIP's prompt has none: its processor prepends the query tokens."""
    tok = processor.tokenizer
    placeholder = tok.convert_tokens_to_ids(str(processor.image_token))
    per_size = {}
    for s, size in zip(samples, sizes):
        if tuple(size) not in per_size:
            try:
                per_size[tuple(size)] = n_image_tokens(processor, size)
            except ValueError as e:  # Qwen2-VL's refusal of an aspect ratio over 200, as collate says it
                raise ValueError(f"sample {s['id']!r}: {e}") from e
    texts = [prompt_text(processor, s, train, style) for s in samples]
    ids = tok(texts, **_specials(tok, texts[0] if texts else ""))["input_ids"]
    out = [len(i) - i.count(placeholder) + per_size[tuple(size)] for i, size in zip(ids, sizes)]
    if train:  # with the answer's tokens, each distinct answer tokenized once
        answers = [s["answer"] if s["options"] is None else perturb.LETTERS[s["answer"]] for s in samples]
        distinct = sorted(set(answers))
        n = {a: len(ids) for a, ids in zip(distinct, answers_ids(processor, distinct, style))}
        out = [k + n[a] for k, a in zip(out, answers)]
    return out


def option_token_ids(processor, n, style="ours"):
    """The first token of each answer letter: the next-token logits scored for A, B, C, ..."""
    return [ids[0] for ids in answers_ids(processor, list(perturb.LETTERS[:n]), style)]


def collate(processor, samples, train=True, max_length=None, style="ours"):
    """Render samples with the family's template (PROMPTS[family, style]) into a right-padded batch the
    transformers forward accepts, plus `labels` (-100 except the answer tokens when `train`) and `tasks`.
    The generic family keeps all its processor returns (it is evaluated, never trained: train=False)."""
    f, tok, size = _family(processor), processor.tokenizer, image_size(processor)
    rows = []
    for s in samples:
        image = perturb.load_image(s, size)  # a DataError of its own, naming the sample and the file
        text = prompt_text(processor, s, train, style)
        try:
            enc = processor(images=image, text=text, return_tensors="pt", **_specials(tok, text))
        except ValueError as e:  # the processor's own refusals (Qwen2-VL: an aspect ratio over 200) name no sample
            raise ValueError(f"sample {s['id']!r}: {e}") from e
        enc = {k: v for k, v in enc.items() if k in SEQUENCE_KEYS or f["image_keys"] is None or k in f["image_keys"]}
        n_prompt = enc["input_ids"].shape[1]
        answer = [] if not train else answer_ids(
            processor, s["answer"] if s["options"] is None else perturb.LETTERS[s["answer"]], style)
        if answer:
            extra = torch.tensor([answer])
            enc["input_ids"] = torch.cat([enc["input_ids"], extra], 1)
            enc["attention_mask"] = torch.cat([enc["attention_mask"], torch.ones_like(extra)], 1)
            if "mm_token_type_ids" in enc:
                enc["mm_token_type_ids"] = torch.cat([enc["mm_token_type_ids"], torch.zeros_like(extra)], 1)
        if max_length is not None and enc["input_ids"].shape[1] > max_length:
            n_image = int((enc["input_ids"] == tok.convert_tokens_to_ids(str(processor.image_token))).sum())
            twin = "" if s.get("intervention", "orig") == "orig" else f" under intervention {s['intervention']}"
            raise ValueError(f"sample {s['id']!r}{twin}: {enc['input_ids'].shape[1]} tokens"
                             f"{' with its answer' if train else ''} ({n_image} of them image tokens), more than "
                             f"max_length={max_length}" + ("; truncating would cut the answer (raise max_length)"
                                                            if train else ""))
        labels = torch.full_like(enc["input_ids"], -100)
        labels[0, n_prompt:] = torch.tensor(answer, dtype=labels.dtype)
        enc["labels"] = labels
        if train:  # where PGD may act under train.py --pgd-scope sample
            enc["sample_mask"] = sample_positions(processor, text, s, enc["input_ids"][0, :n_prompt],
                                                  enc["input_ids"].shape[1], style)
        rows.append(enc)
    batch = {}
    for key in rows[0]:
        # per-token entries: ours, and any other the processor returns in input_ids' shape (Gemma3's token_type_ids)
        if key in SEQUENCE_KEYS or key == "labels" or rows[0][key].shape == rows[0]["input_ids"].shape:
            pad = {"input_ids": tok.pad_token_id or 0, "labels": -100}.get(key, 0)  # padding is masked: any id does
            if key == "qformer_input_ids":
                pad = processor.qformer_tokenizer.pad_token_id
            width = max(r[key].shape[1] for r in rows)
            batch[key] = torch.cat([torch.nn.functional.pad(r[key], (0, width - r[key].shape[1]), value=pad)
                                    for r in rows])
        else:  # images: stacked (LLaVA, InstructBLIP) or concatenated patches (Qwen), zero-padded in every dimension
            # but the first to the batch's largest, as their processors pad a batch: LLaVA-NeXT's [1, tiles, C, H, W]
            # to the most tiles (the model reads each image's first tiles only, counted from image_sizes), Idefics3's
            # tiles and pixel_attention_mask likewise (the model drops all-zero tiles)
            most = [max(r[key].shape[d] for r in rows) for d in range(rows[0][key].dim())]
            batch[key] = torch.cat([torch.nn.functional.pad(r[key], [p for d in reversed(range(1, r[key].dim()))
                                                                     for p in (0, most[d] - r[key].shape[d])])
                                    for r in rows])
    batch["tasks"] = [s["task"] for s in samples]
    return batch


def sample_positions(processor, prompt, sample, ids, width, style="ours"):
    """(1, width) bool: the positions of `ids` (the processor's tokens of `prompt`, image tokens expanded) that
    hold the sample's own rendered text (question, options, instruction), which the prompt ends with but for the
    template's tail. Read from the tokenizer's character offsets of the prompt without its images, counted from
    the end: the image comes before the text in every template, and what follows it tokenizes the same either
    way (checked, never assumed)."""
    row = _row(processor, style)
    text = row["render"](sample)
    end = len(prompt) - len(_tail(row))
    start = end - len(text)
    if not text or prompt[start:end] != text:
        raise ValueError(f"sample {sample['id']!r}: its text is not where the template puts it in {prompt!r}")
    tok = processor.tokenizer
    enc = tok(prompt, return_offsets_mapping=True, **_specials(tok, prompt))
    inside = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start]
    first, n = inside[0], len(enc["input_ids"])
    if ids[len(ids) - (n - first):].tolist() != enc["input_ids"][first:]:
        raise ValueError(f"the tokens of {text[:60]!r}... differ with and without the image: cannot place them")
    mask = torch.zeros(1, width, dtype=torch.bool)
    mask[0, len(ids) - (n - first):len(ids) - (n - inside[-1] - 1)] = True
    return mask


# ---- the generic path: diagnosis of a model type in no row of FAMILIES -------------------------------------
# Any checkpoint AutoModelForImageTextToText loads (transformers' own classes, no remote code) whose processor has
# a chat template. Its row is built per processor at load time, in the shape of a FAMILIES row plus its PROMPTS:
# the prompt is the template's own rendering of one user turn (the image, then the question) with the generation
# prompt, so prompt_text, answers_ids, option_token_ids and collate read it as they read the table's. It is
# evaluated only: training (embed, logits, freeze, PGD's masks) needs a FAMILIES row.

GENERIC = "generic"
IMAGE_TEXT_TO_TEXT = transformers.models.auto.modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
MARK = "@@question@@"  # stands for the question while the template renders


def _family(processor):
    """The row of processor's family: FAMILIES', or the generic one generic_processor built for it."""
    return processor.generic if family(processor) == GENERIC else FAMILIES[family(processor)]


def _specials(tokenizer, text):
    """Tokenizer arguments for a prompt: no BOS added where the prompt writes it already (a chat template's
    own, as Idefics3's "<|begin_of_text|>"). The rule of transformers' processor.apply_chat_template."""
    return {"add_special_tokens": False} if tokenizer.bos_token and text.startswith(tokenizer.bos_token) else {}


def generic_processor(path):
    """AutoProcessor of a model type in no row of FAMILIES, `.family` GENERIC and `.generic` its row. The answer is
    written as the template writes an assistant turn's text after the generation prompt (Idefics3: " B" after
    "Assistant:"). Canvases are drawn at the vision encoder's image_size, else the image processor's (crop) height,
    else 336 (the authors' canvas)."""
    processor = transformers.AutoProcessor.from_pretrained(path)
    for part in ("image_processor", "chat_template"):
        if not getattr(processor, part, None):
            raise ValueError(f"{path}: its processor has no {part.replace('_', ' ')}, which evaluating a model type in "
                             "no row of model.FAMILIES needs (the generic path): add one, or a FAMILIES row")
    user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": MARK}]}]
    prompt = processor.apply_chat_template(user, add_generation_prompt=True)
    if prompt.count(MARK) != 1:
        raise ValueError(f"{path}: its chat template writes the user's text {prompt.count(MARK)} times, not once")
    reply = processor.apply_chat_template(user + [{"role": "assistant", "content": [{"type": "text", "text": MARK}]}])
    rest = reply[len(prompt):] if reply.startswith(prompt) else ""
    before = rest[:rest.index(MARK)] if MARK in rest else ""  # else the letter right after the generation prompt

    def escape(t):  # the rendering as a format string in the table's form, "{text}" where the question goes
        return t.replace("{", "{{").replace("}", "}}")
    config, ip = transformers.AutoConfig.from_pretrained(path), processor.image_processor
    sides = [getattr(getattr(config, "vision_config", None), "image_size", None)] + [
        getattr(ip, k).get("height") for k in ("crop_size", "size") if getattr(ip, k, None) is not None]
    side = next((s for s in sides if s), 336)
    side = side[0] if isinstance(side, (list, tuple)) else side
    processor.family = GENERIC
    processor.generic = dict(
        cls=transformers.AutoModelForImageTextToText, image_keys=None, image_size=lambda ip: side,
        image_tokens=_counted, dynamic=True, model_type=config.model_type, counted={},
        prompts={"ours": dict(render=perturb.render, prompt="{text}".join(escape(p) for p in prompt.split(MARK)),
                              answer=escape(before) + "{}", eos=False)})
    return processor


def _counted(processor, size):
    """n_image_tokens of the generic family: the tokens an image of that size adds to a prompt, plus the placeholder
    they replace (as the table's image_tokens count), from the processor run once per size on a blank image: only
    the processor knows (Idefics3 cuts an image into a number of tiles that depends on its size)."""
    if size not in processor.generic["counted"]:
        from PIL import Image
        tok, text = processor.tokenizer, _row(processor, "ours")["prompt"].format(text="")
        plain = tok(text, **_specials(tok, text))["input_ids"]
        ids = processor(images=Image.new("RGB", size), text=text, **_specials(tok, text))["input_ids"][0]
        placeholder = tok.convert_tokens_to_ids(str(processor.image_token))
        processor.generic["counted"][size] = len(ids) - len(plain) + plain.count(placeholder)
    return processor.generic["counted"][size]


def model_inputs(batch):
    """The batch without our own entries: what `model(**...)` accepts."""
    return {k: v for k, v in batch.items() if k not in ("tasks", "labels", "sample_mask")}


def embed(model, batch):
    """Input embeddings with the image features in place: (B, L, D), and the (B, L) image-token mask.
    Only module calls, so the result is the same under FSDP2 when called inside the root forward.
    PGD perturbs these, and logits() runs the language model on them, so the vision tower runs once a step;
    adding delta by a hook on the first decoder layer would rerun it in every pass (README, Performance)."""
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


def make_tiny(family, folder, words=(), seed=0, dtype=None, **dims):
    """SPEC section 4's name for tiny.make_tiny (a tiny random-init checkpoint of the real class, built offline):
    the builders live in tiny.py, which imports this module."""
    import tiny
    return tiny.make_tiny(family, folder, words, seed, dtype, **dims)


def blocks(model):
    """The transformer blocks of the vision tower and the LLM (the class's _no_split_modules inside a
    ModuleList): the units train.py shards with FSDP2 and activation checkpointing recomputes."""
    return [child for parent in model.modules() if isinstance(parent, torch.nn.ModuleList) for child in parent
            if type(child).__name__ in model._no_split_modules]
