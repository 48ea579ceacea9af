"""MMLU as text-heavy questions (image null), the four options in their fixed order.
Reads the original data/{auxiliary_train,dev,val,test}/*.csv or Hugging Face cais/mmlu parquet
(all/*.parquet or <subject>/*.parquet); auxiliary_train and dev -> train.jsonl, val -> validation.jsonl,
test -> test.jsonl. The answer may be a letter A-D or an index 0-3 (also as a string).
  python data/mmlu/prepare.py --src PATH [--out data/mmlu]
"""
import argparse
import collections
import csv
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from data import common  # noqa: E402  (data/common.py: safe names, paths under --out, the JSONL writer)

LETTERS = "ABCD"
SPLITS = {"auxiliary_train": "train", "train": "train", "dev": "train", "val": "validation",
          "validation": "validation", "test": "test"}


def find_files(src):
    """(split, subject or HF config, path) triples, sorted. In the HF layout all/ holds every subject, and the
    auxiliary_train split (no subject) is read from one folder only: older snapshots copy it into each."""
    found = []
    for folder, _, names in sorted(os.walk(src)):
        for name in sorted(names):
            path, parent = os.path.join(folder, name), os.path.basename(folder)
            if name.endswith(".csv") and parent in SPLITS:
                subject = name[:-4][: -len(parent) - 1] if name[:-4].endswith("_" + parent) else name[:-4]
                found.append((parent, subject, path))
            elif name.endswith(".parquet"):
                split = "auxiliary_train" if parent == "auxiliary_train" else name.split("-")[0]
                if split in SPLITS:
                    found.append((split, parent, path))
    parquet = [f for f in found if f[2].endswith(".parquet")]
    if parquet:
        configs = {config for _, config, _ in parquet}
        keep = {"all"} & configs or configs
        aux = sorted({c for split, c, _ in parquet if split == "auxiliary_train"},
                     key=lambda c: (c != "all", c != "auxiliary_train", c))[:1]
        found = [f for f in parquet if f[1] in (aux if f[0] == "auxiliary_train" else keep)]
    return found


def read_rows(path, subject):
    """(where, subject, question, choices, answer) for either layout."""
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            sys.exit(f"{path}: reading parquet needs pyarrow (pip install pyarrow), or use the original csv files")
        rows = (r for batch in pq.ParquetFile(path).iter_batches(batch_size=1024) for r in batch.to_pylist())
        for i, r in enumerate(rows):
            r = r.get("train", r) if "question" not in r else r  # the auxiliary_train config nests rows in "train"
            try:
                yield f"{path}: row {i}", r.get("subject") or "", r["question"], list(r["choices"]), r["answer"]
            except (KeyError, TypeError) as e:
                sys.exit(f"{path}: row {i}: missing {e} (expected columns question, choices, answer)")
        return
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        for row in reader:
            if len(row) != 6:
                sys.exit(f"{path}:{reader.line_num}: {len(row)} columns, expected 6 (question, A, B, C, D, answer)")
            yield f"{path}:{reader.line_num}", subject, row[0], row[1:5], row[5]


def answer_index(answer):
    text = str(answer).strip().upper()
    if len(text) == 1 and text in LETTERS:
        return LETTERS.index(text)
    return int(text) if text.isdigit() and int(text) < len(LETTERS) else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="the MMLU folder: the original data/ (or its parent) or cais/mmlu")
    p.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    args = p.parse_args(argv)
    if not os.path.isdir(args.src):
        sys.exit(f"{args.src}: no such folder (pass --src the downloaded MMLU folder)")
    files = find_files(args.src)
    if not files:
        sys.exit(f"{args.src}: no data/test/*_test.csv (original) or */test-*.parquet (Hugging Face) below "
                 f"this folder (pass --src the extracted MMLU folder)")
    rows, skipped = collections.defaultdict(list), collections.defaultdict(collections.Counter)
    for split, subject, path in files:
        split = SPLITS[split]
        for where, subj, question, choices, answer in read_rows(path, subject):
            index = answer_index(answer)
            if index is None:
                sys.exit(f"{where}: answer {answer!r} is not a letter A-D or an index 0-3 (fix or drop the row)")
            if len(choices) != len(LETTERS):
                sys.exit(f"{where}: {len(choices)} choices, expected 4 (fix or drop the row)")
            choices = [str(c).strip() if c is not None else "" for c in choices]
            if not str(question).strip():
                skipped[split]["empty question"] += 1
            elif not all(choices):
                skipped[split]["empty options"] += 1
            elif len(set(choices)) < len(choices):
                skipped[split]["duplicate options"] += 1
            else:
                rows[split].append(dict(id=f"mmlu-{split}-{len(rows[split]):06d}", task="text_heavy", image=None,
                                        question=str(question).strip(), options=choices, answer=index,
                                        source="mmlu", subject=subj))
    os.makedirs(args.out, exist_ok=True)
    for split in ("train", "validation", "test"):
        if split in rows or split in skipped:
            common.write_samples(os.path.join(args.out, f"{split}.jsonl"), rows[split], skipped[split])


if __name__ == "__main__":
    main()
