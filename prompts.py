"""How a sample becomes tokens: the families' processors, the prompt templates (ours and the authors') in PROMPTS,
the answer tokens, the lengths of samples, and collate's batches with their labels and sample masks; also the generic
path's processor and prompt row, read off the chat template of a model type in no row of model.FAMILIES. Imports no
module of ours but perturb: a processor carries its family's row as `processor.row` (model.load_processor sets it),
and what is read here is that row's image side: image_size, image_tokens and image_keys.
"""
import json
import re
import os

import torch
import transformers

import perturb

SYSTEM_QWEN = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


class NoVideo:
    """A processor without its video half: transformers' video processors need torchvision, which has no
    build matching CPU torch here (docs/format.md, 'Output folders'). Images are handled by the real code."""

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
    fam = processor.family  # the generic family's rows were built from this processor's chat template
    rows = processor.row["prompts"] if fam == GENERIC else {s: r for (f, s), r in PROMPTS.items() if f == fam}
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


def image_size(processor):
    """Side of the square the family's vision encoder sees: canvases and random pixels are drawn at it."""
    return processor.row["image_size"](processor.image_processor)


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
    return processor.row["image_tokens"](processor, tuple(size))


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


SEQUENCE_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "qformer_input_ids", "qformer_attention_mask")


def collate(processor, samples, train=True, max_length=None, style="ours"):
    """Render samples with the family's template (PROMPTS[family, style]) into a right-padded batch the
    transformers forward accepts, plus `labels` (-100 except the answer tokens when `train`) and `tasks`.
    The generic family keeps all its processor returns (it is evaluated, never trained: train=False)."""
    f, tok, size = processor.row, processor.tokenizer, image_size(processor)
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
MARK = "@@question@@"  # stands for the question while the template renders


def _specials(tokenizer, text):
    """Tokenizer arguments for a prompt: no BOS added where the prompt writes it already (a chat template's
    own, as Idefics3's "<|begin_of_text|>"). The rule of transformers' processor.apply_chat_template."""
    return {"add_special_tokens": False} if tokenizer.bos_token and text.startswith(tokenizer.bos_token) else {}


def generic_processor(path):
    """AutoProcessor of a model type in no row of FAMILIES, `.family` GENERIC and `.row` its row. The answer is
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
    processor.row = dict(
        cls=transformers.AutoModelForImageTextToText, image_keys=None, image_size=lambda ip: side,
        image_tokens=_counted, dynamic=True, model_type=config.model_type, counted={},
        prompts={"ours": dict(render=perturb.render, prompt="{text}".join(escape(p) for p in prompt.split(MARK)),
                              answer=escape(before) + "{}", eos=False)})
    return processor


def _counted(processor, size):
    """n_image_tokens of the generic family: the tokens an image of that size adds to a prompt, plus the placeholder
    they replace (as the table's image_tokens count), from the processor run once per size on a blank image: only
    the processor knows (Idefics3 cuts an image into a number of tiles that depends on its size)."""
    if size not in processor.row["counted"]:
        from PIL import Image
        tok, text = processor.tokenizer, _row(processor, "ours")["prompt"].format(text="")
        plain = tok(text, **_specials(tok, text))["input_ids"]
        ids = processor(images=Image.new("RGB", size), text=text, **_specials(tok, text))["input_ids"][0]
        placeholder = tok.convert_tokens_to_ids(str(processor.image_token))
        processor.row["counted"][size] = len(ids) - len(plain) + plain.count(placeholder)
    return processor.row["counted"][size]


# ---- the authors' protocol: which option a generated answer names ----------------------------------------
# How a generated answer names its option, in parse_answer's order. The authors (modules/utils/read_utils.py
# extract_final_choice, used by src/predict.py; src/evaluate_IMoF.py has the same without \b) take the first
# match of \b([A-Za-z])\b (caltech-101, mini-imagenet) or \b([A-Da-d])\b (the others), uppercased, and ask
# again once with "Please directly choose the option with option number. No further explanation." appended
# when nothing matched (retry_thres 2 in configs/model_inference/); analysis/evaluate/evaluate_mc.py and
# src/batch_evaluate.py then match \b[A-Z]\b|[A-Z](?=\s|:) against the gold letter. Where we differ, and why:
# - the article: their pattern reads "a dog is shown" (and "I think ...") as option A (I); we read a one-letter
#   English word followed by another word as that word, unless the words after it are its option's text;
# - a lowercase letter counts only where it cannot be prose: the whole answer ("b", "b."), in parentheses
#   ("(b)"), or after "answer", "option", "choice" or "is" ("answer: b");
# - a letter past the sample's options is no answer ("E" of four options; theirs takes any A-Z on caltech-101);
# - an answer that is, or names, exactly one option's text counts as that option ("dog", "a dog"), and a letter
#   inside an option's text ("vitamin C") is no letter;
# - no retry: asking again with another prompt only for the samples that failed would score those under a
#   second prompt; unparsed answers count as wrong and evaluate.py prints how many there were.
LETTER = re.compile(r"(?<![\w'.-])(\()?([A-Za-z])(?(1)\))(?![\w'-]|\.\w)")  # not in "it's", "T-shirt", "U.S."
CUE = re.compile(r"\b(?:answer|option|choice|is)\s*[:-]?\s*$", re.I)
WORD_AFTER = re.compile(r"\s+(?!is\b)[A-Za-z]")  # "A dog", "I think"; "A is right" names the letter
PUNCT = " \t\n.,:;!?()[]*\"'"


def parse_answer(text, options):
    """The index of the option a generated answer names, or None (nothing, or no single option)."""
    t, n = (text or "").strip(), len(options)
    bare = t.strip(PUNCT)
    if len(bare) == 1 and bare.isalpha():  # "B", "b.", "(C)", "a"
        i = ord(bare.upper()) - ord("A")
        return i if i < n else None
    for i, o in enumerate(options):
        if bare.lower() == o.strip(PUNCT).lower():
            return i
    spans = [(i, m.span()) for i, o in enumerate(options) if o.strip()
             for m in re.finditer(rf"(?<!\w){re.escape(o.strip())}(?!\w)", t, re.I)]
    for m in LETTER.finditer(t):
        paren, c = m.group(1), m.group(2)
        i = ord(c.upper()) - ord("A")
        if i >= n or any(a <= m.start(2) < b for _, (a, b) in spans):
            continue
        if c.islower() and not paren and not CUE.search(t[:m.start()]):
            continue
        if c in "AaI" and not paren and WORD_AFTER.match(t, m.end()) and not re.match(
                rf"\s+{re.escape(options[i].strip())}(?!\w)", t[m.end():], re.I):
            continue
        return i
    # an option's text: one option named, a match inside a longer option's match ("dog" in "hot dog") aside
    named = {i for i, (a, b) in spans if not any(c <= a and b <= d and (c, d) != (a, b) for _, (c, d) in spans)}
    return named.pop() if len(named) == 1 else None
