"""The parts of tiny random-init checkpoints of the real transformers classes, built offline (a word-level tokenizer,
the family's real processor and config at a small size), for the tests, toy.py and bench.py; model.make_tiny
writes one, which loads with model.load(folder) exactly like a hub checkpoint. `python tiny.py llava out/tiny-llava`.
"""
import sys

import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors

import perturb
import prompts

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>",
            "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
BASE_WORDS = ("USER ASSISTANT system user assistant You are a helpful . , : ; ? ! ' \" ( ) - "
              "Answer with the option ' s letter from given choices directly What is shown in image this "
              "picture photo of main object which color shape How many").split()
# the named special tokens of the InternVL -hf tokenizers (their tokenizer_config.json), which InternVLProcessor reads
INTERNVL_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                   "video_token": "<video>"}


def make_tokenizer(words=(), image_token="<image>", named=None):
    """A word-level tokenizer with the special tokens of all three templates, BOS prepended. `named`: more named
    special tokens ({"context_image_token": "<IMG_CONTEXT>", ...}: InternVL's), added after every word, so the
    other families' ids stay as they are."""
    vocab = {}
    for w in SPECIALS + list(perturb.LETTERS) + [str(d) for d in range(10)] + BASE_WORDS + list(words):
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens=({"image_token": image_token} if image_token else {}) | (named or {}))
    tok.add_special_tokens({"additional_special_tokens": SPECIALS[4:]})
    return tok


def make_parts(family, words=(), hidden=32, layers=2, heads=2, vision_hidden=32, vision_layers=2, *,
               intermediate=None, kv_heads=None, vocab=None, vision_heads=2, vision_intermediate=None,
               image=32, patch=8):
    """(config, processor) of the family at any size: tiny for the tests and the toy world, or a
    published 7B/13B shape for bench.py (vocab pads the embedding table to the real size; the offline
    word-level tokenizer uses its first ids). Defaults: MLPs 2x wide, as many KV heads as heads."""
    words = list(words) + ["INST"] * (family == "llava-next-mistral")  # its template's "[INST]"
    # InstructBlipProcessor wants a tokenizer without an `image_token` attribute (it adds its own)
    tok = make_tokenizer(words, {"qwen2.5-vl": "<|image_pad|>", "qwen2-vl": "<|image_pad|>", "instructblip": None,
                                 "internvl": None}.get(family, "<image>"),
                         INTERNVL_TOKENS if family == "internvl" else None)
    V, ids = max(len(tok), vocab or 0), tok.convert_tokens_to_ids
    text = dict(vocab_size=V, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                max_position_embeddings=4096,
                pad_token_id=ids("<pad>"), bos_token_id=ids("<s>"), eos_token_id=ids("</s>"), tie_word_embeddings=False)
    vision = dict(hidden_size=vision_hidden, intermediate_size=vision_intermediate or 2 * vision_hidden,
                  num_hidden_layers=vision_layers, num_attention_heads=vision_heads)
    half = hidden // heads // 2  # Qwen's M-RoPE splits half the head dimension over (time, height, width)
    if family == "llava":
        config = transformers.LlavaConfig(
            vision_config=transformers.CLIPVisionConfig(**vision, image_size=image, patch_size=patch),
            text_config=transformers.LlamaConfig(**text), image_token_index=ids("<image>"),
            vision_feature_select_strategy="default", vision_feature_layer=-2)
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
        ip = CLIPImageProcessorPil(size={"shortest_edge": image}, crop_size={"height": image, "width": image})
        processor = transformers.LlavaProcessor(ip, tok, patch_size=patch, vision_feature_select_strategy="default",
                                                num_additional_image_tokens=1)
    elif family == "llava-next" or family == "llava-next-mistral":
        # anyres over the published pinpoints' shapes (1x2, 2x1, 2x2, 3x1 and 1x3 tiles of the encoder's size)
        pinpoints = [[image * h, image * w] for h, w in ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))]
        llm = transformers.MistralConfig if family == "llava-next-mistral" else transformers.LlamaConfig
        config = transformers.LlavaNextConfig(
            vision_config=transformers.CLIPVisionConfig(**vision, image_size=image, patch_size=patch),
            text_config=llm(**text), image_token_index=ids("<image>"), image_grid_pinpoints=pinpoints,
            vision_feature_select_strategy="default", vision_feature_layer=-2)
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
        ip = LlavaNextImageProcessorPil(size={"shortest_edge": image}, crop_size={"height": image, "width": image},
                                        image_grid_pinpoints=pinpoints)
        processor = transformers.LlavaNextProcessor(ip, tok, patch_size=patch, vision_feature_select_strategy="default",
                                                    num_additional_image_tokens=1)
    elif family == "qwen2.5-vl" or family == "qwen2-vl":
        tok.eos_token = "<|im_end|>"  # the Instruct checkpoints end a turn with it
        sections = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
        text.update(num_key_value_heads=kv_heads or 1, eos_token_id=ids("<|im_end|>"),
                    rope_parameters={"rope_type": "default", "mrope_section": sections, "rope_theta": 10000.0})
        if family == "qwen2.5-vl":
            cls, visual = transformers.Qwen2_5_VLConfig, dict(
                hidden_size=vision_hidden, intermediate_size=vision["intermediate_size"], out_hidden_size=hidden,
                window_size=112, fullatt_block_indexes=[vision_layers - 1])
        else:  # Qwen2-VL's tower: no window attention, its MLP width a multiple of its own, its output `hidden_size`
            cls, visual = transformers.Qwen2VLConfig, dict(
                embed_dim=vision_hidden, mlp_ratio=vision["intermediate_size"] // vision_hidden, hidden_size=hidden)
        config = cls(
            text_config=text, image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
            vision_config=dict(depth=vision_layers, num_heads=vision_heads, patch_size=14, **visual))
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
        ip = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14, merge_size=2)
        cls = prompts.QwenImageProcessor if family == "qwen2.5-vl" else prompts.Qwen2ImageProcessor
        processor = cls(image_processor=ip, tokenizer=tok)
    elif family == "internvl":  # Qwen2 LLM; its pixel shuffle halves the encoder's patch grid each way
        tok.eos_token = "<|im_end|>"
        text.update(model_type="qwen2", eos_token_id=ids("<|im_end|>"))
        config = transformers.InternVLConfig(
            vision_config=dict(**vision, image_size=image, patch_size=patch), text_config=text,
            image_token_id=ids("<IMG_CONTEXT>"), image_seq_length=(image // patch // 2) ** 2, tie_word_embeddings=False)
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
        # the hub's preprocessor_config.json at the tiny size: ImageNet mean/std, crop_to_patches false (which
        # InternVLProcessor's own default overrides: it tiles), 1 to 12 tiles
        ip = GotOcr2ImageProcessorPil(size={"height": image, "width": image}, image_mean=[0.485, 0.456, 0.406],
                                      image_std=[0.229, 0.224, 0.225], crop_to_patches=False, min_patches=1,
                                      max_patches=12)
        processor = prompts.InternVLImageProcessor(ip, tok, image_seq_length=config.image_seq_length)
    elif family == "instructblip":
        config = transformers.InstructBlipConfig(
            vision_config=dict(**vision, image_size=image, patch_size=patch),
            qformer_config=dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, encoder_hidden_size=vision_hidden, pad_token_id=ids("<pad>")),
            text_config=dict(model_type="llama", **text), num_query_tokens=4, image_token_index=ids("<image>"))
        from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
        ip = BlipImageProcessorPil(size={"height": image, "width": image})
        processor = transformers.InstructBlipProcessor(ip, tok, make_tokenizer(words), num_query_tokens=4)
    else:
        raise ValueError(f"unknown family {family!r}: expected one of llava, llava-next, llava-next-mistral, "
                         f"qwen2.5-vl, qwen2-vl, internvl, instructblip")
    return config, processor


if __name__ == "__main__":  # python tiny.py FAMILY FOLDER [VOCAB_FILE]
    import model  # the script writes a checkpoint, which is model.py's to do (the library part needs no model.py)
    words = open(sys.argv[3], encoding="utf-8").read().split() if len(sys.argv) > 3 else ()
    print(model.make_tiny(sys.argv[1], sys.argv[2], words))
