"""The sample file (docs/format.md, 'A sample'): load_samples() reads a JSONL file of samples and checks every
line, naming the file and line of what is wrong; decode=True also decodes every image up front, so that a bad one
stops a run before a model loads. perturb.py imports it (perturb.load_samples is this function).
"""
import hashlib
import json
import os
import string
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

TASKS = ("image_heavy", "text_heavy", "vqa")
LETTERS = string.ascii_uppercase
# each family's processor expands these into image slots, so in a question they would misplace the image
IMAGE_TOKENS = ("<image>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>")


class DataError(ValueError):
    """Bad input data; the message starts with "path:line: " and says what to do."""


def data_file(path, split):
    """A JSONL file, or a folder written by data/<name>/prepare.py: then its <split>.jsonl."""
    return str(Path(path) / f"{split}.jsonl") if Path(path).is_dir() else str(path)


def load_samples(path, *, image_root=None, decode=False):
    """The samples of a JSONL file, checked (docs/format.md, 'A sample'), image paths made absolute. An image path
    must stay inside the file's folder or image_root as written (no "..", no absolute path elsewhere);
    a symlink placed there by the user is followed, as a dataset on another disk often is. decode=True
    also decodes every distinct image once, so a bad one stops the run before a model loads."""
    folder, samples, first_line, images = Path(path).parent, [], {}, {}
    roots = [Path(os.path.abspath(r)) for r in [folder] + ([image_root] if image_root is not None else [])]
    with open(path, encoding="utf-8-sig") as f:  # -sig: a byte order mark some editors write is not JSON
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                sample = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON: {e} (write one JSON object per line)") from e
            _check(sample, folder, roots, lambda what: DataError(f"{path}:{lineno}: {what}"))
            if sample["id"] in first_line:
                raise DataError(f"{path}:{lineno}: duplicate id {sample['id']!r}, first on line "
                                f"{first_line[sample['id']]} (ids must be unique within a file)")
            first_line[sample["id"]] = lineno
            if sample["image"] is not None:
                images.setdefault(sample["image"], (lineno, sample["id"]))
            samples.append(sample)
    if not samples:
        raise DataError(f"{path}:1: no samples (the file needs at least one JSON object line)")
    if decode:
        _decode_all(path, images)
    return samples


def load_files(paths, decode=False):
    """[(path, its samples)] of several files (load_samples each), their ids unique across them too: an id seeds its
    sample's perturbations, so two samples sharing one would be perturbed alike."""
    loaded, first = [(path, load_samples(path, decode=decode)) for path in paths], {}
    for i, (path, part) in enumerate(loaded):
        for s in part:
            j, other = first.setdefault(s["id"], (i, path))
            if j != i:
                twice = " (the same file given twice)" * (other == path)
                raise DataError(f"{path}: id {s['id']!r} also appears in {other}{twice}: ids must be unique across "
                                f"the files (each seeds its sample's perturbations)")
    return loaded


def _decode_all(path, images):
    """images: {path: (line, id)} of each distinct image; every one is tried, so the error can say how many more
    are bad."""
    bad = undecodable(images)
    if bad:
        image, why = bad[0]
        lineno, sid = images[image]
        more = f"; {len(bad) - 1} more images are bad" if len(bad) > 1 else ""
        raise DataError(f"{path}:{lineno}: the image {image} of sample {sid!r} cannot be decoded: {why}{more} "
                        f"(replace the image or drop the sample)")


def undecodable(paths):
    """[(path, why)] of the images PIL cannot fully decode, in the order given. PIL releases the GIL while it
    decodes, so threads share the work."""
    paths = list(paths)
    with ThreadPoolExecutor(min(16, os.cpu_count() or 1) if len(paths) > 32 else 1) as pool:
        return [(image, why) for image, why in zip(paths, pool.map(unreadable, paths)) if why]


def sha256(path):
    """Hex digest of a file, read in chunks: what a resume compares to find its data unchanged."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _nonempty_str(x):
    return isinstance(x, str) and x.strip() != ""


def _check(s, folder, roots, err):
    """Validates one sample in place and makes its image path absolute; err(what) builds the error."""
    if not isinstance(s, dict):
        raise err(f"expected a JSON object, got {type(s).__name__} (write one sample object per line)")
    for key in ("id", "task", "image", "question", "options", "answer", "source"):
        if key not in s:
            raise err(f"missing key {key!r} (every sample needs id, task, image, question, options, answer, source)")
    for key in ("id", "question", "source"):
        if not _nonempty_str(s[key]):
            raise err(f"{key} must be a non-empty string, got {s[key]!r} (fix the {key} field)")
    if s["task"] not in TASKS:
        raise err(f"unknown task {s['task']!r} (task must be one of {', '.join(TASKS)})")
    opts, ans = s["options"], s["answer"]
    if opts is None:  # an instruction sample (LLaVA-Instruct): a free-form answer, trained on, never scored
        if s["task"] != "vqa" or not _nonempty_str(ans):
            raise err("options null needs task vqa and the answer text as a non-empty string (an instruction sample)")
    elif not (isinstance(opts, list) and 2 <= len(opts) <= len(LETTERS) and all(_nonempty_str(o) for o in opts)
              and len(set(opts)) == len(opts)):
        raise err(f"options {opts!r} are not 2 to {len(LETTERS)} distinct non-empty strings (fix the options list)")
    elif type(ans) is not int or not 0 <= ans < len(opts):
        raise err(f"answer {ans!r} is not among the {len(opts)} options (answer is a 0-based index into options)")
    texts = [("question", s["question"])] + [(f"option {i}", o) for i, o in enumerate(opts or [])]
    for where, text in texts:
        token = next((t for t in IMAGE_TOKENS if t in text), None)
        if token:
            raise err(f"sample {s['id']!r}: its {where} holds {token!r}, a model's image token (remove it from "
                      f"the text: the image field places the image)")
    if s["task"] == "text_heavy":
        if s["image"] is not None:
            raise err(f"text_heavy sample has image {s['image']!r} (set image to null; its image is random pixels)")
    elif not _nonempty_str(s["image"]):
        raise err(f"image {s['image']!r} is not a path (image paths are relative to the jsonl)")
    else:
        written = Path(os.path.normpath(os.path.join(roots[0], s["image"])))  # lexical: the text cannot escape
        if not any(written.is_relative_to(root) for root in roots):
            raise err(f"image {s['image']!r} is {str(written)!r}, outside {str(roots[0])!r} (keep images "
                      f"inside the data file's folder, or pass another allowed folder as image_root)")
        real = written.resolve()
        if not real.is_file():
            raise err(f"image {s['image']!r} is not a file in {str(folder)!r} (image paths are relative to the jsonl)")
        s["image"] = str(real)
    facts = s.get("facts")
    if facts is not None and opts is not None and not (isinstance(facts, dict) and all(
            k.isdigit() and str(int(k)) == k and int(k) < len(opts) and _nonempty_str(v) for k, v in facts.items())):
        raise err(f"bad facts {facts!r} (facts maps option indices \"0\" to \"{len(opts) - 1}\" to descriptions)")


def to_rgb(im):
    """im as 8-bit RGB. PIL's convert("RGB") clips 16- and 32-bit pixels at 255 (a white image), so these
    are scaled first: integer modes (I;16, I;16B, I) hold 16-bit values, v -> v >> 8; a float image (F)
    with values in 0..1 becomes int(v * 255), any other float image is read as 16-bit values too."""
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        a = np.nan_to_num(np.asarray(im, dtype=np.float64))
        a = a * 255 if im.mode == "F" and a.size and a.max() <= 1 else a / 256
        im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    return im.convert("RGB")


def unreadable(src):
    """Why PIL cannot fully decode the image at src (a path or file object), or None if it can."""
    try:
        with Image.open(src) as im:
            im.load()
        return None
    except Exception as e:  # OSError (garbage, truncated), SyntaxError, DecompressionBombError, struct.error...
        return f"{type(e).__name__}: {e}"
