"""mini-ImageNet as image-heavy questions ("What is the main object in the image?", the true class and
--n-options - 1 other classes, shuffled). All images are pooled, shuffled with --seed and cut uniformly
(not stratified) into --n-train then --n-test images (the paper's 4935 / 2000); none is in both.
  python data/miniimagenet/prepare.py --src PATH [--names FILE --out data/miniimagenet --n-options 4 --seed 0]
"""
import argparse
import collections
import csv
import os
import random
import re
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from data import common  # noqa: E402  (data/common.py: safe names, paths under --out, the JSONL writer)

QUESTION = "What is the main object in the image?"
EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
SPLIT_DIRS = ("train", "val", "validation", "test")


def read_names(path):
    """'wnid name' or 'wnid,name' lines; of ImageNet's 'n01440764 tench, Tinca tinca' the first synonym."""
    names = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = re.split(r"[\s,]+", line.strip(), maxsplit=1)
            if len(parts) < 2 or not parts[1].split(",")[0].strip():
                sys.exit(f"{path}:{lineno}: expected 'wnid name' or 'wnid,name', got {line.strip()!r} (fix the line)")
            names[parts[0]] = parts[1].split(",")[0].strip()
    return names


def _number(name):
    """The trailing number of ImageNet's 'n01440764_10026.JPEG', by which mmfewshot orders a class folder."""
    tail = os.path.splitext(name)[0].split("_")[-1]
    return (0, int(tail), name) if tail.isdigit() else (1, 0, name)


def find_images(src):
    """(class, path) of every image in the common layouts, and how many other files the class folders hold:
    SRC/{train,val,test}/<class>/*, SRC/<class>/*, or SRC/{train,val,test}.csv (filename,label) with SRC/images/
    flat (Ravi & Larochelle: images/n0153282900000005.jpg) or holding ImageNet's files per class (mmfewshot:
    images/n01532829/n01532829_10026.JPEG); there the csv's n0153282900000005 is the 5th file of the class
    folder ordered by the number after '_', as mmfewshot's MiniImageNetDataset reads it."""
    found, ignored, folders = [], 0, {}
    csvs = [os.path.join(src, f"{s}.csv") for s in SPLIT_DIRS if os.path.isfile(os.path.join(src, f"{s}.csv"))]
    images = os.path.join(src, "images")
    if csvs and os.path.isdir(images):
        for path in csvs:
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.reader(f)
                for row in reader:
                    if len(row) != 2:
                        sys.exit(f"{path}:{reader.line_num}: expected 'filename,label', got {row!r} (fix the row)")
                    if row == ["filename", "label"]:
                        continue
                    name, cls = row
                    stem = os.path.splitext(name)[0]
                    image = os.path.join(images, name)
                    if not os.path.isfile(image) and os.path.isdir(os.path.join(images, cls)) and stem[-5:].isdigit():
                        if cls not in folders:
                            files = os.listdir(os.path.join(images, cls))
                            folders[cls] = sorted((f for f in files if f.lower().endswith(EXTS)), key=_number)
                            ignored += len(files) - len(folders[cls])
                        nth = int(stem[-5:]) - 1
                        if 0 <= nth < len(folders[cls]):
                            image = os.path.join(images, cls, folders[cls][nth])
                    found.append((cls, image))
        return sorted(found), ignored
    roots = [os.path.join(src, s) for s in SPLIT_DIRS if os.path.isdir(os.path.join(src, s))] or [src]
    for root in roots:
        for cls in sorted(os.listdir(root)):
            if os.path.isdir(os.path.join(root, cls)):
                for name in sorted(os.listdir(os.path.join(root, cls))):
                    if name.lower().endswith(EXTS):
                        found.append((cls, os.path.join(root, cls, name)))
                    else:
                        ignored += 1
    return found, ignored


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="the downloaded mini-ImageNet folder")
    p.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--names", help="file of 'wnid name' or 'wnid,name' lines; default: folder names, _ -> space")
    p.add_argument("--n-train", type=int, default=4935)
    p.add_argument("--n-test", type=int, default=2000)
    p.add_argument("--n-options", type=int, default=4, help="options per question, the true class included")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not 2 <= args.n_options <= 26:
        p.error("--n-options must be 2 to 26 (options are shown as the letters A to Z)")
    if not os.path.isdir(args.src):
        sys.exit(f"{args.src}: no such folder (pass --src the folder you downloaded mini-ImageNet to)")
    pool, ignored = find_images(args.src)
    if not pool:
        sys.exit(f"{args.src}: no images found (expected SRC/<class>/*.jpg, SRC/train/<class>/*.jpg, "
                 f"or SRC/images/ (flat or per class) with SRC/train.csv; point --src at the folder that holds them)")
    names = read_names(args.names) if args.names else {}
    unnamed = sorted({c for c, _ in pool} - set(names)) if args.names else []
    if unnamed:
        sys.exit(f"{args.names}: no line for class {unnamed[0]!r} and {len(unnamed) - 1} more "
                 f"(add '<wnid> <name>' lines or drop --names)")
    label = {c: names.get(c) or c.replace("_", " ") for c, _ in pool}
    # options are names, so two folders with one name count once and never both appear in a question
    labels = sorted(set(label.values()))
    if len(labels) < max(args.n_options, 2):
        sys.exit(f"{args.src}: {len(labels)} classes, too few for {args.n_options} options (lower --n-options)")
    print(f"found {len(pool)} images of {len(labels)} classes in {args.src}"
          + (f" (ignored {ignored} non-image files)" if ignored else ""))
    if not args.names and all(re.fullmatch(r"n\d{8}", c) for c, _ in pool):
        print("note: the classes are WordNet ids; pass --names (e.g. ImageNet's LOC_synset_mapping.txt) for words")
    rng = random.Random(args.seed)
    rng.shuffle(pool)
    next_image = 0
    for split, n in (("train", args.n_train), ("test", args.n_test)):
        rows, skipped = [], collections.Counter()
        os.makedirs(os.path.join(args.out, "images", split), exist_ok=True)
        while len(rows) < n and next_image < len(pool):
            cls, path = pool[next_image]
            next_image += 1
            if not os.path.isfile(path):
                skipped["missing image"] += 1
                continue
            if not common.readable_image(path):
                skipped["unreadable image"] += 1
                continue
            options = [label[cls]] + rng.sample([c for c in labels if c != label[cls]], args.n_options - 1)
            rng.shuffle(options)
            image = f"images/{split}/" + common.safe_name(f"{cls}-{os.path.basename(path)}")  # cls: a csv's text
            shutil.copyfile(path, common.inside(args.out, image))
            stem = os.path.splitext(os.path.basename(path))[0]
            rows.append(dict(id=f"miniimagenet-{split}-{cls}-{stem}", task="image_heavy", image=image,
                             question=QUESTION, options=options, answer=options.index(label[cls]),
                             source="miniimagenet"))
        if n == 0:  # asked for no such split: no file, rather than an empty one
            continue
        if len(rows) < n:
            print(f"note: asked for {n} {split} images, only {len(rows)} were left")
        common.write_samples(os.path.join(args.out, f"{split}.jsonl"), rows, skipped)


if __name__ == "__main__":
    main()
