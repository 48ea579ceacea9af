"""OpenBookQA as text-heavy questions (image null), options in the source's label order (A-D).
Reads the original Main/{train,dev,test}.jsonl or Hugging Face allenai/openbookqa main/*.parquet;
train -> train.jsonl, dev/validation -> validation.jsonl, test -> test.jsonl.
  python data/openbookqa/prepare.py --src PATH [--out data/openbookqa]
"""
import argparse
import collections
import json
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from data import common  # noqa: E402  (data/common.py: safe names, paths under --out, the JSONL writer)

SPLITS = {"train": "train", "dev": "validation", "validation": "validation", "test": "test"}
FILE = re.compile(r"^(train|dev|validation|test)([-.][^/]*)?\.(jsonl|parquet)$")


def find_files(src):
    """(split, path) pairs. The first folder that has split files wins, so the HF repo's additional/
    (the same questions with extra columns) is not read twice."""
    if os.path.isfile(src):
        if not FILE.match(os.path.basename(src)):
            sys.exit(f"{src}: not a train/dev/validation/test .jsonl or .parquet file (pass the file or its folder)")
        return [(SPLITS[FILE.match(os.path.basename(src)).group(1)], src)]
    for folder in ("main", "Main", os.path.join("Data", "Main"),
                   os.path.join("OpenBookQA-V1-Sep2018", "Data", "Main"), ""):
        folder = os.path.join(src, folder)
        names = sorted(f for f in os.listdir(folder) if FILE.match(f)) if os.path.isdir(folder) else []
        if names:
            return [(SPLITS[FILE.match(f).group(1)], os.path.join(folder, f)) for f in names]
    sys.exit(f"{src}: no Main/train.jsonl (original) or main/train-*.parquet (Hugging Face) here "
             f"(pass --src the downloaded OpenBookQA folder)")


def read_rows(path):
    """(where, id, stem, labels, texts, answerKey) for either layout."""
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            sys.exit(f"{path}: reading parquet needs pyarrow (pip install pyarrow), or use the original jsonl files")
        rows = (r for batch in pq.ParquetFile(path).iter_batches(batch_size=1024) for r in batch.to_pylist())
        for i, r in enumerate(rows):
            try:
                choices = r["choices"]
                yield f"{path}: row {i}", r["id"], r["question_stem"], choices["label"], choices["text"], r["answerKey"]
            except (KeyError, TypeError) as e:
                sys.exit(f"{path}: row {i}: missing {e} (expected columns id, question_stem, choices, answerKey)")
        return
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                q = r["question"]
                yield (f"{path}:{lineno}", r["id"], q["stem"], [c["label"] for c in q["choices"]],
                       [c["text"] for c in q["choices"]], r["answerKey"])
            except json.JSONDecodeError as e:
                sys.exit(f"{path}:{lineno}: malformed JSON: {e} (re-download the file)")
            except (KeyError, TypeError) as e:
                sys.exit(f"{path}:{lineno}: missing {e} (expected id, question.stem, question.choices, answerKey)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="the OpenBookQA folder (original or Hugging Face), or one split file")
    p.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    args = p.parse_args(argv)
    if not os.path.exists(args.src):
        sys.exit(f"{args.src}: no such file or folder (pass --src the downloaded OpenBookQA folder)")
    by_split = collections.defaultdict(list)
    for split, path in find_files(args.src):
        by_split[split].append(path)
    os.makedirs(args.out, exist_ok=True)
    for split, paths in by_split.items():
        rows, skipped = [], collections.Counter()
        for path in paths:
            for where, id_, stem, labels, texts, key in read_rows(path):
                if key not in labels:
                    sys.exit(f"{where}: answerKey {key!r} is not among the labels {labels} (fix or drop the row)")
                texts = [str(t).strip() if t is not None else "" for t in texts]
                if not str(stem or "").strip():
                    skipped["empty question"] += 1
                elif len(texts) < 2 or not all(texts):
                    skipped["empty options"] += 1
                elif len(set(texts)) < len(texts):
                    skipped["duplicate options"] += 1
                else:
                    rows.append(dict(id=f"openbookqa-{split}-{id_}", task="text_heavy", image=None,
                                     question=stem.strip(), options=texts, answer=labels.index(key),
                                     source="openbookqa"))
        common.write_samples(os.path.join(args.out, f"{split}.jsonl"), rows, skipped)


if __name__ == "__main__":
    main()
