"""The paper's modality interventions (uf md rp ri fb fw): perturb(sample, name, rng) returns a perturbed copy of
a sample, e.g. perturb(s, "md", seed). INTERVENTIONS is the table a new intervention is added to. Used by
evaluate.py and train.py; the samples themselves are read and checked by samples.py.
"""
import functools
import hashlib
import itertools
import random
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

# the sample file's names, importable from here as before (docs/format.md: perturb.load_samples)
import samples as S
from samples import LETTERS, TASKS, DataError, load_samples, to_rgb  # noqa: F401

FACTS_FILE = Path(__file__).parent / "data" / "unrelated_facts.txt"

# Train and eval wordings differ so that a model fine-tuned on the train pool is evaluated on
# misleading descriptions it has never seen. "the" avoids a/an mistakes before any class name.
MD_TRAIN = ["This image shows the {wrong}.", "The {wrong} in this picture is clearly visible.",
            "Object in this photo: {wrong}.", "The picture was taken to show the {wrong}.",
            "Look closely: the main subject here is the {wrong}.", "Category of this image: {wrong}.",
            "Experts agree that this photo contains the {wrong}.", "What you see in the image is the {wrong}."]
MD_EVAL = ["The image depicts the {wrong}.", "This picture is a photograph of the {wrong}.",
           "Clearly, the object shown here is the {wrong}.", "Label of the pictured object: {wrong}."]


def _wh(size):
    return (size, size) if isinstance(size, int) else tuple(size)


def load_image(sample, size=336):
    """size only shapes the random pixels of a text-heavy sample: real images keep theirs for the processor."""
    image = sample["image"]
    if image is None:
        return random_pixels(sample["id"], size)
    if isinstance(image, Image.Image):
        return to_rgb(image)
    try:
        with Image.open(image) as im:
            return to_rgb(im)
    except Exception as e:  # PIL raises many kinds on a bad file: OSError, SyntaxError, DecompressionBombError
        raise DataError(f"{image}: cannot read the image of sample {sample['id']!r}: {e} "
                        f"(replace the file or drop the sample)") from e


def random_pixels(key, size):
    # hashlib, not hash(): str hashes are salted per process, and every rank and run needs the same RP
    seed = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")
    w, h = _wh(size)
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def canvas(value, size):
    if not 0 <= value <= 255:
        raise ValueError(f"canvas value {value} must be in 0..255")
    return Image.new("RGB", _wh(size), (value, value, value))


def _check_pool(pool):
    if pool not in ("train", "eval"):
        raise ValueError(f"pool must be 'train' or 'eval', got {pool!r}")


@functools.lru_cache(maxsize=1)
def _facts_split():
    lines = [l.strip() for l in FACTS_FILE.read_text(encoding="utf-8").splitlines() if l.strip()]
    order = list(range(len(lines)))
    random.Random(0).shuffle(order)
    n_eval = len(lines) // 5
    return ([lines[i] for i in sorted(order[n_eval:])], [lines[i] for i in sorted(order[:n_eval])])


def read_facts(path):
    """The UF facts of a user's file (--facts-file): one a line, blank lines skipped. Used whole by both
    pools (the built-in file is split into a train and an eval pool)."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            facts = [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the facts file: {e} (pass a UTF-8 text file, one fact a line)") from e
    if not facts:
        raise DataError(f"{path}: no facts (the file needs at least one non-empty line, one fact a line)")
    return facts


def unrelated_facts(pool="eval"):
    """Sentences of data/unrelated_facts.txt for UF. The split is fixed: the line indices are
    shuffled with random.Random(0); the first len // 5 (20%) form the "eval" pool and the rest
    (80%) the "train" pool, each kept in file order."""
    _check_pool(pool)
    train, eval_ = _facts_split()
    return list(eval_ if pool == "eval" else train)


def md_templates(pool="eval"):
    _check_pool(pool)
    return list(MD_EVAL if pool == "eval" else MD_TRAIN)


def mentions(text, phrases):
    """Whole-word, case-insensitive; an optional plural s/es also counts, since "cats" names a cat."""
    words = [r"\s+".join(map(re.escape, p.split())) for p in phrases]
    return re.search(rf"(?<!\w)(?:{'|'.join(words)})(?:e?s)?(?!\w)", text, re.IGNORECASE) is not None


def render(sample):
    if sample["options"] is None:
        return sample["question"]
    options = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(sample["options"]))
    return f"{sample['question']}\n{options}\nAnswer with the option's letter from the given choices directly."


def interventions_for(task):
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (one of {', '.join(TASKS)})")
    return [name for name, row in INTERVENTIONS.items() if task in row.tasks]


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def ri_pool(samples=None, folder=None):
    """The real images RI draws from: those under `folder` (--ri-folder: they replace the data's), or else the
    image-heavy images of `samples` (which load_samples decoded). A folder's images are decoded here, so a bad one
    stops a run before a model loads, with its path."""
    if folder is None:
        paths = {str(Path(s["image"]).resolve()) for s in samples or () if s["task"] == "image_heavy"}
        if not paths:
            raise DataError("ri: no image-heavy images in the data (pass a folder of images, --ri-folder)")
        return sorted(paths)
    if not Path(folder).is_dir():
        raise DataError(f"{folder}: no such folder (--ri-folder takes a folder of images)")
    paths = sorted({str(p.resolve()) for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                    and p.is_file()})
    if not paths:
        raise DataError(f"{folder}: no images ({' '.join(IMAGE_SUFFIXES)}) in it (--ri-folder takes a folder of "
                        f"images)")
    bad = S.undecodable(paths)
    if bad:
        more = f"; {len(bad) - 1} more are bad" if len(bad) > 1 else ""
        raise DataError(f"{bad[0][0]}: an image of --ri-folder {folder} cannot be decoded: {bad[0][1]}{more} "
                        f"(replace it or remove it from the folder)")
    return paths


def _new(sample, **changes):
    # options is copied too, so that editing the result can never reach back into the input
    return {**sample, "options": None if sample["options"] is None else list(sample["options"]), **changes}


class Options(NamedTuple):
    """What an intervention draws from, as perturb() takes it (see there)."""
    size: object = 336
    pool: str = "eval"
    ri_images: object = None
    k: int = 10
    facts: object = None
    replace: bool = False


def _orig(sample, rng, o):
    """Also rp: the default image of a text-heavy sample is random pixels."""
    if sample["task"] == "text_heavy":
        return _new(sample, image=random_pixels(sample["id"], o.size))
    return _new(sample)


def _uf(sample, rng, o):
    facts = unrelated_facts(o.pool) if o.facts is None else o.facts
    candidates = [f for f in facts if not mentions(f, sample["options"])]
    if o.k < 1:
        raise ValueError(f"uf needs k >= 1 facts, got k={o.k} (sample {sample['id']!r})")
    if not candidates or (o.k > len(candidates) and not o.replace):  # with replacement one fact is enough
        need = "a fact that mentions" if o.replace else f"{o.k} facts that mention"
        raise ValueError(f"uf needs {need} no option of sample {sample['id']!r}, has {len(candidates)} (add facts"
                         f"{'' if o.replace else ', lower k or draw them with replacement'})")
    drawn = rng.choices(candidates, k=o.k) if o.replace else rng.sample(candidates, o.k)
    return _new(sample, question=" ".join(drawn) + " " + sample["question"])


def _uf_longest(sample, facts, k, pool, replace):
    """With the first k of `facts` (longest first) that name no option, or with replace=True the first one k times."""
    usable = (f for f in facts if not mentions(f, sample["options"]))
    chosen = list(itertools.islice(usable, 1)) * k if replace else list(itertools.islice(usable, max(k, 0)))
    if not 1 <= k == len(chosen):  # raises its error: too few facts, or k < 1
        _uf(sample, random.Random(0), Options(pool=pool, k=k, facts=facts, replace=replace))
    return " ".join(chosen) + " " + sample["question"]


def _md_texts(sample, wrong, templates):
    """[(option, text)] MD may prepend, in the order it tries them: wrong options in the order of `wrong`. A
    prewritten description beats a template, so the draw is among the wrong options that have a usable one; any
    text that names the right option (right "cat", wrong "cat food") would make MD a hint, not a lie."""
    right, facts = [sample["options"][sample["answer"]]], sample.get("facts") or {}
    described = [(i, d) for i in wrong if (d := facts.get(str(i))) and not mentions(d, right)]
    texts = described or [(i, text) for i in wrong for t in templates
                          if not mentions(text := t.format(wrong=sample["options"][i]), right)]
    if not texts:
        raise ValueError(f"md: every wrong option of sample {sample['id']!r} would name the answer "
                         f"{right[0]!r} (reword the options or skip md for this sample)")
    return texts


def _md(sample, rng, o):
    wrong = [i for i in range(len(sample["options"])) if i != sample["answer"]]
    rng.shuffle(wrong)
    templates = md_templates(o.pool)
    rng.shuffle(templates)
    i, text = _md_texts(sample, wrong, templates)[0]
    return _new(sample, question=text + " " + sample["question"], md_option=i)


def _md_longest(sample, facts, k, pool, replace):
    """The longest text _md can choose, over every order its draw can take."""
    wrong = [i for i in range(len(sample["options"])) if i != sample["answer"]]
    return max((text for _, text in _md_texts(sample, wrong, md_templates(pool))), key=len) + " " + sample["question"]


def _ri(sample, rng, o):
    if not o.ri_images:
        raise ValueError("ri needs ri_images, a non-empty list of image paths unrelated to the questions "
                         "(e.g. ri_pool(samples) for the image-heavy images of the data, or ri_pool(folder=...))")
    return _new(sample, image=rng.choice(list(o.ri_images)))


def _canvas(sample, rng, o, *, value):
    return _new(sample, image=canvas(value, o.size))


# One row per intervention, the one place a variant plugs in: perturb, longest, interventions_for, twins and
# APPLIES read it, and its order is evaluate's order and the one training's random.choice draws a twin from.
# apply(sample, rng, Options): the perturbed copy. tasks: those it applies to. twin: training may draw it as a
# twin (orig is the original itself, rp a text-heavy original's own pixels). longest(sample, facts, k, pool,
# replace): the longest question it can give, for the --max-length check; None where the text stays.
class Intervention(NamedTuple):
    apply: object
    tasks: tuple
    twin: bool
    longest: object

    def __call__(self, sample, rng, options=Options()):  # a row is its function too, as docs/format.md says
        return self.apply(sample, rng, options)


INTERVENTIONS = {"orig": Intervention(_orig, TASKS, False, None),
                 "uf": Intervention(_uf, ("image_heavy",), True, _uf_longest),
                 "md": Intervention(_md, ("image_heavy",), True, _md_longest),
                 "rp": Intervention(_orig, ("text_heavy",), False, None),
                 "ri": Intervention(_ri, ("text_heavy",), True, None),
                 "fb": Intervention(functools.partial(_canvas, value=0), ("text_heavy",), True, None),
                 "fw": Intervention(functools.partial(_canvas, value=255), ("text_heavy",), True, None)}
APPLIES = {name: row.tasks for name, row in INTERVENTIONS.items()}  # the tasks column, as evaluate/diagnose read it

# evaluate.py --attack-eps (attack.py): worst-case rows named by their L-inf radius, "attack@0.01" (:g), or with
# --attack-scale std by the radius as a share of each row's embedding std, "attack@0.5std", on the tasks that have a
# task-irrelevant modality. diagnose.py reads them as interventions by the three rules below.
ATTACK, ATTACKED, STD = "attack@", ("image_heavy", "text_heavy"), "std"


def attack_radius(name):
    """The radius an attack row's name spells ("attack@0.01" -> 0.01, "attack@0.5std" -> 0.5), or None for any other
    name: a radius that is not positive, or not written as f"{eps:g}" (one radius, one name)."""
    scale = attack_scale(name)
    try:
        eps = float(name[len(ATTACK):len(name) - len(STD) * (scale == STD)]) if scale else None
    except ValueError:
        return None
    return eps if eps is not None and eps > 0 and attack_name(eps, scale) == name else None


def attack_scale(name):
    """"std" for an attack name relative to the embeddings' std, "none" for an absolute one, else None."""
    return None if not name.startswith(ATTACK) else STD if name.endswith(STD) else "none"


def attack_name(eps, scale="none"):
    return f"{ATTACK}{eps:g}" + (STD if scale == STD else "")


def applies(name):
    """The tasks an intervention or attack name applies to (none for an unknown name)."""
    return APPLIES.get(name) or (ATTACKED if attack_radius(name) is not None else ())


def ordered(names):
    """Intervention names in evaluate's order: APPLIES's, then the attacks by radius; unknown names left out."""
    return [n for n in APPLIES if n in names] + sorted((n for n in set(names) if attack_radius(n)), key=attack_radius)


def twins():
    """{task: the interventions training may draw as its samples' twins}, in table order (dataloader.TWINS)."""
    by_task = {t: tuple(n for n, row in INTERVENTIONS.items() if row.twin and t in row.tasks) for t in TASKS}
    return {t: names for t, names in by_task.items() if names}


def longest(sample, name, facts=None, k=10, pool="train", replace=False):
    """sample with the longest question intervention `name` can give it (its row's bound), a draw it can make; UF
    takes `facts` longest first (e.g. in tokens). What train.py measures against --max-length before the model
    loads; the intervention's own error where it would fail."""
    bound = INTERVENTIONS[name].longest if name in INTERVENTIONS else None
    if bound is None:  # never another intervention's bound: a wrong bound would pass rows that do not fit
        why = "has no longest-row bound (its text stays)" if name in INTERVENTIONS else "is unknown"
        raise ValueError(f"intervention {name!r} {why}; those with a bound: "
                         f"{', '.join(n for n, row in INTERVENTIONS.items() if row.longest)}")
    return _new(sample, question=bound(sample, facts, k, pool, replace))


def perturb(sample, name, rng, *, size=336, pool="eval", ri_images=None, k=10, facts=None, replace=False):
    """A new sample with intervention=name. rng: random.Random or seed; size: the side (or (w, h)) of the
    fb/fw canvases and of a text-heavy sample's random pixels (orig, rp); pool: which facts and md wordings
    ("train" or "eval"); ri_images: paths ri draws from; k: number of uf facts; facts: uf's sentences
    instead of the built-in pool's (e.g. read_facts(path), used whole whatever the pool); replace: draw the
    k facts with replacement (as the authors do), so k may exceed their number."""
    if name not in INTERVENTIONS:
        raise ValueError(f"unknown intervention {name!r} (choose from {', '.join(INTERVENTIONS)})")
    if sample["task"] not in INTERVENTIONS[name].tasks:
        raise ValueError(f"intervention {name!r} does not apply to task {sample['task']!r} "
                         f"(it applies to {', '.join(INTERVENTIONS[name].tasks)})")
    _check_pool(pool)
    rng = rng if isinstance(rng, random.Random) else random.Random(rng)
    options = Options(size, pool, ri_images, k, None if facts is None else list(facts), replace)
    return {**INTERVENTIONS[name].apply(sample, rng, options), "intervention": name}
