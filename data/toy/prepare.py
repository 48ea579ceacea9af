"""The toy world: coloured patterns on 32 px images. Image-heavy questions ask which pattern is shown
(the image decides). Text-heavy questions come in the paper's two kinds, shown with random pixels:
half state the colour they ask, as OpenBookQA gives its fact ("The stripes are red . What color are the
stripes ?"), half ask what the model knows, as MMLU does ("What color are the lemons ?": every thing
has one colour, learnt from the training data and asked again in test). VQA questions ask the colour
of the pattern shown (the image decides). Deterministic from a seed; train and test share no ids;
writes vocab.txt for a word-level tokenizer.
  python data/toy/prepare.py [--out data/toy --n-train 2000 --n-test 300 --seed 0]
"""
import argparse
import json
import os
import random
import re
import sys

from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import perturb  # noqa: E402  (the project root: UF/MD wordings, which the vocabulary must cover)

# Options come in a fixed order, so a letter names a class: a small model trained from scratch
# learns "image -> letter" in a few hundred steps, where a shuffled order needs a two-hop lookup
# (find the matching option, then its letter) that stays at chance for thousands of steps.
SHAPES = ["stripes", "columns", "checks", "dots"]
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 230), "yellow": (235, 215, 40)}
SIZE = 32
# What the model knows: the colour of 60 things. Asked in the words of a VQA question, these are the
# text questions that RI and FB disturb in the vanilla model, which never saw one beside a real picture:
# what it learnt from VQA (read the colour off the image) then speaks up. Stated colours are copied and
# rarely move.
KNOWN = {"red": "tomatoes strawberries cherries rubies lobsters ladybugs bricks raspberries roses radishes "
                "cranberries chillies poppies cardinals embers".split(),
         "green": "leaves frogs limes cucumbers emeralds peas lettuces ferns pickles olives kiwis avocados "
                  "caterpillars cacti clovers".split(),
         "blue": "skies seas sapphires blueberries oceans jeans bluebirds lagoons cornflowers glaciers bluebells "
                 "lakes jays whales veins".split(),
         "yellow": "bananas lemons suns yolks canaries daffodils sunflowers chicks dandelions taxis buttercups "
                   "mustards cheeses pineapples lemonades".split()}


def draw(shape, color, rng):
    """A patch of one pattern in one colour, jittered in place and size, on a grey background. Patterns
    are visible inside every 8 px patch, and the gaps are a dark shade of the colour, so that the pattern is
    a contrast of the same sign whatever the colour: a linear patch embedding sees it at once. (With grey
    gaps, yellow on grey is brighter in some channels and darker in others, and whether a vanilla model
    learnt to see patterns at all was a coin toss of the seed: 1 in 2 read the caption and memorised
    the rest.)"""
    im = Image.new("RGB", (SIZE, SIZE), (160, 160, 160))
    px = im.load()
    side = rng.randint(18, 28)
    x0, y0 = rng.randint(0, SIZE - side), rng.randint(0, SIZE - side)
    fill = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLORS[color])
    on = {"stripes": lambda x, y: y % 4 < 2, "columns": lambda x, y: x % 4 < 2,
          "checks": lambda x, y: (x // 2 + y // 2) % 2 == 0, "dots": lambda x, y: x % 4 == 0 and y % 4 == 0}[shape]
    dark = tuple(c // 4 for c in fill)
    for y in range(y0, y0 + side):
        for x in range(x0, x0 + side):
            px[x, y] = fill if on(x, y) else dark
    return im


def make(split, n, rng, out, caption_rate, true_caption):
    """n samples of each task. Train image questions sometimes carry a caption in the wordings MD
    uses for training; as in real instruction data, the caption is (almost) always true, so a model
    trained the vanilla way learns to trust it."""
    os.makedirs(os.path.join(out, "images", split), exist_ok=True)
    colors, rows = list(COLORS), []
    for i in range(n):
        shape, color = rng.choice(SHAPES), rng.choice(colors)
        image = f"images/{split}/{i:05d}.png"
        draw(shape, color, rng).save(os.path.join(out, image))
        question = "What pattern is in the image ?"
        if rng.random() < caption_rate:
            said = shape if rng.random() < true_caption else rng.choice([s for s in SHAPES if s != shape])
            question = rng.choice(perturb.md_templates("train")).format(wrong=said) + " " + question
        rows.append(dict(id=f"toy-{split}-img-{i:05d}", task="image_heavy", image=image, question=question,
                         options=SHAPES, answer=SHAPES.index(shape), source="toy-shapes"))
        said = rng.choice(colors)  # both kinds end exactly like a VQA question
        if rng.random() < 0.5:
            thing = rng.choice(SHAPES)
            question, source = f"The {thing} are {said} . What color are the {thing} ?", "toy-stated"
        else:
            question, source = f"What color are the {rng.choice(KNOWN[said])} ?", "toy-known"
        rows.append(dict(id=f"toy-{split}-txt-{i:05d}", task="text_heavy", image=None, question=question,
                         options=colors, answer=colors.index(said), source=source))
        rows.append(dict(id=f"toy-{split}-vqa-{i:05d}", task="vqa", image=image,
                         question=f"What color are the {shape} ?", options=colors, answer=colors.index(color),
                         source="toy-colors"))
    with open(os.path.join(out, f"{split}.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


def vocabulary(rows):
    """Every word the model can meet: the data, the prompt, and both pools of UF facts and MD wordings."""
    texts = [perturb.render(r) for r in rows] + perturb.unrelated_facts("train") + perturb.unrelated_facts("eval")
    texts += perturb.md_templates("train") + perturb.md_templates("eval") + SHAPES + list(COLORS)
    texts += [t for things in KNOWN.values() for t in things]
    words = set()
    for t in texts:
        words.update(re.findall(r"\w+|[^\w\s]", t))
    return sorted(words)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--n-train", type=int, default=2000, help="samples per task in train")
    p.add_argument("--n-test", type=int, default=300, help="samples per task in test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--caption-rate", type=float, default=0.8, help="share of train image questions with a caption")
    p.add_argument("--true-caption", type=float, default=1.0, help="how often a train caption is true")
    args = p.parse_args(argv)
    if not (0 <= args.caption_rate <= 1 and 0 <= args.true_caption <= 1) or min(args.n_train, args.n_test) < 1:
        p.error("--caption-rate and --true-caption are shares (0 to 1); --n-train and --n-test at least 1")
    rng = random.Random(args.seed)
    train = make("train", args.n_train, rng, args.out, args.caption_rate, args.true_caption)
    test = make("test", args.n_test, rng, args.out, 0.0, 1.0)  # clean image questions: MD brings the lie
    words = vocabulary(train + test)
    with open(os.path.join(args.out, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(words) + "\n")
    print(f"wrote {len(train)} train and {len(test)} test samples ({args.n_train}/{args.n_test} per task) "
          f"and {len(words)} words to {args.out}")


if __name__ == "__main__":
    main()
