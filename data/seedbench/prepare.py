"""SEED-Bench-IMG as VQA questions: the image items of SEED-Bench.json (video items are skipped), the
four choices A-D in order; images are looked up as <images>/<data_id> (with .jpg/.png tried when the
id has no extension) and copied to images/ under their path below --images, made safe (common.safe_name).
All of SEED-Bench is a test set.
  python data/seedbench/prepare.py --src SEED-Bench.json [--images SEED-Bench-image --out data/seedbench]
"""
import argparse
import collections
import json
import os
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from data import common  # noqa: E402  (data/common.py: safe names, paths under --out, the JSONL writer)

LETTERS = "ABCD"


def find_image(folder, data_id):
    for candidate in (data_id, data_id + ".jpg", data_id + ".png", data_id + ".jpeg"):
        if os.path.isfile(os.path.join(folder, candidate)):
            return os.path.join(folder, candidate)
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="SEED-Bench.json, or the folder that holds it")
    p.add_argument("--images", help="the image folder; default SEED-Bench-image beside the json")
    p.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    args = p.parse_args(argv)
    path = os.path.join(args.src, "SEED-Bench.json") if os.path.isdir(args.src) else args.src
    if not os.path.isfile(path):
        sys.exit(f"{path}: no such file (pass --src SEED-Bench.json or the folder that holds it)")
    images = args.images or os.path.join(os.path.dirname(os.path.abspath(path)), "SEED-Bench-image")
    if not os.path.isdir(images):
        sys.exit(f"{images}: no such folder (unzip SEED-Bench-image.zip beside the json or pass --images)")
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            sys.exit(f"{path}:{e.lineno}: malformed JSON: {e.msg} (re-download SEED-Bench.json)")
    questions = data.get("questions") if isinstance(data, dict) else None
    if not isinstance(questions, list):
        sys.exit(f"{path}:1: no \"questions\" list (expected SEED-Bench.json of SEED-Bench-1)")
    rows, skipped, copied = [], collections.Counter(), {}
    os.makedirs(os.path.join(args.out, "images"), exist_ok=True)
    for i, q in enumerate(questions):
        where = f"{path}: questions[{i}]"
        try:
            qid, question, data_type, data_id, answer = (q["question_id"], q["question"], q["data_type"],
                                                         q["data_id"], q["answer"])
            options = [str(q[f"choice_{c.lower()}"] or "").strip() for c in LETTERS]
        except (KeyError, TypeError) as e:
            sys.exit(f"{where}: missing {e} (expected question_id, question, choice_a..d, answer, data_type, data_id)")
        if data_type != "image":
            skipped[f"{data_type} questions"] += 1
            continue
        if not (isinstance(answer, str) and len(answer) == 1 and answer in LETTERS):
            sys.exit(f"{where}: answer {answer!r} is not one of A, B, C, D (fix or drop the question)")
        if not str(question).strip():
            skipped["empty question"] += 1
            continue
        if not all(options) or len(set(options)) < len(options):
            skipped["empty or duplicate options"] += 1
            continue
        source = find_image(images, str(data_id))
        if source is None:
            skipped["missing image"] += 1
            continue
        if source not in copied:  # named by the path under --images: a/1.png and b/1.png are two images
            rel = "images/" + common.safe_name(os.path.relpath(source, images).replace(os.sep, "/"), folders=True)
            copied[source] = rel if common.readable_image(source) else None
            if copied[source]:
                dest = common.inside(args.out, copied[source])
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                shutil.copyfile(source, dest)
        if copied[source] is None:
            skipped["unreadable image"] += 1
            continue
        rows.append(dict(id=f"seedbench-test-{qid}", task="vqa", image=copied[source], question=question.strip(),
                         options=options, answer=LETTERS.index(answer), source="seedbench",
                         question_type_id=q.get("question_type_id")))
    common.write_samples(os.path.join(args.out, "test.jsonl"), rows, skipped)


if __name__ == "__main__":
    main()
