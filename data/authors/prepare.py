"""The authors' released files in our sample format (docs/format.md, 'A sample'), options in letter order, facts
keyed by a letter or an option text turned into option-index keys (an entry naming no option is dropped and counted).
multiple_choice_data*.json (question, multiple_choices, multiple_choices_answer, image, facts) do not say
the task: --task. SEED-Bench's name the image by data_id, no extension (video items are skipped and
counted). source_train_data.json (id, type, image, "Question:/Option:" prompt, answer letter, facts) gives
each item's task by type; its VQA items, free replies, become instruction samples (options null).
  python data/authors/prepare.py --src data/caltech-101 --task image_heavy [--images DIR ... --name caltech-101]
  python data/authors/prepare.py --src data/source_train_data.json    # -> data/authors/source_train_data/
"""
import argparse
import base64
import binascii
import collections
import glob
import io
import json
import os
import re
import shutil
import string
import sys

from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import perturb  # noqa: E402  (the project root: the sample format)
from data import common  # noqa: E402  (data/common.py: safe names, paths under --out, the JSONL writer)

FILES = {"multiple_choice_data_train.json": "train", "multiple_choice_data_test.json": "test",
         "multiple_choice_data.json": "test", "source_train_data.json": "train"}
TYPES = {"image_heavy": "image_heavy", "text_heavy": "text_heavy", "vqa": "vqa"}  # their "VQA" too
VIDEO = (".mp4", ".avi", ".mkv", ".webm", ".mov")


def find(name, roots):
    """The path a name points to under the first root that has it; a name without extension (SEED-Bench's
    data_id) takes the one found on disk."""
    for root in roots:
        path = os.path.join(root, name)
        if os.path.exists(path):
            return path
        if not os.path.splitext(name)[1]:
            found = sorted(glob.glob(glob.escape(path) + ".*"))
            if found:
                return found[0]
    return None


def save_image(item, roots, out, split, index):
    """The image's path relative to out, or a skip reason. Their MMBench files hold base64, not a name."""
    name = str(item.get("image") or item.get("data_id") or "")
    if str(item.get("data_type") or "").lower() == "video":
        return None, "video"
    if not name:
        return None, "no image"
    found = find(name, roots)
    if found and (os.path.isdir(found) or found.lower().endswith(VIDEO)):  # SEED-Bench video frames or clips
        return None, "video"
    if found:
        if not common.readable_image(found):
            return None, "unreadable image"
        # named by the item's path, each part made safe: a/1.png and b/1.png stay two images
        rel = os.path.normpath(name).replace(os.sep, "/") + ("" if os.path.splitext(name)[1]
                                                             else os.path.splitext(found)[1])
        rel = f"images/{split}/" + common.safe_name(rel, folders=True)
        dest = common.inside(out, rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copyfile(found, dest)
        return rel, None
    if len(name) > 256:
        try:
            data = base64.b64decode(name)
        except (binascii.Error, ValueError):
            return None, "unreadable image"
        if not common.readable_image(io.BytesIO(data)):
            return None, "unreadable image"
        im = Image.open(io.BytesIO(data))
        rel = f"images/{split}/{index:06d}.png"
        os.makedirs(os.path.join(out, "images", split), exist_ok=True)
        (im if im.format == "PNG" else perturb.to_rgb(im)).save(common.inside(out, rel))
        return rel, None
    return None, "missing image"


def split_options(text):
    """Their training prompt "Question:\\n{question}\\nOption:\\nA: ...\\nB: ...\\n" -> (question, {letter: text})."""
    head, sep, tail = str(text or "").rpartition("\nOption:\n")
    parts = re.split(r"(?m)^([A-Z]): ", tail)
    if not sep or parts[0].strip():
        return None, None
    choices = dict(zip(parts[1::2], (p.rstrip("\n") for p in parts[2::2])))
    return head.removeprefix("Question:\n"), choices if len(choices) == len(parts) // 2 else None


def convert(path, split, args):
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            sys.exit(f"{path}:{e.lineno}: malformed JSON: {e.msg} (re-download the file)")
    if not isinstance(data, list):
        sys.exit(f"{path}:1: expected a JSON list of questions")
    here = os.path.dirname(os.path.abspath(path))
    # their code reads data/<name>/images/ and, in the training file, paths from the repo root (data/...)
    roots = args.images or [os.path.join(here, d) for d in ("images", "test", "")] + [os.path.dirname(here)]
    ids = [str(next((item[k] for k in ("id", "question_id", "data_id") if item.get(k) not in (None, "")), ""))
           if isinstance(item, dict) else "" for item in data]
    use_ids = all(ids) and len(set(ids)) == len(ids)  # else a zero-padded index
    rows, skipped = [], collections.Counter()
    for i, item in enumerate(data):
        where = f"{path}: item {i}"
        if not isinstance(item, dict):
            sys.exit(f"{where}: expected a JSON object, got {type(item).__name__}")
        if "multiple_choices" in item or "type" not in item:
            if args.task is None:
                sys.exit(f"{where}: this file does not say the task; pass --task image_heavy, text_heavy or vqa")
            task, question = args.task, item.get("question")
            choices, answer, key = item.get("multiple_choices"), item.get("multiple_choices_answer"), "multiple_choices"
        else:
            task = TYPES.get(str(item["type"]).lower())
            if task is None:
                sys.exit(f"{where}: type {item['type']!r} is not image_heavy, text_heavy or VQA")
            question, choices, answer, key = item.get("question"), None, item.get("answer"), "question's Option: lines"
            if task != "vqa":
                question, choices = split_options(question)
        free = task == "vqa" and "multiple_choices" not in item and "type" in item  # their VQA: a reply text
        if not free:
            if not (isinstance(choices, dict) and choices
                    and all(len(k) == 1 and k in string.ascii_uppercase for k in choices)):
                sys.exit(f"{where}: {key} must map letters A, B, ... to option texts (fix or drop the item)")
            letters = sorted(choices)
            if answer not in letters:
                name = "multiple_choices_answer" if key == "multiple_choices" else "answer"
                sys.exit(f"{where}: {name} {answer!r} is not one of {letters} (fix or drop the item)")
            options = [str(choices[k] if choices[k] is not None else "").strip() for k in letters]
        given = item.get("facts") or {}  # their training file writes [] for no facts
        if not isinstance(given, dict):
            sys.exit(f"{where}: facts must map option letters or texts to sentences, got {type(given).__name__}")
        question = str(question or "").replace("<image>", "").strip()
        if not question:
            skipped["empty question"] += 1
            continue
        if free and not str(answer or "").strip():
            skipped["empty answer"] += 1
            continue
        if not free and (len(options) < 2 or not all(options) or len(set(options)) < len(options)):
            skipped["empty or duplicate options"] += 1
            continue
        image = None
        if task != "text_heavy":
            image, why = save_image(item, roots, args.out, split, i)
            if why:
                skipped[why] += 1
                continue
        facts = {}
        for k, text in given.items():
            k = str(k).strip()
            if free or (k not in letters and k not in options):
                skipped["facts entry naming no option (its sample kept)"] += 1
                continue
            if isinstance(text, str) and text.strip():
                facts[str(letters.index(k) if k in letters else options.index(k))] = text.strip()
        row = dict(id=f"{args.name}-{split}-{ids[i] if use_ids else f'{i:06d}'}", task=task, image=image,
                   question=question, options=None if free else options,
                   answer=str(answer).strip() if free else letters.index(answer), source=args.name)
        rows.append({**row, "facts": facts} if facts else row)
    return rows, skipped


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="a folder with the authors' json files, or one such file")
    p.add_argument("--task", choices=["image_heavy", "text_heavy", "vqa"],
                   help="the task of multiple_choice_data files (source_train_data items say their own)")
    p.add_argument("--images", nargs="+", help="folders an item's image is looked up in, in order; default "
                   "images/, test/, the json's own folder and its parent (the authors' code reads "
                   "data/<name>/images/, and their training file names paths from the repo root)")
    p.add_argument("--name", help="the source name; default the json's folder name (source_train_data for that file)")
    p.add_argument("--out", help="default data/authors/<name>")
    args = p.parse_args(argv)
    if os.path.isfile(args.src):
        files = [(args.src, "train" if "train" in os.path.basename(args.src) else "test")]
    elif os.path.isdir(args.src):
        files = [(os.path.join(args.src, f), s) for f, s in FILES.items() if os.path.isfile(os.path.join(args.src, f))]
        files = [f for k, f in enumerate(files) if f[1] not in {s for _, s in files[:k]}]  # the first file per split
    else:
        sys.exit(f"{args.src}: no such file or folder (pass the folder of multiple_choice_data_*.json or one file)")
    if not files:
        sys.exit(f"{args.src}: no {' or '.join(FILES)} here (pass the folder of the authors' files or one file)")
    stem = os.path.splitext(os.path.basename(files[0][0]))[0]
    args.name = args.name or (stem if stem.startswith("source_train_data")
                              else os.path.basename(os.path.dirname(os.path.abspath(files[0][0]))))
    args.out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), args.name)
    os.makedirs(args.out, exist_ok=True)
    for path, split in files:
        rows, skipped = convert(path, split, args)
        common.write_samples(os.path.join(args.out, f"{split}.jsonl"), rows, skipped)


if __name__ == "__main__":
    main()
