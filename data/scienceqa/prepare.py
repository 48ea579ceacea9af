"""ScienceQA-IMG as VQA questions: only items with an image, options in the source's order, a non-empty
hint put before the question as "Context: <hint>". Reads the original problems.json with
images/<split>/<id>/image.png (or <split>/<id>/image.png), or Hugging Face derek-thomas/ScienceQA
{train,validation,test}-*.parquet; train/val(idation)/test -> train/validation/test.jsonl, less any split
whose image folder was not extracted.
  python data/scienceqa/prepare.py --src PATH [--out data/scienceqa]
"""
import argparse
import collections
import io
import json
import os
import shutil
import sys

from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import perturb  # noqa: E402  (the project root: the sample format)
from data import common  # noqa: E402  (data/common.py: safe names, paths under --out, the JSONL writer)

SPLITS = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}


def original(src):
    """(split, where, id, item, image path or None) from problems.json, ids in numeric order."""
    path = src if os.path.isfile(src) else os.path.join(src, "problems.json")
    with open(path, encoding="utf-8") as f:
        try:
            problems = json.load(f)
        except json.JSONDecodeError as e:
            sys.exit(f"{path}:{e.lineno}: malformed JSON: {e.msg} (re-download problems.json)")
    root = os.path.dirname(path)
    for pid in sorted(problems, key=lambda k: (len(k), k)):
        item, where = problems[pid], f"{path}: problem {pid}"
        if not isinstance(item, dict) or item.get("split") not in SPLITS:
            sys.exit(f"{where}: no split train/val/test (expected an object with question, choices, answer, split)")
        image = None
        if item.get("image"):
            candidates = [os.path.join(root, d, item["split"], pid, item["image"]) for d in ("images", "")]
            image = next((c for c in candidates if os.path.isfile(c)), candidates[0])
        yield SPLITS[item["split"]], where, pid, item, image


def image_folder(src, split):
    """The original layout's image folder of split, or None: a user may extract only some of the zips."""
    root = os.path.dirname(src) if os.path.isfile(src) else src
    folders = [os.path.join(root, d, s) for d in ("images", "") for s in SPLITS if SPLITS[s] == split]
    return next((f for f in folders if os.path.isdir(f)), None)


def parquet(src):
    """(split, where, index, row, image bytes or None) from the HF parquet files, split from the file name."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        sys.exit(f"{src}: reading parquet needs pyarrow (pip install pyarrow), or use the original problems.json")
    files = collections.defaultdict(list)
    walk = [(os.path.dirname(src), [], [os.path.basename(src)])] if os.path.isfile(src) else sorted(os.walk(src))
    for folder, _, names in walk:
        for name in sorted(n for n in names if n.endswith(".parquet") and n.split("-")[0] in SPLITS):
            files[SPLITS[name.split("-")[0]]].append(os.path.join(folder, name))
    for split, paths in sorted(files.items()):
        folders = sorted({os.path.dirname(p) for p in paths})
        if len(folders) > 1:
            sys.exit(f"{src}: {split} files in several folders ({', '.join(folders)}); pass --src one of them")
        index = 0
        for path in paths:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
                for row in batch.to_pylist():
                    image = row.get("image")
                    yield split, f"{path}: row {index}", f"{index:05d}", row, image.get("bytes") if image else None
                    index += 1


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="folder with problems.json (or the file), or the HF parquet folder")
    p.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    args = p.parse_args(argv)
    if not os.path.exists(args.src):
        sys.exit(f"{args.src}: no such file or folder (pass --src the downloaded ScienceQA folder)")
    is_json = args.src.endswith(".json") or os.path.isfile(os.path.join(args.src, "problems.json"))
    rows, skipped = collections.defaultdict(list), collections.defaultdict(collections.Counter)
    for split, where, sid, item, image in (original if is_json else parquet)(args.src):
        try:
            question, choices, answer = item["question"], item["choices"], item["answer"]
        except KeyError as e:
            sys.exit(f"{where}: missing {e} (expected question, choices, answer)")
        choices = [str(c).strip() if c is not None else "" for c in choices or []]
        if type(answer) is not int or not 0 <= answer < len(choices):
            sys.exit(f"{where}: answer {answer!r} is not an index into the {len(choices)} choices (fix or drop it)")
        if image is None:
            skipped[split]["no image"] += 1
            continue
        if not str(question or "").strip():
            skipped[split]["empty question"] += 1
            continue
        if not all(choices) or len(choices) < 2:
            skipped[split]["empty options"] += 1
            continue
        if len(set(choices)) < len(choices):
            skipped[split]["duplicate options"] += 1
            continue
        if not isinstance(image, bytes) and not os.path.isfile(image):
            skipped[split]["missing image"] += 1
            continue
        if not common.readable_image(io.BytesIO(image) if isinstance(image, bytes) else image):
            skipped[split]["unreadable image"] += 1
            continue
        out_image = f"images/{split}/{common.safe_name(sid)}.png"  # sid: a key of problems.json
        os.makedirs(os.path.join(args.out, "images", split), exist_ok=True)
        if isinstance(image, bytes):
            im = Image.open(io.BytesIO(image))
            (im if im.format == "PNG" else perturb.to_rgb(im)).save(common.inside(args.out, out_image))
        else:
            shutil.copyfile(image, common.inside(args.out, out_image))
        hint = str(item.get("hint") or "").strip()
        rows[split].append(dict(id=f"scienceqa-{split}-{sid}", task="vqa", image=out_image,
                                question=f"Context: {hint}\n{question.strip()}" if hint else question.strip(),
                                options=choices,
                                answer=answer, source="scienceqa"))
    if not rows and not skipped:
        sys.exit(f"{args.src}: no problems.json and no {{train,validation,test}}-*.parquet here (pass --src the "
                 f"ScienceQA folder)")
    os.makedirs(args.out, exist_ok=True)
    for split in ("train", "validation", "test"):
        if is_json and split in skipped and not rows.get(split) and image_folder(args.src, split) is None:
            print(f"note: no {split} image folder beside problems.json, so no {split}.jsonl "
                  f"(extract that split's images to convert it)")
        elif split in rows or split in skipped:
            common.write_samples(os.path.join(args.out, f"{split}.jsonl"), rows[split], skipped[split])


if __name__ == "__main__":
    main()
