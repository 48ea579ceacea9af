"""The toy world: coloured shapes on 32 px images, with image-heavy questions (which shape?), text-heavy
questions (small sums, with the random-pixel image) and VQA questions (which colour?), deterministic
from a seed. Train and test splits share no ids, and it writes vocab.txt for a word-level tokenizer.
  python data/toy/prepare.py [--out data/toy --n-train 3000 --n-test 300 --seed 0]
"""
import argparse
import json
import os
import random
import re
import sys

from PIL import Image, ImageDraw

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import perturb  # noqa: E402  (the project root, for the UF/MD wordings that go into the vocabulary)

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 230), "yellow": (235, 215, 40),
          "purple": (150, 60, 190), "orange": (245, 140, 30)}
SHAPES = ["circle", "square", "triangle", "diamond", "cross", "bar"]
SIZE = 32


def draw(shape, color, rng):
    """One shape, jittered in place and size, on a grey background with a little noise."""
    bg = tuple(rng.randint(150, 200) for _ in range(3))
    im = Image.new("RGB", (SIZE, SIZE), bg)
    d = ImageDraw.Draw(im)
    r = rng.randint(8, 12)
    cx, cy = rng.randint(r + 1, SIZE - r - 2), rng.randint(r + 1, SIZE - r - 2)
    box = [cx - r, cy - r, cx + r, cy + r]
    fill = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in COLORS[color])
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    elif shape == "cross":
        w = r // 3
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
    else:  # a horizontal bar
        d.rectangle([cx - r, cy - r // 3, cx + r, cy + r // 3], fill=fill)
    return im


def options(right, pool, n, rng):
    """n options containing `right`, in random order; returns (options, answer index)."""
    opts = [right] + rng.sample([p for p in pool if p != right], n - 1)
    rng.shuffle(opts)
    return opts, opts.index(right)


def make(split, n, rng, out, true_caption, caption_rate):
    """n samples of each task for one split."""
    os.makedirs(os.path.join(out, "images", split), exist_ok=True)
    rows = []
    for i in range(n):
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        image = f"images/{split}/{i:05d}.png"
        draw(shape, color, rng).save(os.path.join(out, image))
        opts, answer = options(shape, SHAPES, 4, rng)
        question = "What is the main object in the image ?"
        if rng.random() < caption_rate:  # a caption, as real instruction data has: (almost) always true
            said = shape if rng.random() < true_caption else rng.choice([o for o in opts if o != shape])
            question = f"A photo of a {color} {said} . " + question
        rows.append(dict(id=f"toy-{split}-img-{i:05d}", task="image_heavy", image=image, question=question,
                         options=opts, answer=answer, source="toy-shapes"))
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        opts, answer = options(str(a + b), [str(k) for k in range(19)], 4, rng)
        rows.append(dict(id=f"toy-{split}-txt-{i:05d}", task="text_heavy", image=None,
                         question=f"What is {a} plus {b} ?", options=opts, answer=answer, source="toy-sums"))
        opts, answer = options(color, list(COLORS), 4, rng)
        rows.append(dict(id=f"toy-{split}-vqa-{i:05d}", task="vqa", image=image,
                         question=f"What color is the {shape} ?", options=opts, answer=answer, source="toy-colors"))
    with open(os.path.join(out, f"{split}.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


def vocabulary(rows):
    """Every word the model can meet: the data, the prompt, and both pools of UF facts and MD wordings."""
    texts = [perturb.render(r) for r in rows] + perturb.unrelated_facts("train") + perturb.unrelated_facts("eval")
    texts += perturb.md_templates("train") + perturb.md_templates("eval") + SHAPES + list(COLORS)
    words = set()
    for t in texts:
        words.update(re.findall(r"\w+|[^\w\s]", t))
    return sorted(words)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--n-train", type=int, default=3000, help="samples per task in train")
    p.add_argument("--n-test", type=int, default=300, help="samples per task in test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--true-caption", type=float, default=0.98, help="how often a train caption is true")
    p.add_argument("--caption-rate", type=float, default=0.5, help="share of train image questions with a caption")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    train = make("train", args.n_train, rng, args.out, args.true_caption, args.caption_rate)
    test = make("test", args.n_test, rng, args.out, 1.0, 0.0)  # clean test questions: MD brings the lie
    words = vocabulary(train + test)
    with open(os.path.join(args.out, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(words) + "\n")
    print(f"wrote {len(train)} train and {len(test)} test samples ({args.n_train}/{args.n_test} per task) "
          f"and {len(words)} words to {args.out}")


if __name__ == "__main__":
    main()
