"""MMBench-EN as VQA questions from its TSV (e.g. MMBench_DEV_EN.tsv; the dev split is our test set,
as test answers are not public): the non-empty options A, B, ... in order, a hint that is not empty
or "nan" put before the question as "Context: <hint>", base64 images decoded to PNG files.
VLMEvalKit's TSV also holds CircularEval passes of each question (index + k * 1e6, options rotated, the
image cell holding the main row's index). By default one sample per question (index < 1e6), the passes
skipped and counted; --circular keeps every pass, tied by "question_id", for diagnose's CircularEval.
  python data/mmbench/prepare.py --src MMBench_DEV_EN.tsv [--out data/mmbench] [--circular]
"""
import argparse
import base64
import binascii
import collections
import csv
import io
import os
import string
import sys

from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import perturb  # noqa: E402  (the project root: the sample format)
from data import common  # noqa: E402  (data/common.py: safe names, paths under --out, the JSONL writer)

CIRCULAR = 1_000_000  # VLMEvalKit: pass k of question i has index i + k * 1e6


def blank(value):
    # pandas writes a missing cell as "" and some copies spell it out
    return value is None or value.strip() == "" or value.strip().lower() == "nan"


def read_tsv(path):
    """(line, row dict) pairs; the base64 images make fields far longer than csv's default limit."""
    csv.field_size_limit(2**31 - 1)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        rows = [(reader.line_num, row) for row in reader]
    return reader.fieldnames or [], rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="an MMBench TSV, or a folder of them (all go into test.jsonl)")
    p.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--circular", action="store_true", help="keep every CircularEval pass (rotated options) as a "
                   "sample with a shared question_id; default one sample per question")
    args = p.parse_args(argv)
    if not os.path.exists(args.src):
        sys.exit(f"{args.src}: no such file or folder (pass --src the MMBench TSV, e.g. MMBench_DEV_EN.tsv)")
    paths = [args.src] if os.path.isfile(args.src) else sorted(
        os.path.join(args.src, f) for f in os.listdir(args.src) if f.endswith(".tsv"))
    rows, skipped, first, converted, saved = [], collections.Counter(), {}, [], set()
    os.makedirs(os.path.join(args.out, "images"), exist_ok=True)
    for path in paths:
        columns, table = read_tsv(path)
        if "answer" not in columns:
            print(f"skipped {path}: no answer column (a test split; its answers are not public)")
            continue
        missing = {"index", "question", "image", "A", "B"} - set(columns)
        if missing:
            sys.exit(f"{path}:1: missing columns {sorted(missing)} (expected an MMBench TSV with index, question, "
                     f"hint, A, B, ..., answer, image)")
        converted.append(path)
        letters = [c for c in string.ascii_uppercase if c in columns]
        images = {row["index"]: row["image"] for _, row in table}
        for line, row in table:
            where, index = f"{path}:{line}", row["index"]
            if index in first:
                sys.exit(f"{where}: index {index} also on {first[index]} (convert one MMBench TSV at a time)")
            first[index] = where
            if not index.strip().isdigit():
                sys.exit(f"{where}: index {index!r} is not a whole number (expected VLMEvalKit's MMBench TSV)")
            if int(index) >= CIRCULAR and not args.circular:
                skipped["CircularEval pass (rotated options; --circular keeps them)"] += 1
                continue
            kept = [c for c in letters if not blank(row[c])]
            answer = (row["answer"] or "").strip()
            if answer not in kept:
                sys.exit(f"{where}: answer {answer!r} names no non-empty option (options {kept}; fix or drop the row)")
            options = [row[c].strip() for c in kept]
            # VLMEvalKit stores a repeated image once: other rows (CircularEval passes too) hold its row's index
            image, holder = row["image"] or "", index
            if len(image) <= 64:
                holder = image.strip()
                image = images.get(holder, "")
            if blank(row["question"]):
                skipped["empty question"] += 1
                continue
            if len(set(options)) < len(options) or len(options) < 2:
                skipped["duplicate or too few options"] += 1
                continue
            out_image = f"images/{common.safe_name(holder)}.png"
            if holder not in saved:  # each image is written once, however many rows show it
                try:
                    data = base64.b64decode(image, validate=False)
                except (binascii.Error, ValueError):
                    data = b""
                if not common.readable_image(io.BytesIO(data)):
                    skipped["missing or undecodable image"] += 1
                    continue
                im = Image.open(io.BytesIO(data))
                (im if im.format == "PNG" else perturb.to_rgb(im)).save(common.inside(args.out, out_image))
                saved.add(holder)
            hint, question = row.get("hint"), row["question"].strip()
            sample = dict(id=f"mmbench-test-{index}", task="vqa", image=out_image,
                          question=question if blank(hint) else f"Context: {hint.strip()}\n{question}",
                          options=options, answer=kept.index(answer), source="mmbench",
                          category=row.get("category") or "")
            if args.circular:
                sample["question_id"] = f"mmbench-{int(index) % CIRCULAR}"
            rows.append(sample)
    if not converted:
        sys.exit(f"{args.src}: no TSV with an answer column (pass a dev TSV such as MMBench_DEV_EN.tsv)")
    questions = len({r.get("question_id", r["id"]) for r in rows})
    print(f"{questions} questions: " + (f"{len(rows)} CircularEval passes, tied by question_id" if args.circular
                                          else "one sample each, the pass with index < 1e6"))
    common.write_samples(os.path.join(args.out, "test.jsonl"), rows, skipped)


if __name__ == "__main__":
    main()
