"""What the dataset converters (data/<name>/prepare.py) share and nothing else uses: safe file names from a
source's text, paths checked to stay under --out, the readable-image check, and the JSONL writer with its summary.
A converter puts the project root on sys.path and imports it as `from data import common`.
"""
import hashlib
import json
import os
import re
import sys

import perturb
import samples as S


def write_samples(path, samples, skipped=None):
    """Write samples as JSONL and say what a converter kept and skipped, and why ({reason: count}).
    Keeping nothing stops the converter (exit 1, no file written): an empty split is a wrong --src."""
    skipped = skipped or {}
    why = ", ".join(f"{n} {k}" for k, n in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])))
    summary = f"kept {len(samples)}, skipped {sum(skipped.values())}" + (f": {why}" if why else "")
    if not samples:
        sys.exit(f"error: {path}: {summary} (nothing to write; check --src and the converter's options)")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(s) + "\n" for s in samples)
    print(f"{path}: {summary}")


def readable_image(src):
    """Whether PIL can fully decode the image at src, a path or file object: a converter's check before it
    keeps a sample. A truncated or garbage file, or one over PIL's decompression-bomb limit, is not."""
    return S.unreadable(src) is None  # the very check load_samples(decode=True) makes


def safe_name(text, folders=False):
    """text from a dataset (a label, an index, a file name) as a file name that stays in the folder it is
    joined to; folders=True keeps "/" as folder separators, each part made safe. A part of letters, digits,
    _ - . (not leading .) is kept; any other has those characters replaced and a hash of the text added,
    so two different texts never share a name: "../x.png" -> "_x-1b2c3d4e.png"."""
    return "/".join(map(safe_name, str(text).split("/"))) if folders else _safe_part(str(text))


def _safe_part(part):
    if re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}", part):
        return part
    stem, ext = os.path.splitext(part)
    ext = ext if re.fullmatch(r"\.[A-Za-z0-9]{1,8}", ext) else ""
    digest = hashlib.sha256(part.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"{re.sub(r'[^A-Za-z0-9_-]+', '_', stem)[:60] or '_'}-{digest}{ext}"


def inside(out, path):
    """path, checked to stay under the folder out once joined and normalised: every path a converter writes
    goes through here. Lexical, not resolved, so an out/images that links to a bigger disk still works."""
    root = os.path.normpath(os.path.abspath(out))
    full = os.path.normpath(os.path.join(root, path))
    if os.path.commonpath([root, full]) != root:
        raise perturb.DataError(f"{path}: would be written outside {out} (a name from the source was not made "
                                f"safe: pass it through common.safe_name)")
    return full
