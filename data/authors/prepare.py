"""The authors' released files (multiple_choice_data_{train,test}.json: question, multiple_choices
{letter: text}, multiple_choices_answer, image, optional facts) in SPEC section 1 format: options in
letter order, facts keyed by a letter or an option text become option-index keys. Their files do not
say the task, so --task is required; output goes to data/authors/<name> unless --out.
  python data/authors/prepare.py --src data/caltech-101 --task image_heavy [--images DIR ... --name caltech-101]
"""
import argparse
import base64
import binascii
import collections
import io
import json
import os
import shutil
import string
import sys

from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import perturb  # noqa: E402  (the project root: the sample format)

FILES = {"multiple_choice_data_train.json": "train", "multiple_choice_data_test.json": "test",
         "multiple_choice_data.json": "test"}


def save_image(item, roots, out, split, index):
    """The image's path relative to out, or a skip reason. Their MMBench files hold base64, not a name."""
    name = str(item.get("image") or "")
    if not name:
        return None, "no image"
    found = next((os.path.join(r, name) for r in roots if os.path.isfile(os.path.join(r, name))), None)
    try:
        if found:
            with Image.open(found) as im:
                im.verify()
            rel = os.path.normpath(name).replace(os.sep, "/")
            rel = f"images/{split}/" + (os.path.basename(rel) if rel.startswith("../") or os.path.isabs(rel) else rel)
            os.makedirs(os.path.dirname(os.path.join(out, rel)), exist_ok=True)
            shutil.copyfile(found, os.path.join(out, rel))
            return rel, None
        if len(name) > 256:
            im = Image.open(io.BytesIO(base64.b64decode(name)))
            rel = f"images/{split}/{index:06d}.png"
            os.makedirs(os.path.join(out, "images", split), exist_ok=True)
            (im if im.format == "PNG" else im.convert("RGB")).save(os.path.join(out, rel))
            return rel, None
    except (binascii.Error, OSError, SyntaxError, ValueError):
        return None, "unreadable image"
    return None, "missing image"


def convert(path, split, args):
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            sys.exit(f"{path}:{e.lineno}: malformed JSON: {e.msg} (re-download the file)")
    if not isinstance(data, list):
        sys.exit(f"{path}:1: expected a JSON list of questions")
    roots = args.images or [os.path.join(os.path.dirname(path), d) for d in ("images", "test", "")]
    ids = [str(item.get("id", "")) if isinstance(item, dict) else "" for item in data]
    use_ids = all(ids) and len(set(ids)) == len(ids)  # else a zero-padded index
    rows, skipped = [], collections.Counter()
    for i, item in enumerate(data):
        where = f"{path}: item {i}"
        choices = item.get("multiple_choices") if isinstance(item, dict) else None
        if not (isinstance(choices, dict) and choices
                and all(len(k) == 1 and k in string.ascii_uppercase for k in choices)):
            sys.exit(f"{where}: multiple_choices must map letters A, B, ... to option texts (fix or drop the item)")
        letters = sorted(choices)
        answer = item.get("multiple_choices_answer")
        if answer not in letters:
            sys.exit(f"{where}: multiple_choices_answer {answer!r} is not one of {letters} (fix or drop the item)")
        options = [str(choices[k] if choices[k] is not None else "").strip() for k in letters]
        facts, given = {}, item.get("facts") or {}
        if not isinstance(given, dict):
            sys.exit(f"{where}: facts must map option letters or texts to sentences, got {type(given).__name__}")
        for key, text in given.items():
            key = str(key).strip()
            if key not in letters and key not in options:
                sys.exit(f"{where}: facts key {key!r} is neither an option letter nor an option text (fix the facts)")
            if isinstance(text, str) and text.strip():
                facts[str(letters.index(key) if key in letters else options.index(key))] = text.strip()
        if not str(item.get("question") or "").strip():
            skipped["empty question"] += 1
            continue
        if len(options) < 2 or not all(options) or len(set(options)) < len(options):
            skipped["empty or duplicate options"] += 1
            continue
        image = None
        if args.task != "text_heavy":
            image, why = save_image(item, roots, args.out, split, i)
            if why:
                skipped[why] += 1
                continue
        row = dict(id=f"{args.name}-{split}-{ids[i] if use_ids else f'{i:06d}'}", task=args.task, image=image,
                   question=item["question"].strip(), options=options, answer=letters.index(answer), source=args.name)
        rows.append({**row, "facts": facts} if facts else row)
    return rows, skipped


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="a folder with multiple_choice_data_*.json, or one such file")
    p.add_argument("--task", required=True, choices=["image_heavy", "text_heavy", "vqa"])
    p.add_argument("--images", nargs="+", help="folders an item's image is looked up in, in order; default "
                   "images/, test/ and the json's own folder (the authors' code reads data/<name>/images/)")
    p.add_argument("--name", help="the source name; default the json's folder name")
    p.add_argument("--out", help="default data/authors/<name>")
    args = p.parse_args(argv)
    if os.path.isfile(args.src):
        files = [(args.src, "train" if "train" in os.path.basename(args.src) else "test")]
    elif os.path.isdir(args.src):
        files = [(os.path.join(args.src, f), s) for f, s in FILES.items() if os.path.isfile(os.path.join(args.src, f))]
        files = [f for k, f in enumerate(files) if f[1] not in {s for _, s in files[:k]}]  # _test wins over the unsplit
    else:
        sys.exit(f"{args.src}: no such file or folder (pass the folder of multiple_choice_data_*.json or one file)")
    if not files:
        sys.exit(f"{args.src}: no {' or '.join(FILES)} here (pass the folder of the authors' files or one file)")
    args.name = args.name or os.path.basename(os.path.dirname(os.path.abspath(files[0][0])))
    args.out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), args.name)
    os.makedirs(args.out, exist_ok=True)
    for path, split in files:
        rows, skipped = convert(path, split, args)
        perturb.write_samples(os.path.join(args.out, f"{split}.jsonl"), rows, skipped)


if __name__ == "__main__":
    main()
