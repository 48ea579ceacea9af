"""Tests of the dataset converters (data/<name>/prepare.py): fixtures in each source's published
layout, run as a user runs them, and the JSONL they write.
Run all tests: python -m pytest -q test_*.py
"""
import base64
import csv
import io
import json
import os
import subprocess
import sys
import zlib

import pytest
from PIL import Image

import perturb
from data import common

HERE = os.path.dirname(os.path.abspath(__file__))


# ---- dataset converters ---------------------------------------------------------------------------------

def _photo(path, color=(10, 20, 30)):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)
    return path


def _png_bytes(color=(200, 0, 0)):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def _run(name, *args, ok=True):
    res = subprocess.run([sys.executable, f"data/{name}/prepare.py", *map(str, args)], cwd=HERE,
                         capture_output=True, text=True)
    if ok:
        assert res.returncode == 0, res.stderr
    return res


def _read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _bytes(path):
    with open(path, "rb") as f:
        return f.read()


def _write_json(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)
    return path


def _write_parquet(path, rows):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.mark.parametrize("name,extra", [
    ("miniimagenet", []), ("caltech101", []), ("openbookqa", []), ("mmlu", []), ("scienceqa", []),
    ("mmbench", []), ("seedbench", []), ("llava_instruct", []), ("authors", ["--task", "vqa"])])
def test_every_converter_names_a_missing_src(tmp_path, name, extra):
    missing = tmp_path / "not-downloaded"
    res = _run(name, "--src", missing, "--out", tmp_path / "out", *extra, ok=False)
    assert res.returncode != 0 and str(missing) in res.stderr and "Traceback" not in res.stderr


# ---- image-heavy ---------------------------------------------------------------------------------------

def _miniimagenet(root):
    layout = {"train": ["n01", "n02"], "val": ["n03"], "test": ["n04", "n05"]}
    for split, classes in layout.items():
        for k, cls in enumerate(classes):
            for i in range(3):
                _photo(str(root / split / cls / f"{cls}{i:08d}.jpg"), (k * 40, i * 60, 90))
    (root / "train" / "n01" / "notes.txt").write_text("not an image")
    names = root / "names.txt"
    names.write_text("n01 tench, Tinca tinca\nn02,goldfish\nn03 great white shark\nn04 jay\nn05 house finch\n")
    return {"n01": "tench", "n02": "goldfish", "n03": "great white shark", "n04": "jay", "n05": "house finch"}


def test_miniimagenet_samples_disjoint_splits_with_named_options_deterministically(tmp_path):
    names = _miniimagenet(tmp_path / "src")
    args = ["--src", tmp_path / "src", "--names", tmp_path / "src" / "names.txt", "--n-train", 8, "--n-test", 4]
    res = _run("miniimagenet", *args, "--out", tmp_path / "a")
    _run("miniimagenet", *args, "--out", tmp_path / "b")
    assert "found 15 images of 5 classes" in res.stdout and "ignored 1 non-image files" in res.stdout
    for split, n in (("train", 8), ("test", 4)):
        assert _bytes(tmp_path / "a" / f"{split}.jsonl") == _bytes(tmp_path / "b" / f"{split}.jsonl")
        rows = _read(tmp_path / "a" / f"{split}.jsonl")
        assert len(rows) == n and f"kept {n}, skipped 0" in res.stdout
        for r in rows:
            cls = r["id"].split("-")[2]
            assert r["id"].startswith(f"miniimagenet-{split}-n0") and r["task"] == "image_heavy"
            assert r["question"] == "What is the main object in the image?" and r["source"] == "miniimagenet"
            assert len(r["options"]) == 4 == len(set(r["options"])) and set(r["options"]) <= set(names.values())
            assert r["options"][r["answer"]] == names[cls]
            assert (tmp_path / "a" / r["image"]).is_file() and r["image"].startswith(f"images/{split}/")
        assert len(perturb.load_samples(tmp_path / "a" / f"{split}.jsonl")) == n
    train, test = (_read(tmp_path / "a" / f"{s}.jsonl") for s in ("train", "test"))
    assert not {r["id"].split("-", 2)[2] for r in train} & {r["id"].split("-", 2)[2] for r in test}
    answers = [r["answer"] for r in train + test]
    assert len(set(answers)) > 1  # shuffled, not always in first place


def test_miniimagenet_csv_layout_reports_missing_image_and_folder_names(tmp_path):
    src = tmp_path / "src"
    for i, cls in enumerate(["golden_retriever", "tank", "lion", "ant", "dome"]):
        _photo(str(src / "images" / f"{cls}{i}.jpg"), (i * 50, 0, 0))
    (src / "train.csv").write_text("filename,label\n" + "".join(
        f"{c}{i}.jpg,{c}\n" for i, c in enumerate(["golden_retriever", "tank", "lion", "ant", "dome"]))
        + "gone.jpg,tank\n")
    res = _run("miniimagenet", "--src", src, "--out", tmp_path / "out", "--n-train", 10, "--n-test", 0)
    rows = _read(tmp_path / "out" / "train.jsonl")
    assert len(rows) == 5 and "kept 5, skipped 1: 1 missing image" in res.stdout and "only 5 were left" in res.stdout
    assert "golden retriever" in {o for r in rows for o in r["options"]}


def test_caltech_ignores_background_and_holds_out_per_class(tmp_path):
    root = tmp_path / "caltech" / "101_ObjectCategories"
    classes = ["accordion", "car_side", "Faces", "panda", "yin_yang"]
    for k, cls in enumerate(classes + ["BACKGROUND_Google"]):
        for i in range(1, 7):
            _photo(str(root / cls / f"image_{i:04d}.jpg"), (k * 40, i * 30, 0))
    args = ["--n-train", 100, "--n-test", 10]
    res = _run("caltech101", "--src", tmp_path / "caltech", "--out", tmp_path / "a", *args)
    _run("caltech101", "--src", root, "--out", tmp_path / "b", *args)
    assert "found 30 images of 5 classes" in res.stdout and "only 20 were available" in res.stdout
    labels = {c.replace("_", " ") for c in classes}
    for split, n in (("train", 20), ("test", 10)):
        assert _bytes(tmp_path / "a" / f"{split}.jsonl") == _bytes(tmp_path / "b" / f"{split}.jsonl")
        rows = perturb.load_samples(tmp_path / "a" / f"{split}.jsonl")
        assert len(rows) == n
        for r in rows:
            assert "BACKGROUND" not in r["id"] and set(r["options"]) <= labels and len(r["options"]) == 4
            assert r["options"][r["answer"]] == r["id"].split("-")[2].replace("_", " ")
    per_class = [r["id"].split("-")[2] for r in _read(tmp_path / "a" / "test.jsonl")]
    assert sorted(per_class) == sorted(classes * 2)
    test_ids = {r["id"].split("-", 2)[2] for r in _read(tmp_path / "a" / "test.jsonl")}
    assert not test_ids & {r["id"].split("-", 2)[2] for r in _read(tmp_path / "a" / "train.jsonl")}


def test_caltech_drops_faces_easy_the_duplicate_of_faces(tmp_path):
    root = tmp_path / "101_ObjectCategories"
    for k, cls in enumerate(["BACKGROUND_Google", "Faces", "Faces_easy", "Motorbikes", "water_lilly", "Leopards"]):
        for i in range(1, 4):
            _photo(str(root / cls / f"image_{i:04d}.jpg"), (k * 40, i * 60, 0))
    res = _run("caltech101", "--src", tmp_path, "--out", tmp_path / "out", "--n-train", 100, "--n-test", 4)
    assert "found 12 images of 4 classes" in res.stdout
    assert "skipped 3 images of Faces_easy (duplicate of Faces)" in res.stdout
    rows = _read(tmp_path / "out" / "train.jsonl") + _read(tmp_path / "out" / "test.jsonl")
    assert len(rows) == 12 and not any("Faces_easy" in r["id"] or "BACKGROUND" in r["id"] for r in rows)
    assert {o for r in rows for o in r["options"]} == {"Faces", "Motorbikes", "water lilly", "Leopards"}


def test_miniimagenet_mmfewshot_layout_finds_the_nth_image_of_each_class_folder(tmp_path):
    src, wnids = tmp_path / "mini_imagenet", ["n01532829", "n01558993", "n01704323", "n01749939"]
    for k, wnid in enumerate(wnids):
        for num in (7, 10, 200):  # numeric order 7, 10, 200; by name 10, 200, 7
            _photo(str(src / "images" / wnid / f"{wnid}_{num}.JPEG"), (k * 50, num, 0))
    (src / "images" / wnids[0] / "readme.txt").write_text("not an image")
    for split, classes in (("train", wnids[:2]), ("val", wnids[2:3]), ("test", wnids[3:])):
        (src / f"{split}.csv").write_text("filename,label\n" + "".join(
            f"{w}{n:08d}.jpg,{w}\n" for w in classes for n in (1, 3)))  # the 1st and 3rd image of each class
    res = _run("miniimagenet", "--src", src, "--out", tmp_path / "out", "--n-train", 6, "--n-test", 2)
    assert "found 8 images of 4 classes" in res.stdout and "ignored 1 non-image files" in res.stdout
    assert "train.jsonl: kept 6, skipped 0" in res.stdout and "test.jsonl: kept 2, skipped 0" in res.stdout
    rows = [r for split in ("train", "test") for r in perturb.load_samples(tmp_path / "out" / f"{split}.jsonl")]
    assert {r["id"].split("-", 3)[3] for r in rows} == {f"{w}_{n}" for w in wnids for n in (7, 200)}
    assert all(r["options"][r["answer"]] == r["id"].split("-")[2] for r in rows)


def test_a_converter_that_keeps_nothing_exits_naming_the_file_and_why(tmp_path):
    src = tmp_path / "mini"
    (src / "images").mkdir(parents=True)  # the csvs are there, the images were never extracted
    (src / "train.csv").write_text("filename,label\n" + "".join(
        f"n0{c}{i:08d}.jpg,n0{c}\n" for c in range(4) for i in range(1, 4)))
    res = _run("miniimagenet", "--src", src, "--out", tmp_path / "out", ok=False)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert f"{tmp_path / 'out' / 'train.jsonl'}: kept 0, skipped 12: 12 missing image" in res.stderr
    assert "check --src" in res.stderr and not (tmp_path / "out" / "train.jsonl").exists()


def test_caltech_skips_and_counts_a_decompression_bomb(tmp_path):
    root = tmp_path / "101_ObjectCategories"
    for k, cls in enumerate(["ant", "bass", "crab", "duck"]):
        for i in range(1, 4):
            _photo(str(root / cls / f"image_{i:04d}.jpg"), (k * 40, i * 60, 0))
    (root / "ant" / "image_0004.png").write_bytes(_bomb_png())
    res = _run("caltech101", "--src", tmp_path, "--out", tmp_path / "out", "--n-train", 100, "--n-test", 4)
    assert "found 13 images of 4 classes" in res.stdout
    assert "kept 8, skipped 1: 1 unreadable image" in res.stdout and "Traceback" not in res.stderr


def _bomb_png():
    """A PNG whose header claims 20000 x 20000 pixels, over twice PIL's decompression-bomb limit."""
    def chunk(kind, data):
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
    ihdr = (20000).to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_converters_write_nothing_outside_out_whatever_names_the_source_holds(tmp_path):
    mini = tmp_path / "mini"
    for i, cls in enumerate(["../../../ESCAPED_mini", "tank", "lion", "ant"]):
        _photo(str(mini / "images" / f"im{i}.png"), (i * 50, 0, 0))
    (mini / "train.csv").write_text("filename,label\n" + "".join(
        f"im{i}.png,{c}\n" for i, c in enumerate(["../../../ESCAPED_mini", "tank", "lion", "ant"])))
    _run("miniimagenet", "--src", mini, "--out", tmp_path / "out", "--n-train", 4, "--n-test", 0)
    assert len(perturb.load_samples(tmp_path / "out" / "train.jsonl")) == 4

    sqa = tmp_path / "a" / "b" / "sqa"  # the key leads the source up as far as the output
    _write_json(str(sqa / "problems.json"), {"../../../../ESCAPED_sqa": _problem("train", "image.png")})
    _photo(str(tmp_path / "a" / "ESCAPED_sqa" / "image.png"))
    (sqa / "images" / "train").mkdir(parents=True)
    _run("scienceqa", "--src", sqa, "--out", tmp_path / "out" / "sqa")
    assert len(perturb.load_samples(tmp_path / "out" / "sqa" / "train.jsonl")) == 1

    tsv = _mmbench_tsv(tmp_path / "mmb.tsv", [  # row 0's image cell names row 1, whose index is a path
        dict(index="0", question="q", A="a", B="b", answer="A", image="../../ESCAPED_mmb"),
        dict(index="../../ESCAPED_mmb", question="q", A="a", B="b", answer="A", image=_b64_image((1, 2, 3)))])
    res = _run("mmbench", "--src", tsv, "--out", tmp_path / "out", ok=False)
    assert "index '../../ESCAPED_mmb' is not a whole number" in res.stderr
    written = [p for p in tmp_path.rglob("*") if p.is_file() and (tmp_path / "out") not in p.parents]
    assert not [p for p in written if p.name.startswith("ESCAPED")]
    with pytest.raises(perturb.DataError, match="outside"):
        common.inside(tmp_path / "out", "images/../../x.png")


def test_images_with_one_basename_in_two_folders_stay_two_images(tmp_path):
    _photo(str(tmp_path / "SEED-Bench-image" / "a" / "1.png"), (255, 0, 0))
    _photo(str(tmp_path / "SEED-Bench-image" / "b" / "1.png"), (0, 0, 255))
    src = _write_json(str(tmp_path / "SEED-Bench.json"), {"questions": [
        _seed_question("1", "a/1.png"), _seed_question("2", "b/1.png")]})
    _run("seedbench", "--src", src, "--out", tmp_path / "seed")
    folder = tmp_path / "SEED-Bench-Img" / "x"
    _photo(str(folder.parent / "a" / "1.png"), (255, 0, 0))
    _photo(str(folder.parent / "b" / "1.png"), (0, 0, 255))
    _write_json(str(folder / "multiple_choice_data.json"), [
        {"image": name, "question": "Which?", "multiple_choices": {"A": "one", "B": "two"},
         "multiple_choices_answer": "A"} for name in ("../a/1.png", "../b/1.png")])
    _run("authors", "--src", folder, "--task", "vqa", "--images", folder, "--out", tmp_path / "authors")
    for out in ("seed", "authors"):
        rows = perturb.load_samples(tmp_path / out / "test.jsonl")
        with Image.open(rows[0]["image"]) as first, Image.open(rows[1]["image"]) as second:
            assert (first.getpixel((0, 0)), second.getpixel((0, 0))) == ((255, 0, 0), (0, 0, 255)), out


# ---- text-heavy ----------------------------------------------------------------------------------------

OBQA = [("7-980", "The sun is responsible for", ["puppies learning new tricks", "plants sprouting", "a flood",
                                                 "a star"], "B"),
        ("7-584", "When standing miles away from Mount Rushmore", ["the mountains seem very close",
                                                                   "the mountains are boring", "they seem small",
                                                                   "the mountains seem smaller"], "D"),
        ("8-376", "Which is empty?", ["a box", "", "a cup", "a jar"], "A")]


def _obqa_jsonl(folder, rows):
    os.makedirs(folder, exist_ok=True)
    with open(folder / "train.jsonl", "w") as f:
        for id_, stem, texts, key in rows:
            f.write(json.dumps({"id": id_, "question": {"stem": stem, "choices": [
                {"text": t, "label": l} for t, l in zip(texts, "ABCD")]}, "answerKey": key}) + "\n")
    return folder / "train.jsonl"


def test_openbookqa_reads_jsonl_and_parquet_layouts_alike(tmp_path):
    _obqa_jsonl(tmp_path / "orig" / "Main", OBQA)
    with open(tmp_path / "orig" / "Main" / "dev.jsonl", "w") as f:
        f.write(json.dumps({"id": "9-1", "question": {"stem": "Dev?", "choices": [
            {"text": "x", "label": "A"}, {"text": "y", "label": "B"}]}, "answerKey": "B"}) + "\n")
    _write_parquet(str(tmp_path / "hf" / "main" / "train-00000-of-00001.parquet"), [
        {"id": i, "question_stem": s, "choices": {"text": t, "label": list("ABCD")}, "answerKey": k}
        for i, s, t, k in OBQA])
    _write_parquet(str(tmp_path / "hf" / "main" / "validation-00000-of-00001.parquet"), [
        {"id": "9-1", "question_stem": "Dev?", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "B"}])
    _write_parquet(str(tmp_path / "hf" / "additional" / "train-00000-of-00001.parquet"), [
        {"id": "0-0", "question_stem": "ignored", "choices": {"text": ["a", "b"], "label": ["A", "B"]},
         "answerKey": "A"}])
    res = _run("openbookqa", "--src", tmp_path / "orig", "--out", tmp_path / "a")
    _run("openbookqa", "--src", tmp_path / "hf", "--out", tmp_path / "b")
    assert "kept 2, skipped 1: 1 empty options" in res.stdout
    for split in ("train", "validation"):
        assert _bytes(tmp_path / "a" / f"{split}.jsonl") == _bytes(tmp_path / "b" / f"{split}.jsonl")
    train = perturb.load_samples(tmp_path / "a" / "train.jsonl")
    assert [r["id"] for r in train] == ["openbookqa-train-7-980", "openbookqa-train-7-584"]
    assert train[0]["options"] == OBQA[0][2] and train[0]["answer"] == 1 and train[1]["answer"] == 3
    assert all(r["task"] == "text_heavy" and r["image"] is None and r["source"] == "openbookqa" for r in train)
    assert train[0]["question"] == "The sun is responsible for"
    val = _read(tmp_path / "a" / "validation.jsonl")
    assert val[0]["id"] == "openbookqa-validation-9-1" and val[0]["options"] == ["x", "y"] and val[0]["answer"] == 1


def test_openbookqa_bad_answer_key_names_file_and_line(tmp_path):
    path = _obqa_jsonl(tmp_path / "Main", [OBQA[0], OBQA[1][:3] + ("E",)])
    res = _run("openbookqa", "--src", tmp_path, "--out", tmp_path / "out", ok=False)
    assert res.returncode != 0 and f"{path}:2: answerKey 'E'" in res.stderr


def _mmlu_csv(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def test_mmlu_accepts_letter_and_index_answers_in_csv_and_parquet(tmp_path):
    src = tmp_path / "csv" / "data"
    _mmlu_csv(src / "test" / "abstract_algebra_test.csv", [
        ["Find the degree of Q(sqrt(2)) over Q.", "0", "4", "2", "6", "C"],
        ["Is 7, a prime?", "yes", "no", "maybe", "never", "0"],
        ["Empty option?", "a", "", "c", "d", "A"]])
    _mmlu_csv(src / "dev" / "abstract_algebra_dev.csv", [["Dev q", "a", "b", "c", "d", "B"]])
    _mmlu_csv(src / "auxiliary_train" / "race.csv", [["Aux q", "a", "b", "c", "d", "D"]])
    _mmlu_csv(src / "val" / "abstract_algebra_val.csv", [["Val q", "a", "b", "c", "d", "1"]])
    res = _run("mmlu", "--src", tmp_path / "csv", "--out", tmp_path / "a")
    assert "kept 2, skipped 1: 1 empty options" in res.stdout
    test = perturb.load_samples(tmp_path / "a" / "test.jsonl")
    assert [r["answer"] for r in test] == [2, 0] and test[0]["options"] == ["0", "4", "2", "6"]
    assert [r["id"] for r in test] == ["mmlu-test-000000", "mmlu-test-000001"]
    assert all(r["task"] == "text_heavy" and r["image"] is None and r["subject"] == "abstract_algebra" for r in test)
    train = perturb.load_samples(tmp_path / "a" / "train.jsonl")
    assert sorted((r["question"], r["answer"]) for r in train) == [("Aux q", 3), ("Dev q", 1)]
    assert _read(tmp_path / "a" / "validation.jsonl")[0]["answer"] == 1
    hf = tmp_path / "hf"
    rows = [{"question": "Find the degree of Q(sqrt(2)) over Q.", "subject": "abstract_algebra",
             "choices": ["0", "4", "2", "6"], "answer": 2},
            {"question": "Is 7, a prime?", "subject": "abstract_algebra", "choices": ["yes", "no", "maybe", "never"],
             "answer": 0}]
    _write_parquet(str(hf / "all" / "test-00000-of-00001.parquet"), rows)
    _write_parquet(str(hf / "abstract_algebra" / "test-00000-of-00001.parquet"), rows)  # the same rows again
    _write_parquet(str(hf / "all" / "dev-00000-of-00001.parquet"), [
        {"question": "Dev q", "subject": "abstract_algebra", "choices": list("abcd"), "answer": "B"}])
    _run("mmlu", "--src", hf, "--out", tmp_path / "b")
    assert _bytes(tmp_path / "a" / "test.jsonl") == _bytes(tmp_path / "b" / "test.jsonl")
    assert [r["answer"] for r in _read(tmp_path / "b" / "train.jsonl")] == [1]


def test_mmlu_bad_answer_errors_with_file_and_line(tmp_path):
    path = _mmlu_csv(tmp_path / "data" / "test" / "anatomy_test.csv", [
        ["ok", "a", "b", "c", "d", "A"], ["bad", "a", "b", "c", "d", "E"]])
    res = _run("mmlu", "--src", tmp_path, "--out", tmp_path / "out", ok=False)
    assert res.returncode != 0 and f"{path}:2: answer 'E'" in res.stderr


# ---- VQA -----------------------------------------------------------------------------------------------

def _problem(split, image, hint="", answer=0):
    return {"question": "Which animal is shown?", "choices": ["cat", "dog"], "answer": answer, "hint": hint,
            "image": image, "split": split, "task": "closed choice", "lecture": "", "solution": ""}


def test_scienceqa_keeps_image_items_with_hint_context(tmp_path):
    src = tmp_path / "scienceqa"
    _write_json(str(src / "problems.json"), {
        "1": _problem("train", "image.png", hint="The picture was taken at a farm."),
        "2": _problem("train", None, hint="No picture."),
        "10": _problem("test", "image.png", answer=1),
        "4": _problem("val", "image.png")})
    _photo(str(src / "images" / "train" / "1" / "image.png"))
    _photo(str(src / "test" / "10" / "image.png"))  # the layout without images/
    res = _run("scienceqa", "--src", src, "--out", tmp_path / "out")
    assert "train.jsonl: kept 1, skipped 1: 1 no image" in res.stdout
    assert "no validation image folder beside problems.json" in res.stdout  # val.zip not extracted: no file
    assert not (tmp_path / "out" / "validation.jsonl").exists()
    train = perturb.load_samples(tmp_path / "out" / "train.jsonl")
    assert train[0]["id"] == "scienceqa-train-1" and train[0]["task"] == "vqa"
    assert train[0]["question"] == "Context: The picture was taken at a farm.\nWhich animal is shown?"
    assert train[0]["options"] == ["cat", "dog"] and train[0]["answer"] == 0 and train[0]["source"] == "scienceqa"
    test = perturb.load_samples(tmp_path / "out" / "test.jsonl")
    assert test[0]["question"] == "Which animal is shown?" and test[0]["answer"] == 1


def test_scienceqa_split_with_its_image_folder_but_no_images_is_an_error(tmp_path):
    src = tmp_path / "scienceqa"
    _write_json(str(src / "problems.json"), {"1": _problem("train", "image.png"), "2": _problem("val", "image.png")})
    _photo(str(src / "images" / "train" / "1" / "image.png"))
    (src / "images" / "val" / "7").mkdir(parents=True)
    res = _run("scienceqa", "--src", src, "--out", tmp_path / "out", ok=False)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert f"{tmp_path / 'out' / 'validation.jsonl'}: kept 0, skipped 1: 1 missing image" in res.stderr


def test_scienceqa_parquet_layout_decodes_images_and_skips_imageless(tmp_path):
    row = dict(_problem("train", None), image={"bytes": _png_bytes(), "path": None})
    del row["split"]
    _write_parquet(str(tmp_path / "hf" / "data" / "test-00000-of-00001-f0e7.parquet"),
                   [row, dict(row, image=None, question="Text only?")])
    res = _run("scienceqa", "--src", tmp_path / "hf", "--out", tmp_path / "out")
    assert "test.jsonl: kept 1, skipped 1: 1 no image" in res.stdout
    rows = perturb.load_samples(tmp_path / "out" / "test.jsonl")
    assert rows[0]["id"] == "scienceqa-test-00000" and rows[0]["question"] == "Which animal is shown?"
    with Image.open(rows[0]["image"]) as im:
        assert im.size == (8, 8) and im.getpixel((0, 0)) == (200, 0, 0)


def _b64_image(color):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="JPEG")
    return base64.b64encode(buf.getvalue()).decode()


MMB_COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
               "l2-category", "comment", "split"]


def _mmbench_tsv(path, rows, columns=MMB_COLUMNS):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(columns)
        for r in rows:
            w.writerow([r.get(c, "") for c in columns])
    return path


def test_mmbench_keeps_two_option_rows_and_hints(tmp_path):
    path = _mmbench_tsv(tmp_path / "MMBench_DEV_EN.tsv", [
        dict(index="0", question='Which "shape" is this?', hint="nan", A="circle", B="square", C="star",
             D="heart", answer="B", category="shape", image=_b64_image((0, 0, 255)), split="dev"),
        dict(index="1", question="Is it day?", hint="The sky is bright.", A="yes", B="no", answer="A",
             category="time", image=_b64_image((255, 255, 0)), split="dev"),
        dict(index="2", question="Same image, other question?", hint="", A="red", B="blue", C="green",
             answer="C", image="0", split="dev"),
        dict(index="3", question="Broken image?", A="a", B="b", answer="A", image="!!not base64!!" * 30)])
    res = _run("mmbench", "--src", path, "--out", tmp_path / "out")
    assert "kept 3, skipped 1: 1 missing or undecodable image" in res.stdout
    rows = perturb.load_samples(tmp_path / "out" / "test.jsonl")
    assert [r["id"] for r in rows] == ["mmbench-test-0", "mmbench-test-1", "mmbench-test-2"]
    assert rows[0]["question"] == 'Which "shape" is this?' and rows[0]["answer"] == 1 and len(rows[0]["options"]) == 4
    assert rows[1]["question"] == "Context: The sky is bright.\nIs it day?" and rows[1]["options"] == ["yes", "no"]
    assert rows[2]["options"] == ["red", "blue", "green"] and rows[2]["answer"] == 2
    assert all(r["task"] == "vqa" and r["source"] == "mmbench" and r["image"].endswith(".png") for r in rows)
    with Image.open(rows[2]["image"]) as im:
        assert im.format == "PNG" and im.convert("RGB").getpixel((4, 4))[2] > 200  # the blue image of row 0


def test_mmbench_skips_a_test_tsv_without_answers_and_errors_on_answer_without_option(tmp_path):
    _mmbench_tsv(tmp_path / "MMBench_TEST_EN.tsv", [dict(index="0", question="q", A="a", B="b",
                                                         image=_b64_image((1, 2, 3)))],
                 columns=[c for c in MMB_COLUMNS if c != "answer"])
    res = _run("mmbench", "--src", tmp_path / "MMBench_TEST_EN.tsv", "--out", tmp_path / "out", ok=False)
    assert res.returncode != 0 and "no answer column" in res.stdout
    dev = _mmbench_tsv(tmp_path / "MMBench_DEV_EN.tsv", [
        dict(index="0", question="q", A="a", B="b", answer="A", image=_b64_image((1, 2, 3))),
        dict(index="1", question="q", A="a", B="b", answer="C", image=_b64_image((1, 2, 3)))])
    res = _run("mmbench", "--src", dev, "--out", tmp_path / "out", ok=False)
    assert res.returncode != 0 and f"{dev}:3: answer 'C'" in res.stderr


def _mmbench_circular(path):
    """VLMEvalKit's layout: main rows (index < 1e6, base64 image), then pass k of question i at index
    i + k * 1e6 with the options rotated by k and the image cell holding "i"."""
    questions = [(0, ["cat", "dog", "cow", "pig"], 2, (0, 0, 255)), (1, ["yes", "no"], 0, (255, 255, 0)),
                 (7, ["red", "green", "blue"], 1, (0, 255, 0))]
    rows = []
    for k in range(4):
        for i, opts, ans, color in questions:
            if k >= len(opts):
                continue
            rot = opts[k:] + opts[:k]
            cells = dict(zip("ABCD", rot))
            rows.append(dict(index=str(i + k * 1_000_000), question=f"Question {i}?", hint="nan", **cells,
                             answer="ABCD"[rot.index(opts[ans])], split="dev",
                             image=_b64_image(color) if k == 0 else str(i)))
    return _mmbench_tsv(path, rows)


def test_mmbench_keeps_one_sample_per_question_by_default(tmp_path):
    path = _mmbench_circular(tmp_path / "MMBench_DEV_EN.tsv")
    res = _run("mmbench", "--src", path, "--out", tmp_path / "out")
    assert "kept 3, skipped 6: 6 CircularEval pass" in res.stdout  # 3 + 1 + 2 rotated passes
    rows = perturb.load_samples(tmp_path / "out" / "test.jsonl")
    assert [r["id"] for r in rows] == ["mmbench-test-0", "mmbench-test-1", "mmbench-test-7"]
    assert rows[0]["options"] == ["cat", "dog", "cow", "pig"] and rows[0]["answer"] == 2
    assert all("question_id" not in r for r in rows)


def test_mmbench_circular_keeps_every_pass_with_its_image_and_question_id(tmp_path):
    path = _mmbench_circular(tmp_path / "MMBench_DEV_EN.tsv")
    res = _run("mmbench", "--src", path, "--out", tmp_path / "out", "--circular")
    assert "kept 9, skipped 0" in res.stdout
    rows = {r["id"]: r for r in perturb.load_samples(tmp_path / "out" / "test.jsonl")}
    assert len(rows) == 9
    third = rows["mmbench-test-3000000"]
    assert third["options"] == ["pig", "cat", "dog", "cow"] and third["options"][third["answer"]] == "cow"
    assert third["question_id"] == rows["mmbench-test-0"]["question_id"] == "mmbench-0"
    assert rows["mmbench-test-2000007"]["options"] == ["blue", "red", "green"]
    assert rows["mmbench-test-2000007"]["answer"] == 2 and rows["mmbench-test-2000007"]["question_id"] == "mmbench-7"
    assert sorted({r["question_id"] for r in rows.values()}) == ["mmbench-0", "mmbench-1", "mmbench-7"]
    with Image.open(rows["mmbench-test-1000001"]["image"]) as im:  # the yellow image of main row 1
        assert im.convert("RGB").getpixel((4, 4))[:2] > (200, 200) and im.convert("RGB").getpixel((4, 4))[2] < 60


def _seed_question(qid, data_id, data_type="image", answer="A", type_id=1):
    return {"question_id": qid, "question": f"Question {qid}?", "choice_a": "one", "choice_b": "two",
            "choice_c": "three", "choice_d": "four", "answer": answer, "data_type": data_type,
            "data_id": data_id, "question_type_id": type_id}


def test_seedbench_keeps_image_items_and_skips_videos(tmp_path):
    _photo(str(tmp_path / "SEED-Bench-image" / "1454426_2591111986.jpg"))
    _photo(str(tmp_path / "SEED-Bench-image" / "777_1.jpg"), (0, 255, 0))
    src = _write_json(str(tmp_path / "SEED-Bench.json"), {"questions": [
        _seed_question("101669", "1454426_2591111986", answer="C"),
        _seed_question("101670", "777_1.jpg", answer="D"),
        _seed_question("101671", "1454426_2591111986", answer="A"),
        _seed_question("101672", "gone_1"),
        _seed_question("v1738", "94328.webm", "video", type_id=10),
        _seed_question("v1962", "P03/P03_24.MP4", "video", type_id=11)], "question_type": {"Scene Understanding": 1}})
    res = _run("seedbench", "--src", src, "--out", tmp_path / "out")
    assert "kept 3, skipped 3: 2 video questions, 1 missing image" in res.stdout
    rows = perturb.load_samples(tmp_path / "out" / "test.jsonl")
    assert [(r["id"], r["answer"]) for r in rows] == [("seedbench-test-101669", 2), ("seedbench-test-101670", 3),
                                                       ("seedbench-test-101671", 0)]
    assert rows[0]["options"] == ["one", "two", "three", "four"] and rows[0]["question"] == "Question 101669?"
    assert rows[0]["image"] == rows[2]["image"] and all(r["task"] == "vqa" for r in rows)
    _write_json(src, {"questions": [_seed_question("1", "777_1.jpg"), _seed_question("2", "777_1.jpg", answer="E")]})
    res = _run("seedbench", "--src", src, "--out", tmp_path / "bad", ok=False)
    assert res.returncode != 0 and "questions[1]: answer 'E'" in res.stderr and str(src) in res.stderr


def _llava(root):
    _photo(str(root / "coco" / "train2017" / "000000033471.jpg"))
    _photo(str(root / "gqa" / "images" / "2354786.jpg"))
    return _write_json(str(root / "llava_v1_5_mix665k.json"), [
        {"id": "000000033471", "image": "coco/train2017/000000033471.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
            {"from": "gpt", "value": "The bus in the image is white and red."},
            {"from": "human", "value": "What feature can be seen on the back of the bus?"},
            {"from": "gpt", "value": "The back of the bus features an advertisement."}]},
        {"id": "i6IyJda_0", "model": "", "conversations": [
            {"from": "human", "value": "Write a poem."}, {"from": "gpt", "value": "Roses are red."}]},
        {"id": "ocr1", "image": "ocr_vqa/images/gone.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWho wrote this book?"}, {"from": "gpt", "value": "Nobody."}]},
        {"id": "2354786", "image": "gqa/images/2354786.jpg", "conversations": [
            {"from": "human", "value": "Is the sky dark?\n<image>"}, {"from": "gpt", "value": "Yes"}]}])


def test_llava_instruct_first_exchange_all_turns_and_image_paths(tmp_path):
    src = _llava(tmp_path / "llava")
    out = tmp_path / "data" / "llava_instruct"
    res = _run("llava_instruct", "--src", src, "--out", out)
    assert "2 samples from 4 conversations" in res.stdout
    assert ("train.jsonl: kept 2, skipped 2: 1 conversations with a missing image file, "
            "1 conversations without image") in res.stdout
    rows = _read(out / "train.jsonl")
    assert [r["id"] for r in rows] == ["llava_instruct-train-000000", "llava_instruct-train-000003"]
    assert rows[0]["question"] == "What are the colors of the bus in the image?"
    assert rows[0]["answer"] == "The bus in the image is white and red." and rows[0]["options"] is None
    assert rows[1]["question"] == "Is the sky dark?" and rows[1]["answer"] == "Yes"
    assert all(r["task"] == "vqa" and r["source"] == "llava_instruct" for r in rows)
    assert rows[0]["source_id"] == "000000033471"
    assert rows[0]["image"] == "images/coco/train2017/000000033471.jpg"  # a hard link: inside --out, no space
    assert os.path.samefile(out / rows[0]["image"], tmp_path / "llava" / "coco" / "train2017" / "000000033471.jpg")
    assert len(perturb.load_samples(out / "train.jsonl")) == 2
    _run("llava_instruct", "--src", src, "--out", tmp_path / "all", "--all-turns", "--copy-images")
    rows = _read(tmp_path / "all" / "train.jsonl")
    assert [r["id"] for r in rows] == ["llava_instruct-train-000000-0", "llava_instruct-train-000000-1",
                                       "llava_instruct-train-000003-0"]
    assert rows[1]["question"] == ("USER: What are the colors of the bus in the image? ASSISTANT: The bus in the "
                                   "image is white and red.\nWhat feature can be seen on the back of the bus?")
    assert rows[1]["answer"] == "The back of the bus features an advertisement."
    assert rows[0]["image"] == "images/coco/train2017/000000033471.jpg"
    assert (tmp_path / "all" / rows[0]["image"]).is_file()


def test_llava_instruct_malformed_conversation_names_the_item(tmp_path):
    src = _write_json(str(tmp_path / "bad.json"), [{"id": "a", "image": "x.jpg", "conversations": [
        {"from": "gpt", "value": "hi"}, {"from": "human", "value": "hello"}]}])
    res = _run("llava_instruct", "--src", src, "--out", tmp_path / "out", ok=False)
    assert res.returncode != 0 and f"{src}: item 0:" in res.stderr


# ---- the authors' released layout ----------------------------------------------------------------------

def test_authors_layout_options_in_letter_order_and_facts_by_index(tmp_path):
    folder = tmp_path / "caltech-101"
    _photo(str(folder / "images" / "image_0001.jpg"))
    _photo(str(folder / "image_0002.jpg"))
    fact = "The picture seems to describe a car. Cars have four wheels."
    _write_json(str(folder / "multiple_choice_data_train.json"), [
        {"id": "a1b2", "question": "What type of object is in this photo?", "image": "image_0001.jpg",
         "multiple_choices": {"B": "cat", "A": "dog", "D": "tree", "C": "car"}, "multiple_choices_answer": "B",
         "facts": {"car": fact}},
        {"id": "c3d4", "question": "What type of object is in this photo?", "image": "image_0002.jpg",
         "multiple_choices": {"A": "dog", "B": "cat"}, "multiple_choices_answer": "A", "facts": {"B": "Cats purr."}}])
    _write_json(str(folder / "multiple_choice_data_test.json"), [
        {"id": "e5", "question": "What?", "image": "gone.jpg", "multiple_choices": {"A": "x", "B": "y"},
         "multiple_choices_answer": "A"},
        {"id": "f6", "question": "What?", "image": "image_0002.jpg", "multiple_choices": {"A": "x", "B": "y"},
         "multiple_choices_answer": "A"}])  # a split that keeps nothing is an error (common.write_samples)
    res = _run("authors", "--src", folder, "--task", "image_heavy", "--out", tmp_path / "out")
    assert "train.jsonl: kept 2, skipped 0" in res.stdout
    assert "test.jsonl: kept 1, skipped 1: 1 missing image" in res.stdout
    rows = perturb.load_samples(tmp_path / "out" / "train.jsonl")
    assert rows[0]["id"] == "caltech-101-train-a1b2" and rows[0]["source"] == "caltech-101"
    assert rows[0]["options"] == ["dog", "cat", "car", "tree"] and rows[0]["answer"] == 1
    assert rows[0]["facts"] == {"2": fact} and rows[1]["facts"] == {"1": "Cats purr."}
    assert rows[0]["task"] == "image_heavy" and rows[0]["question"] == "What type of object is in this photo?"


def test_authors_text_heavy_has_null_image_and_bad_answer_errors(tmp_path):
    src = _write_json(str(tmp_path / "MMLU" / "multiple_choice_data_test.json"), [
        {"id": "m1", "question": "2 + 2 =", "image": "ignored.jpg", "multiple_choices": {"A": "3", "B": "4"},
         "multiple_choices_answer": "B"}])
    _run("authors", "--src", src, "--task", "text_heavy", "--name", "mmlu", "--out", tmp_path / "out")
    rows = perturb.load_samples(tmp_path / "out" / "test.jsonl")
    assert rows == [dict(id="mmlu-test-m1", task="text_heavy", image=None, question="2 + 2 =", options=["3", "4"],
                         answer=1, source="mmlu")]
    _write_json(src, [{"question": "q", "multiple_choices": {"A": "3", "B": "4"}, "multiple_choices_answer": "C"}])
    res = _run("authors", "--src", src, "--task", "text_heavy", "--out", tmp_path / "bad", ok=False)
    assert res.returncode != 0 and f"{src}: item 0: multiple_choices_answer 'C'" in res.stderr


def test_authors_seedbench_data_id_finds_its_image_and_skips_videos(tmp_path):
    folder = tmp_path / "SEED-Bench-Img"
    _photo(str(folder / "images" / "1454_a.jpg"), (250, 0, 0))
    _photo(str(folder / "2001_b.png"), (0, 250, 0))
    (folder / "v_clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")

    def item(data_id, **extra):
        return {"data_id": data_id, "question": f"What about {data_id}?", "multiple_choices":
                {"A": "one", "B": "two"}, "multiple_choices_answer": "B", **extra}
    _write_json(str(folder / "multiple_choice_data.json"), [
        item("1454_a", data_type="image", facts={"Z": "Not an option."}), item("2001_b"),
        item("v_clip"), item("v_frames", data_type="video")])
    res = _run("authors", "--src", folder, "--task", "vqa", "--out", tmp_path / "out")
    assert "test.jsonl: kept 2, skipped 3: 2 video, 1 facts entry naming no option (its sample kept)" in res.stdout
    rows = perturb.load_samples(tmp_path / "out" / "test.jsonl")
    assert [r["id"] for r in rows] == ["SEED-Bench-Img-test-1454_a", "SEED-Bench-Img-test-2001_b"]
    assert rows[0]["image"].endswith("1454_a.jpg") and rows[1]["image"].endswith("2001_b.png")
    assert "facts" not in rows[0] and rows[1]["answer"] == 1
    with Image.open(rows[1]["image"]) as im:
        assert im.getpixel((0, 0)) == (0, 250, 0)


def test_authors_source_train_data_layout_takes_task_from_type(tmp_path):
    repo = tmp_path / "Modality-Interference-in-MLLMs"  # their paths start at the repo root: data/...
    _photo(str(repo / "data" / "caltech-101" / "images" / "a.jpg"))
    _photo(str(repo / "data" / "LLaVa-Instruct-665K" / "coco" / "b.jpg"))
    fact = "A car has four wheels."
    src = _write_json(str(repo / "data" / "source_train_data.json"), [
        {"id": "c1", "type": "image_heavy", "image": "data/caltech-101/images/a.jpg",
         "question": "Question:\nWhat is this?\nOption:\nA: dog\nB: cat\nC: car\n", "answer": "B",
         "facts": {"car": fact, "truck": "A truck is big."}},
        {"id": "m1", "type": "text_heavy", "question": "Question:\n2 + 2 =\nOption:\nA: 3\nB: 4\n", "answer": "B"},
        {"id": "v1", "type": "VQA", "image": "data/LLaVa-Instruct-665K/coco/b.jpg",
         "question": "What is in the picture?", "answer": "A dog on grass."}])
    res = _run("authors", "--src", src, "--out", tmp_path / "out")
    assert "train.jsonl: kept 3, skipped 1: 1 facts entry naming no option (its sample kept)" in res.stdout
    rows = perturb.load_samples(tmp_path / "out" / "train.jsonl")
    assert [(r["id"], r["task"], r["source"]) for r in rows] == [
        ("source_train_data-train-c1", "image_heavy", "source_train_data"),
        ("source_train_data-train-m1", "text_heavy", "source_train_data"),
        ("source_train_data-train-v1", "vqa", "source_train_data")]
    assert rows[0]["question"] == "What is this?" and rows[0]["options"] == ["dog", "cat", "car"]
    assert rows[0]["answer"] == 1 and rows[0]["facts"] == {"2": fact}
    assert rows[1]["image"] is None and rows[1]["options"] == ["3", "4"] and rows[1]["answer"] == 1
    assert rows[2]["options"] is None and rows[2]["answer"] == "A dog on grass." and rows[2]["image"].endswith("b.jpg")

