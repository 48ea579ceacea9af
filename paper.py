"""The authors' training settings per model, as train.py flags: `train.py --paper-defaults MODEL` sets them
(flags given explicitly win, and a --preset's own flags too). From their repository (luisrui/Modality-Interference-
in-MLLMs at 911003a), configs/model_train/. Their alpha 0.1, tau 1, batch 8, warm-up 0.03, AdamW eps 1e-6 and weight
decay 1e-4 are train.py's defaults already. The consistency kind stays the preset's (ours: JS).
"""
PAPER = {
    # llava-v1.5-7b/args_full_KL_PGD.yaml, as Table 8: their args_full_JS_PGD.yaml says pgd_steps 1, but it trains
    # on another file (trail_5.json), its run name says epsilon 1e-4, and it lacks the image/text ratios that
    # src/llava/llava_consistent.py reads, so it cannot have made the paper's runs as written
    "llava-1.5-7b": dict(eps=1e-3, pgd_steps=2, lambda_cons=0.01, lr=2e-5, ratio_image=0.25, ratio_text=0.25),
    # instructBlip-7b/args_full_KL_PGD.yaml (there is no JS+PGD config for InstructBLIP)
    "instructblip-vicuna-7b": dict(eps=0.05, pgd_steps=4, lambda_cons=0.01, lr=2e-5, ratio_image=0.25,
                                   ratio_text=0.25),
    # qwen2.5-vl-3b/args_full_KL_PGD.yaml: their args_full_JS_PGD.yaml sets consistency_type KL, eps 1e-3,
    # lr 1e-6, batch 10 and 0.2 / 0.2 while its save_dir names eps 1e-2 and 2:2:4, so the KL file is the coherent one
    "qwen2.5-vl-3b": dict(eps=1e-2, pgd_steps=2, lambda_cons=1e-3, lr=1e-5, ratio_image=0.25, ratio_text=0.25),
    # qwen2.5-vl-7b/args_full_JS_PGD.yaml (mix 1:1:6)
    "qwen2.5-vl-7b": dict(eps=1e-3, pgd_steps=1, lambda_cons=1e-3, lr=1e-5, ratio_image=0.125, ratio_text=0.125),
}
# and their data protocol: every twin every step (LlavaDataset.py), UF's facts drawn with replacement
# (modules/prompt/text_interfere.py), canvases and random pixels at 336 px for every family (modules/utils/aug_utils.py)
PAPER = {m: dict(model=m, **row, twins="all", facts_replacement=True, canvas_size=336, prompt="authors",
                pgd_scope="template")
         for m, row in PAPER.items()}


FAMILY = {"llava-1.5-7b": "llava", "instructblip-vicuna-7b": "instructblip", "qwen2.5-vl-3b": "qwen2.5-vl",
          "qwen2.5-vl-7b": "qwen2.5-vl"}  # the model.FAMILIES row of each, which a --model must share


def applied(args):
    """train.py's start line on --paper-defaults: the settings of its row the run kept, those a flag given explicitly
    (or the preset) overrode, and a word where --model is not the model they were written for."""
    if not args.paper_defaults:
        return ""
    row = {k: v for k, v in PAPER[args.paper_defaults].items() if k != "model"}
    kept = {k: v for k, v in row.items() if getattr(args, k) == v}
    other = [k for k in row if k not in kept]
    return (f"; --paper-defaults {args.paper_defaults} set {flags(kept)}"
            + (f", overridden: {flags({k: getattr(args, k) for k in other})}" if other else "")
            + ("" if args.model == args.paper_defaults else f" (written for {args.paper_defaults}, not {args.model})"))


def flags(row):
    """A row of PAPER as the flags it stands for, as train.py --help prints them."""
    def flag(k, v):
        name = "--" + k.replace("_", "-")
        return name if v is True else f"{name} {v:g}" if isinstance(v, float) else f"{name} {v}"
    return " ".join(flag(k, v) for k, v in row.items())


def epilog():
    """train.py --help's table of --paper-defaults."""
    return ("--paper-defaults MODEL sets the authors' settings for MODEL (flags given explicitly win, and a --preset's "
            "own flags too):\n" + "".join(f"  {m}: {flags(row)}\n" for m, row in PAPER.items()) +
            "The plain defaults are the paper's Table 8.")
