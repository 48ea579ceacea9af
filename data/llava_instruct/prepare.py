"""LLaVA-1.5 instruction data (llava_v1_5_mix665k.json style) as free-form VQA training samples: the
answer is the assistant's reply text and options is null (our extension of the sample format: docs/format.md,
'A sample'). One sample per conversation from its first exchange; --all-turns gives one per exchange.
Conversations without an image are skipped. Images go under --out/images/ by their path under --images, as hard links (no
space used), symbolic links where --out is on another filesystem, or with --copy-images as copies: a
JSONL's images must lie inside its folder.
  python data/llava_instruct/prepare.py --src llava_v1_5_mix665k.json [--images ROOT --all-turns --copy-images]
"""
import argparse
import collections
import json
import os
import re
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from data import common  # noqa: E402  (data/common.py: safe names, paths under --out, the JSONL writer)


def clean(text):
    """The human turn without the <image> token and the newlines around it."""
    return re.sub(r"\n*<image>\n*", "\n", text).strip()


def place(image, dest, copy):
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    if os.path.lexists(dest):  # from an earlier run: os.link does not replace a file
        os.remove(dest)
    try:
        if copy:
            shutil.copyfile(image, dest)
        else:
            try:
                os.link(image, dest)
            except OSError:  # another filesystem: a hard link cannot cross it, a symbolic one can
                os.symlink(os.path.abspath(image), dest)
    except OSError as e:
        sys.exit(f"error: {image}: cannot {'copy' if copy else 'link'} it to {dest}: {e.strerror} "
                 f"(check --out, or pass --copy-images)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="the instruction json: a list of {id, image, conversations}")
    p.add_argument("--images", help="root the items' image paths are relative to; default the json's folder")
    p.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--all-turns", action="store_true", help="one sample per exchange; the earlier exchanges "
                   "are prepended to the question as 'USER: ... ASSISTANT: ...' lines")
    p.add_argument("--copy-images", action="store_true", help="copy images to --out/images/ (default: hard-link them)")
    args = p.parse_args(argv)
    if not os.path.isfile(args.src):
        sys.exit(f"{args.src}: no such file (pass --src the instruction json, e.g. llava_v1_5_mix665k.json)")
    images = args.images or os.path.dirname(os.path.abspath(args.src))
    with open(args.src, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            sys.exit(f"{args.src}:{e.lineno}: malformed JSON: {e.msg} (re-download the file)")
    if not isinstance(data, list):
        sys.exit(f"{args.src}:1: expected a JSON list of conversations")
    rows, skipped, placed = [], collections.Counter(), {}
    for i, item in enumerate(data):
        where = f"{args.src}: item {i}"
        turns = item.get("conversations") if isinstance(item, dict) else None
        if not (isinstance(turns, list) and turns and len(turns) % 2 == 0 and all(
                isinstance(t, dict) and t.get("from") == ("human", "gpt")[j % 2] and isinstance(t.get("value"), str)
                for j, t in enumerate(turns))):
            sys.exit(f"{where}: conversations must alternate {{'from': 'human'}} and {{'from': 'gpt'}} turns with "
                     f"string values (fix or drop the item)")
        if not item.get("image"):
            skipped["conversations without image"] += 1
            continue
        image = os.path.join(images, item["image"])
        if not os.path.isfile(image):
            skipped["conversations with a missing image file"] += 1
            continue
        name = os.path.normpath(item["image"]).replace(os.sep, "/")
        if os.path.isabs(item["image"]) or name.startswith("../"):
            sys.exit(f"{where}: image {item['image']!r} is not inside --images (image paths must be relative to it)")
        rel = "images/" + common.safe_name(name, folders=True)
        if rel not in placed:
            placed[rel] = common.readable_image(image)
            if placed[rel]:
                place(image, common.inside(args.out, rel), args.copy_images)
        if not placed[rel]:
            skipped["conversations with an unreadable image"] += 1
            continue
        pairs = [(clean(turns[j]["value"]), turns[j + 1]["value"].strip()) for j in range(0, len(turns), 2)]
        for k, (question, answer) in enumerate(pairs if args.all_turns else pairs[:1]):
            if not question or not answer:
                skipped["exchanges with an empty turn"] += 1
                continue
            context = "".join(f"USER: {q} ASSISTANT: {a}\n" for q, a in pairs[:k])
            rows.append(dict(id=f"llava_instruct-train-{i:06d}" + (f"-{k}" if args.all_turns else ""), task="vqa",
                             image=rel, question=context + question, options=None, answer=answer,
                             source="llava_instruct", source_id=str(item.get("id", ""))))
    os.makedirs(args.out, exist_ok=True)
    print(f"{len(rows)} samples from {len(data)} conversations")
    common.write_samples(os.path.join(args.out, "train.jsonl"), rows, skipped)


if __name__ == "__main__":
    main()
