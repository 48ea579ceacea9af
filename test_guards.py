"""Tests of the guards around the user's work: an interrupted toy stage is redone, a checkpoint of an
unknown model type is refused before its code runs, a mistyped local path fails at once. Tiny models
and tmp folders, no network. Run: python -m pytest -q test_guards.py
"""
import inspect
import json
import os

import pytest

import model as M
import prompts as P
import toy
from model import make_tiny
from samples import DataError


def test_toy_stage_cut_during_export_is_not_done(tmp_path):
    stage = tmp_path / "vanilla"  # what a kill between train.py's renames leaves
    stage.mkdir()
    (stage / "model.safetensors").write_bytes(b"")
    assert not toy.done(str(stage))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        M.load(str(stage))
    (stage / "config.json").write_text(json.dumps({"model_type": "llava"}))
    assert not toy.done(str(stage))  # still no tokenizer: only the step's success counts
    assert toy.done(toy.finish(str(stage)))


def test_toy_refuses_flags_it_would_ignore_or_out_of_range_and_runs_a_preset_named_twice_once(capsys, tmp_path):
    with pytest.raises(SystemExit):
        toy.parse(["--presets", "ours-sign"])  # without --ablation the quick start would train `ours` alone
    assert "--presets chooses the presets of --ablation" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        toy.parse(["--smoke", "--ablation"])
    assert "--smoke and --ablation are two runs" in capsys.readouterr().err
    for bad in (["--caption-rate", "1.5"], ["--finetune-steps", "0"], ["--n-test", "0"]):
        with pytest.raises(SystemExit):  # the world would be another than asked, or train nothing
            toy.parse(bad)
        assert "--caption-rate is a share (0 to 1)" in capsys.readouterr().err
    import subprocess
    import sys
    prepare = os.path.join(os.path.dirname(toy.__file__), "data", "toy", "prepare.py")
    run = subprocess.run([sys.executable, prepare, "--caption-rate", "2", "--out", str(tmp_path)], capture_output=True,
                         text=True)
    assert run.returncode == 2 and "--caption-rate and --true-caption are shares (0 to 1)" in run.stderr
    assert toy.parse(["--ablation", "--presets", "ours", "fft-aug", "ours"]).presets == ["ours", "fft-aug"]
    assert toy.parse(["--ablation"]).presets == list(toy.PRESETS) and toy.parse([]).presets == list(toy.PRESETS)


def test_a_toy_model_trained_with_other_flags_is_not_reused_under_this_presets_name(tmp_path):
    """The stage marker records train.py's flags: an edited PRESETS row (here ours-sign's radius) stops the ablation
    instead of reporting the old model under the new settings; a marker of before (empty) is taken as done."""
    stage = tmp_path / "ours-sign"
    stage.mkdir()
    flags = [*toy.PRESETS["ours-sign"], *toy.FINETUNE]
    assert toy.done(toy.finish(str(stage), flags), flags) and json.loads((stage / toy.DONE).read_text()) == flags
    edited = [f if f != "0.5" else "0.25" for f in flags]
    with pytest.raises(SystemExit, match=r"ours-sign was trained with \[.*'0.5'.*\], not \[.*'0.25'.*\]: delete it"):
        toy.done(str(stage), edited)
    (stage / toy.DONE).write_text("")
    assert toy.done(str(stage), edited)


def test_unknown_model_type_is_refused_before_its_code_runs(tmp_path):
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(
        {"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}}))
    (folder / "evil.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n")
    with pytest.raises(ValueError) as error:
        M.load(str(folder))
    message = str(error.value)
    assert "'evil'" in message and all(fam in message for fam in M.FAMILIES) and "\n" not in message
    assert not (tmp_path / "ran").exists()
    assert "trust_remote_code" not in inspect.signature(M.load).parameters


def test_mistyped_local_path_fails_at_once_and_processor_loads_alone(tmp_path, monkeypatch):
    folder = make_tiny("llava", str(tmp_path / "out" / "base"))
    monkeypatch.chdir(tmp_path)
    for typo in ("out/bsae", "./out/base2", "out/toy/base", str(tmp_path / "nope" / "base"), "~/no-such-model/x"):
        with pytest.raises(FileNotFoundError, match="no such folder") as error:
            M.load(typo)
        assert typo in str(error.value) and "\n" not in str(error.value)
    assert "base" in str(pytest.raises(FileNotFoundError, M.load, "out/bsae").value)  # names what is there
    assert M.where("llava-1.5-7b") == "llava-hf/llava-1.5-7b-hf"
    assert M.where("llava-hf/llava-1.5-7b-hf") == "llava-hf/llava-1.5-7b-hf"
    assert M.where("out/base") == "out/base"
    os.remove(os.path.join(folder, "model.safetensors"))  # the processor alone never reads the weights
    processor = M.load_processor(folder)
    assert processor.family == "llava" and P.image_size(processor) == 32


# ---- misuse, round 2: each refused in one line before the model loads, or made right -------------------------------
def _one_sample_data(tmp_path, options=("cat", "dog"), name="d.jsonl"):
    """An image-heavy, a text-heavy and a VQA sample; the image-heavy one's options are `options`."""
    from PIL import Image
    (tmp_path / "img").mkdir(exist_ok=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "img" / "a.png")
    rows = [dict(id="i0", task="image_heavy", image="img/a.png", question="What is shown ?", options=list(options),
                 answer=0, source="s"),
            dict(id="t0", task="text_heavy", image=None, question="How many ?", options=["2", "3"], answer=0,
                 source="s"),
            dict(id="v0", task="vqa", image="img/a.png", question="Which color ?", options=["red", "blue"], answer=0,
                 source="s")]
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _nothing_written(out):
    """--out holds nothing (at most the lock a refused run held while it checked)."""
    return [p.name for p in out.iterdir()] in ([], [".lock"]) if out.exists() else True


def _ri_folder(tmp_path, broken=False):
    from PIL import Image
    folder = tmp_path / "ri"
    folder.mkdir(exist_ok=True)
    for i in range(2):
        Image.new("RGB", (8, 8), (i, 2, 3)).save(folder / f"r{i}.png")
    if broken:  # a PNG cut in its data
        (folder / "cut.png").write_bytes((folder / "r0.png").read_bytes()[:40])
    return str(folder)


def test_ri_folder_replaces_the_data_images_in_training_and_in_evaluation(tmp_path):
    import dataloader
    import evaluate
    import train
    data, folder = _one_sample_data(tmp_path), _ri_folder(tmp_path)
    mine = sorted(os.path.realpath(os.path.join(folder, f"r{i}.png")) for i in range(2))
    args = train.parse(["--data", data, "--ri-folder", folder])
    paths, samples, _ = dataloader.read(args)
    assert dataloader.ri_images(args, samples, dataloader.Schedule(args, samples, 1, paths)) == mine
    assert evaluate.load_data([data], ["orig", "ri"], folder)[1] == mine  # not mixed with the data's img/a.png
    assert evaluate.load_data([data], ["orig", "ri"])[1] == [os.path.realpath(tmp_path / "img" / "a.png")]


def test_a_broken_ri_image_stops_train_and_evaluate_naming_its_file(tmp_path, monkeypatch):
    import evaluate
    from test_train import _train
    data, folder = _one_sample_data(tmp_path), _ri_folder(tmp_path, broken=True)
    base = make_tiny("llava", str(tmp_path / "base"))
    for main, out in ((lambda argv: _train(argv, monkeypatch), "t"), (evaluate.main, "e")):
        with pytest.raises(SystemExit, match=r"^error: .*cut\.png: an image of --ri-folder .* cannot be decoded"):
            main(["--model", base, "--data", data, "--out", str(tmp_path / out), "--ri-folder", folder])
        assert _nothing_written(tmp_path / out)


def test_flags_evaluate_shares_with_train_are_refused_before_the_model_loads(tmp_path, monkeypatch):
    import evaluate
    import train
    data, out = _one_sample_data(tmp_path), tmp_path / "out"
    monkeypatch.setattr(M, "load", lambda *a, **k: pytest.fail("the model loaded"))
    facts = tmp_path / "facts.txt"
    facts.write_text("A cat sleeps all day.\nEvery dog can swim.\n")  # each names an option of sample i0
    cases = [(["--k-facts", "0"], "error: --k-facts 0: UF prepends 1 to"),
             (["--k-facts", "100000"], "error: --k-facts 100000: UF prepends 1 to"),
             (["--canvas-size", "200000"], "error: --canvas-size 200000: canvases and random pixels take 1 to 4096"),
             (["--facts-file", str(facts), "--k-facts", "1"], "error: .*'i0'")]
    for extra, message in cases:
        with pytest.raises(SystemExit, match=message):
            evaluate.main(["--model", "llava-1.5-7b", "--data", data, "--out", str(out)] + extra)
        assert not out.exists()
    for extra, message in cases[:3]:  # the same lines from train.py (its facts: the train pool)
        with pytest.raises(SystemExit, match=message):
            train.main(["--model", "llava-1.5-7b", "--data", data, "--out", str(out)] + extra)


def test_lora_flags_that_train_nothing_or_less_are_refused_before_the_model_loads(tmp_path):
    import checks
    import train
    base = make_tiny("llava", str(tmp_path / "base"))
    data = _one_sample_data(tmp_path)
    run = ["--model", base, "--data", data, "--out", str(tmp_path / "out"), "--lora", "4"]
    for extra, message in [(["--lora-targets", "q_proj", "vproj"], r"--lora-targets: vproj names no module .*v_proj"),
                           (["--lora-targets", "qproj"], "--lora-targets: qproj names no module"),
                           (["--lora-alpha", "0"], "--lora-alpha 0 --lora-dropout 0: alpha scales"),
                           (["--lora-dropout", "2"], "--lora-alpha 8 --lora-dropout 2: alpha scales")]:
        with pytest.raises(SystemExit, match=message):
            train.main(run + extra)
        assert not (tmp_path / "out").exists()
    assert checks.model_name(train.parse(run + ["--lora-targets", "q_proj", "v_proj", "down_proj"])) is None


def test_paper_defaults_say_what_they_set_and_refuse_a_model_of_another_family(tmp_path):
    import checks
    import paper
    import train
    base = make_tiny("llava", str(tmp_path / "base"))
    args = train.parse(["--paper-defaults", "qwen2.5-vl-7b", "--model", base, "--data", "x.jsonl"])
    assert checks.model_name(args) == (f"error: --paper-defaults qwen2.5-vl-7b are the authors' settings for that "
                                       f"model, and --model {base} is a llava model: pick the defaults of a llava "
                                       f"model, if the table has one, or drop the flag")
    args = train.parse(["--paper-defaults", "llava-1.5-7b", "--model", base, "--lr", "3e-5"])
    assert checks.model_name(args) is None
    assert paper.applied(args) == ("; --paper-defaults llava-1.5-7b set --eps 0.001 --pgd-steps 2 --lambda-cons 0.01 "
                                   "--ratio-image 0.25 --ratio-text 0.25 --twins all --facts-replacement "
                                   "--canvas-size 336 --prompt authors --pgd-scope template, overridden: --lr 3e-05 "
                                   f"(written for llava-1.5-7b, not {base})")


def test_train_refuses_vqa_only_data_for_a_preset_with_twins_and_ids_given_twice(tmp_path, monkeypatch):
    from test_train import _train
    data = _one_sample_data(tmp_path)
    vqa = tmp_path / "vqa.jsonl"
    vqa.write_text(open(data).read().splitlines()[2] + "\n")
    base = make_tiny("llava", str(tmp_path / "base"))
    run = ["--model", base, "--out", str(tmp_path / "out"), "--max-steps", "1"]
    with pytest.raises(SystemExit, match="--preset ours trains on VQA samples alone .* pass --preset fft-vqa"):
        _train(run + ["--data", str(vqa)], monkeypatch)
    with pytest.raises(SystemExit, match="--preset ours trains on VQA samples alone"):  # or by the ratios
        _train(run + ["--data", data, "--ratio-image", "0", "--ratio-text", "0"], monkeypatch)
    twice = f"{data}: id 'i0' also appears in {data} \\(the same file given twice\\)"
    with pytest.raises(SystemExit, match=f"error: {twice}"):
        _train(run + ["--data", data, data], monkeypatch)
    other = _one_sample_data(tmp_path, name="e.jsonl")
    with pytest.raises(SystemExit, match=f"error: {other}: id 'i0' also appears in {data}: ids must be unique"):
        _train(run + ["--data", data, other], monkeypatch)
    import evaluate  # evaluating reads its files with the same check
    with pytest.raises(DataError, match=twice):
        evaluate.load_data([data, data], ["orig"])
    assert _nothing_written(tmp_path / "out")
    _train(run + ["--data", str(vqa), "--preset", "fft-vqa", "--batch-size", "1"], monkeypatch)  # that one trains


def test_diagnose_refuses_a_chart_path_it_cannot_write_or_no_resamples_before_writing_anything(tmp_path, capsys):
    import diagnose
    preds = tmp_path / "predictions.jsonl"
    preds.write_text(json.dumps(dict(id="a", task="text_heavy", source="s", intervention="orig", probs=[0.6, 0.4],
                                     pred=0, answer=0)) + "\n")
    for chart in ("r.xyz", "radar", str(tmp_path)):
        with pytest.raises(SystemExit):
            diagnose.main(["--chart", str(tmp_path / chart) if chart != str(tmp_path) else chart, str(preds)])
        assert not (tmp_path / "diagnosis.json").exists()
    with pytest.raises(SystemExit):  # no resample: numpy's quantile of nothing was a traceback
        diagnose.main(["--n-boot", "0", str(preds)])
    assert "--n-boot 0: the interval needs at least 1 bootstrap resample" in capsys.readouterr().err
    assert not (tmp_path / "diagnosis.json").exists()
    assert diagnose.main([str(preds)]) is None and (tmp_path / "diagnosis.json").exists()


def test_a_truncated_data_image_is_refused_naming_its_file(tmp_path):
    import perturb
    data = _one_sample_data(tmp_path)
    png = (tmp_path / "img" / "a.png").read_bytes()
    (tmp_path / "img" / "a.png").write_bytes(png[:40])
    with pytest.raises(perturb.DataError, match=f"d.jsonl:1: the image {tmp_path / 'img' / 'a.png'} of sample 'i0' "
                                                f"cannot be decoded"):
        perturb.load_samples(data, decode=True)


def test_evaluate_always_scores_orig_so_the_predictions_can_be_diagnosed(tmp_path):
    import diagnose
    import evaluate
    base = make_tiny("llava", str(tmp_path / "base"))
    rows = evaluate.run(base, [_one_sample_data(tmp_path)], str(tmp_path / "out"), interventions=["uf", "md"], k_facts=1)
    assert [(r["id"], r["intervention"]) for r in rows] == [("i0", "orig"), ("i0", "uf"), ("i0", "md"), ("t0", "orig"),
                                                            ("v0", "orig")]
    assert set(diagnose.diagnose(str(tmp_path / "out" / "predictions.jsonl"))["s"]) == {"orig", "uf", "md"}
