"""Caltech-101 as image-heavy questions ("What is the main object in the image?", the true class and
--n-options - 1 other classes, shuffled). Test is stratified: --n-test images spread evenly over the
classes (~10 each); train is a uniform sample of --n-train of the rest (paper: 8124 / 1020). Skipped:
BACKGROUND_Google (not a class) and Faces_easy (the Faces images again, cropped: a face would get two right
options; CoOp's Caltech-101 drops it too). Deterministic from --seed.
  python data/caltech101/prepare.py --src PATH [--out data/caltech101 --n-options 4 --seed 0]
"""
import argparse
import collections
import os
import random
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from data import common  # noqa: E402  (data/common.py: safe names, paths under --out, the JSONL writer)

QUESTION = "What is the main object in the image?"
DROPPED = {"BACKGROUND_Google": "not a class", "Faces_easy": "duplicate of Faces"}
EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


def find_root(src):
    """--src may be 101_ObjectCategories itself, its parent, or torchvision's root (caltech101/...)."""
    for root in (src, os.path.join(src, "101_ObjectCategories"),
                 os.path.join(src, "caltech101", "101_ObjectCategories")):
        if os.path.basename(os.path.normpath(root)) == "101_ObjectCategories" and os.path.isdir(root):
            return root
    sys.exit(f"{src}: no 101_ObjectCategories folder here (extract 101_ObjectCategories.tar.gz and pass "
             f"--src the folder that holds 101_ObjectCategories, or that folder itself)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="the folder holding 101_ObjectCategories, or that folder")
    p.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    # the paper's 8124 + 1020 = 9144 looks like every image with BACKGROUND_Google (1020 = 10 x 102 folders);
    # without it fewer remain, so train takes all that is left after the test hold-out and says so
    p.add_argument("--n-train", type=int, default=8124)
    p.add_argument("--n-test", type=int, default=1020, help="spread evenly over the classes")
    p.add_argument("--n-options", type=int, default=4, help="options per question, the true class included")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not 2 <= args.n_options <= 26:
        p.error("--n-options must be 2 to 26 (options are shown as the letters A to Z)")
    if not os.path.exists(args.src):
        sys.exit(f"{args.src}: no such folder (pass --src the folder you extracted Caltech-101 to)")
    root = find_root(args.src)
    by_class, ignored = {}, 0
    for cls in sorted(os.listdir(root)):
        if not os.path.isdir(os.path.join(root, cls)):
            continue
        files = sorted(os.listdir(os.path.join(root, cls)))
        if cls in DROPPED:
            print(f"skipped {sum(f.lower().endswith(EXTS) for f in files)} images of {cls} ({DROPPED[cls]})")
            continue
        by_class[cls.replace("_", " ")] = [os.path.join(root, cls, f) for f in files if f.lower().endswith(EXTS)]
        ignored += sum(not f.lower().endswith(EXTS) for f in files)
    labels = sorted(by_class)
    if len(labels) < max(args.n_options, 2):
        sys.exit(f"{root}: {len(labels)} class folders, too few for {args.n_options} options (lower --n-options)")
    print(f"found {sum(map(len, by_class.values()))} images of {len(labels)} classes in {root}"
          + (f" (ignored {ignored} non-image files)" if ignored else ""))
    rng = random.Random(args.seed)
    for label in labels:
        rng.shuffle(by_class[label])
    # n_test // classes each; the remainder goes one apiece to classes drawn at random
    quota = {label: args.n_test // len(labels) for label in labels}
    for label in rng.sample(labels, args.n_test % len(labels)):
        quota[label] += 1
    chosen = {"test": [], "train": []}
    skipped = {"test": collections.Counter(), "train": collections.Counter()}

    def usable(split, path):
        why = "missing image" if not os.path.isfile(path) else "" if common.readable_image(path) else "unreadable image"
        if why:
            skipped[split][why] += 1
        return not why

    rest = []
    for label in labels:
        images = by_class[label]
        taken = 0
        while images and taken < quota[label]:
            path = images.pop(0)
            if usable("test", path):
                chosen["test"].append((label, path))
                taken += 1
        rest += [(label, path) for path in images]
    rng.shuffle(rest)
    for label, path in rest:
        if len(chosen["train"]) == args.n_train:
            break
        if usable("train", path):
            chosen["train"].append((label, path))
    for split, n in (("train", args.n_train), ("test", args.n_test)):
        if n == 0:  # asked for no such split: no file, rather than an empty one
            continue
        if len(chosen[split]) < n:
            print(f"note: asked for {n} {split} images, only {len(chosen[split])} were available")
        os.makedirs(os.path.join(args.out, "images", split), exist_ok=True)
        rows = []
        for label, path in chosen[split]:
            cls, name = os.path.basename(os.path.dirname(path)), os.path.basename(path)
            options = [label] + rng.sample([c for c in labels if c != label], args.n_options - 1)
            rng.shuffle(options)
            image = f"images/{split}/" + common.safe_name(f"{cls}-{name}")
            shutil.copyfile(path, common.inside(args.out, image))
            rows.append(dict(id=f"caltech101-{split}-{cls}-{os.path.splitext(name)[0]}", task="image_heavy",
                             image=image, question=QUESTION, options=options, answer=options.index(label),
                             source="caltech101"))
        common.write_samples(os.path.join(args.out, f"{split}.jsonl"), rows, skipped[split])


if __name__ == "__main__":
    main()
