"""Tests of train.py (every preset, export, FSDP2 over two processes, exact resume) and of bench.py's
profile and memory plan, on tiny random-init models of the three families and a few toy samples.
Run all tests: python -m pytest -q test_*.py
"""
import errno
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed.checkpoint  # noqa: F401 (the shards writer the full-disk test breaks)
import transformers

import model as M
import perturb
import profiling
import prompts as P
import train
from perturb import APPLIES, DataError
from model import make_tiny
from tiny import make_parts

FAMILIES = ["llava", "qwen2.5-vl", "instructblip"]


# ---- train.py --------------------------------------------------------------------------------------------

HERE = os.path.dirname(os.path.abspath(__file__))
PRESET_TERMS = {"fft-vqa": (False, False), "fft-aug": (False, False), "kl": (False, True), "js": (False, True),
                "rg": (True, False), "pgd": (True, False), "ours": (True, True)}  # (adversarial, consistency)


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """2 image-heavy, 2 text-heavy and 4 VQA toy samples (one global batch of 8 at the default ratios),
    and tiny models of each family that know the toy words."""
    root = tmp_path_factory.mktemp("toy")
    subprocess.run([sys.executable, "data/toy/prepare.py", "--n-train", "4", "--n-test", "1", "--out", str(root)],
                   check=True, cwd=HERE, capture_output=True)
    rows = [json.loads(line) for line in open(root / "train.jsonl")]
    keep = [r for t, n in (("image_heavy", 2), ("text_heavy", 2), ("vqa", 4)) for r in
            [r for r in rows if r["task"] == t][:n]]
    (root / "mini.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep))
    words = (root / "vocab.txt").read_text().split()
    models = {fam: make_tiny(fam, str(root / fam), words) for fam in FAMILIES}
    return str(root / "mini.jsonl"), models


def _train(argv, monkeypatch):
    """Runs train.main in this process (a process group of one) and returns what it built."""
    env = dict(os.environ)
    monkeypatch.setattr(sys, "argv", ["train.py"] + argv)
    try:
        return train.main(argv)
    finally:
        if torch.distributed.is_initialized():  # a run stopped by an error leaves its group behind
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(env)


def _metrics(folder):
    return [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]


def _weights(folder):
    """The parameters of a saved folder as plain transformers loads them."""
    return dict(transformers.AutoModelForImageTextToText.from_pretrained(folder).named_parameters())


@pytest.mark.parametrize("preset", list(PRESET_TERMS) + ["vanilla"])
def test_each_preset_trains_only_what_it_should(toy, tmp_path, monkeypatch, preset):
    data, models = toy
    out = str(tmp_path / preset)
    _train(["--model", models["llava"], "--data", data, "--out", out, "--preset", preset, "--lr", "1e-3",
            "--eps", "0.05"] + ([] if preset == "vanilla" else ["--max-steps", "2"]), monkeypatch)
    before, after = _weights(models["llava"]), _weights(out)
    assert before.keys() == after.keys()
    frozen = [k for k in before if k.startswith("model.vision_tower.")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)  # the vision tower never changes
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    if preset == "vanilla":
        assert not changed and not _metrics(out)  # no training: the base model, exported for evaluation
        return
    assert any(k.startswith("model.multi_modal_projector.") for k in changed)
    assert any(k.startswith("model.language_model.layers.") for k in changed)
    adversarial, consistent = PRESET_TERMS[preset]
    for row in _metrics(out):
        assert (row["adv"] > 0) == adversarial and (row["cons"] > 0) == consistent and row["sft"] > 0


@pytest.mark.parametrize("fam", FAMILIES)
def test_the_output_folder_is_the_trained_model_for_plain_transformers(toy, tmp_path, monkeypatch, fam):
    data, models = toy
    out = str(tmp_path / fam)
    g = _train(["--model", models[fam], "--data", data, "--out", out, "--max-steps", "2", "--lr", "1e-3"], monkeypatch)
    trained = g["full"]  # the weights the training process held at the end, gathered from its shards
    plain = transformers.AutoModelForImageTextToText.from_pretrained(out).eval()
    state = plain.state_dict()
    assert set(state) <= set(trained) and all(torch.equal(state[k], trained[k]) for k in state)
    base, processor = M.load(models[fam])
    base.load_state_dict(trained)
    batch = P.collate(processor, [perturb.perturb(s, "orig", 0, size=P.image_size(processor))
                                  for s in perturb.load_samples(data)])
    with torch.no_grad():
        assert torch.equal(plain(**M.model_inputs(batch)).logits, base.eval()(**M.model_inputs(batch)).logits)
    frozen = M.FAMILIES[fam]["frozen"]
    original = dict(M.load(models[fam])[0].named_parameters())
    assert all(torch.equal(q, original[n]) for n, q in plain.named_parameters() if n.startswith(frozen))
    if fam == "instructblip":
        assert any(n.startswith("qformer.") for n, _ in plain.named_parameters())


def _one_process_like_two(common, tmp_path, batch, port, steps):
    """train.py as one process with batch 2 * batch and under torchrun as two with batch: the same metrics
    at every step. Returns both runs' metrics."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run([sys.executable] + common + [str(tmp_path / "one"), "--batch-size", str(2 * batch)], check=True,
                   cwd=HERE, env=env, capture_output=True)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(port)] + common + [str(tmp_path / "two"), "--batch-size", str(batch)], cwd=HERE,
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-5000:]
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert len(one) == len(two) == steps
    for a, b in zip(one, two):
        for k in ("loss", "sft", "adv", "cons", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-7), (a["step"], k)
    return one, two


@pytest.mark.parametrize("fam", FAMILIES)
def test_two_processes_train_like_one_and_the_loss_falls(toy, tmp_path, fam):
    """Rank 1 starts on the meta device and receives its shards and buffers from rank 0."""
    data, models = toy
    common = ["train.py", "--model", models[fam], "--data", data, "--max-steps", "6", "--lr", "2e-3",
              "--warmup", "0", "--eps", "0.05", "--out"]
    one, _ = _one_process_like_two(common, tmp_path, 4, 29533 + list(FAMILIES).index(fam), 6)
    assert one[-1]["sft"] < one[0]["sft"] and one[-1]["loss"] < one[0]["loss"]
    w1, w2 = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)


def test_a_killed_run_resumes_with_the_same_losses(toy, tmp_path):
    import signal
    import time
    data, models = toy
    argv = [sys.executable, "train.py", "--model", models["llava"], "--data", data, "--max-steps", "30",
            "--save-every", "3", "--lr", "1e-3", "--eps", "0.05", "--out"]
    subprocess.run(argv + [str(tmp_path / "whole")], check=True, cwd=HERE, capture_output=True)
    run = subprocess.Popen(argv + [str(tmp_path / "cut")], cwd=HERE, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    while not (tmp_path / "cut" / "ckpt-00000006").exists() and run.poll() is None:
        time.sleep(0.01)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert not (tmp_path / "cut" / "model.safetensors").exists()  # it really died before the end
    subprocess.run(argv + [str(tmp_path / "cut"), "--resume"], check=True, cwd=HERE, capture_output=True)
    whole, cut = _metrics(tmp_path / "whole"), _metrics(tmp_path / "cut")
    assert [r["step"] for r in cut] == list(range(30))
    for a, b in zip(whole, cut):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6) and a["lr"] == b["lr"]
    w1, w2 = _weights(tmp_path / "whole"), _weights(tmp_path / "cut")
    assert all(torch.allclose(w1[k], w2[k], atol=1e-6) for k in w1)
    again = subprocess.run(argv + [str(tmp_path / "cut")], cwd=HERE, capture_output=True, text=True)
    assert again.returncode == 1 and "pass --resume" in again.stderr  # a fresh run never deletes checkpoints
    assert (tmp_path / "cut" / "ckpt-00000030").exists()


def test_a_run_resumes_on_another_number_of_processes(toy, tmp_path):
    """Checkpoints are torch.distributed.checkpoint's: one process continues what two saved (2 -> 1), and two
    continue what one saved (1 -> 2), the global batch kept (--batch-size x processes), with the losses of the
    run that never stopped."""
    data, models = toy
    env = dict(os.environ, OMP_NUM_THREADS="1")
    common = ["train.py", "--model", models["llava"], "--data", data, "--max-steps", "4", "--save-every", "2",
              "--lr", "1e-3", "--eps", "0.05", "--no-export", "--out"]
    one = [sys.executable] + common
    two = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29545"] + common

    def run(cmd, out, batch, *extra):
        res = subprocess.run(cmd + [str(out), "--batch-size", str(batch), *extra], cwd=HERE, env=env,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]

    run(one, tmp_path / "one", 8)
    run(two, tmp_path / "two", 4)
    for first, then, cmd, batch in (("two", "2to1", one, 8), ("one", "1to2", two, 4)):
        shutil.copytree(tmp_path / first / "ckpt-00000002", tmp_path / then / "ckpt-00000002")
        run(cmd, tmp_path / then, batch, "--resume")
        assert [r["step"] for r in _metrics(tmp_path / then)] == [2, 3]
        for a, b in zip(_metrics(tmp_path / "one")[2:], _metrics(tmp_path / then)):
            for k in ("loss", "sft", "adv", "cons", "grad_norm"):
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-7), (then, a["step"], k)


def test_a_checkpoint_of_the_earlier_format_is_refused_in_one_line(toy, tmp_path, monkeypatch):
    data, models = toy
    ckpt = tmp_path / "run" / "ckpt-00000002"
    ckpt.mkdir(parents=True)
    (ckpt / "model.rank0.safetensors").write_bytes(b"0")  # what train.py wrote before torch.distributed.checkpoint
    (ckpt / "state.json").write_text(json.dumps({"step": 2, "world": 1, "args": {}, "files": {}}))
    with monkeypatch.context() as m:
        m.setattr(M, "load", _no_model)
        with pytest.raises(SystemExit, match=re.escape(f"error: {ckpt} was written by an earlier train.py, one file "
                                                       f"of shards per process, which this one cannot read")):
            _train(["--model", models["llava"], "--data", data, "--out", str(tmp_path / "run"), "--resume"],
                   monkeypatch)


def _no_model(*a, **k):
    pytest.fail("the model was loaded before the refusal")


def test_resume_skips_a_damaged_checkpoint_and_never_touches_other_folders(toy, tmp_path, monkeypatch, capsys):
    data, models = toy
    out = tmp_path / "run"
    argv = ["--model", models["llava"], "--data", data, "--out", str(out), "--max-steps", "4", "--save-every", "1",
            "--lr", "1e-3", "--eps", "0.05", "--no-export", "--twins", "all"]  # every twin: exact on resume too
    _train(argv, monkeypatch)
    assert sorted(os.listdir(out)) == ["ckpt-00000003", "ckpt-00000004", "metrics.jsonl"]  # the last 2 kept
    whole = _metrics(out)
    shutil.copytree(out / "ckpt-00000003", out / "ckpt-best")  # the user's copy: never chosen, never pruned
    shards = out / "ckpt-00000004" / "__0_0.distcp"
    shards.write_bytes(shards.read_bytes()[:100])  # truncated, as by a full disk or a bad copy
    capsys.readouterr()
    _train(argv + ["--resume"], monkeypatch)
    io = capsys.readouterr()
    assert f"{out}/ckpt-00000004 is damaged (__0_0.distcp has 100 bytes" in io.err
    assert f"resumed from {out}/ckpt-00000003 at step 3" in io.out
    assert sorted(os.listdir(out)) == ["ckpt-00000003", "ckpt-00000004", "ckpt-best", "metrics.jsonl"]
    assert [r["step"] for r in _metrics(out)] == [0, 1, 2, 3]
    assert _metrics(out)[3]["loss"] == pytest.approx(whole[3]["loss"], rel=1e-6)


def test_a_fresh_run_replaces_an_exported_model_only_with_overwrite(toy, tmp_path, monkeypatch):
    data, models = toy
    out = str(tmp_path / "out")
    _train(["--model", models["qwen2.5-vl"], "--data", data, "--out", out, "--preset", "vanilla"], monkeypatch)
    llava = ["--model", models["llava"], "--data", data, "--out", out, "--preset", "vanilla"]
    with pytest.raises(SystemExit, match=r"holds an earlier run \(config.json, model.safetensors\): pass --resume "
                                         r"to continue it, --overwrite to replace it"):
        _train(llava, monkeypatch)
    assert transformers.AutoConfig.from_pretrained(out).model_type == "qwen2_5_vl"  # untouched
    _train(llava + ["--overwrite"], monkeypatch)
    assert set(os.listdir(out)) == set(os.listdir(models["llava"])) | {"metrics.jsonl"}  # no file of qwen's left
    assert transformers.AutoConfig.from_pretrained(out).model_type == "llava"


def test_a_resume_with_other_settings_is_refused_naming_the_difference(toy, tmp_path, monkeypatch):
    data, models = toy
    argv = ["--model", models["llava"], "--data", data, "--out", str(tmp_path / "run"), "--max-steps", "2",
            "--save-every", "1", "--lr", "1e-3", "--eps", "0.05", "--no-export"]
    _train(argv, monkeypatch)
    lines = open(data).read().splitlines()
    reordered = os.path.join(os.path.dirname(data), "reordered.jsonl")  # beside the images it refers to
    open(reordered, "w").write("\n".join(lines[1:] + lines[:1]) + "\n")
    with monkeypatch.context() as m:
        m.setattr(M, "load", _no_model)
        for extra, message in [(["--lr", "1e-4"], "--lr 0.001 then, 0.0001 now"),
                               (["--seed", "1", "--batch-size", "4"],
                                "--seed 2024 then, 1 now; --batch-size x processes x --grad-accum 8 then, 4 now"),
                               (["--max-steps", "3"], "--max-steps 2 then, 3 now"),
                               (["--model", models["qwen2.5-vl"]], f"--model {models['llava']} then, "
                                                                   f"{models['qwen2.5-vl']} now"),
                               (["--data", reordered], "--data sha256 [")]:
            with pytest.raises(SystemExit, match=re.escape(message)):
                _train(argv + extra + ["--resume"], monkeypatch)
        # a checkpoint from before --pgd-scope existed perturbed the whole text: resumable as template only
        state = sorted(tmp_path.glob("run/ckpt-*/state.json"))[-1]
        saved = state.read_text()
        old = json.loads(saved)
        del old["args"]["pgd_scope"]
        state.write_text(json.dumps(old))
        with pytest.raises(SystemExit, match=re.escape("--pgd-scope template then, sample now")):
            _train(argv + ["--resume"], monkeypatch)
        state.write_text(saved)
    _train(argv + ["--resume", "--save-every", "5", "--keep-checkpoints", "3", "--max-bad-steps", "1"], monkeypatch)


@pytest.mark.parametrize("fam", FAMILIES)
def test_pgd_scope_sample_leaves_the_template_clean_and_template_perturbs_it(toy, tmp_path, monkeypatch, fam):
    """What the step perturbs, read from the run itself: image-heavy rows only at their sample's text under the
    default --pgd-scope sample (never the template's head: BOS, USER:, the system prompt), every non-answer text
    position under template (the authors'); text-heavy rows at their image tokens either way."""
    data, models = toy
    masks = {}
    for scope in ("sample", "template"):
        g = _train(["--model", models[fam], "--data", data, "--out", str(tmp_path / scope), "--max-steps", "1",
                    "--no-export", "--pgd-scope", scope], monkeypatch)
        batch = g["batches"](0)[0]
        image = batch["input_ids"] == g["hf_model"].config.image_token_id
        masks[scope] = (train.perturbable(batch, image, scope), batch, image)
    (sample, batch, image), template = masks["sample"], masks["template"][0]
    prompt = batch["attention_mask"].bool() & (batch["labels"] == -100)
    for r, task in enumerate(batch["tasks"]):
        if task == "image_heavy":
            assert sample[r].tolist() == batch["sample_mask"][r].tolist()
            assert template[r].tolist() == (prompt[r] & ~image[r]).tolist()
            head = int((~image[r]).nonzero()[0])  # BOS (InstructBLIP: after its query tokens)
            assert template[r, head] and not sample[r, head] and sample[r].sum() < template[r].sum()
        else:
            assert sample[r].tolist() == template[r].tolist() == (image[r] if task == "text_heavy" else
                                                                  torch.zeros_like(image[r])).tolist()


def test_a_run_that_would_train_nothing_or_start_over_is_refused(toy, tmp_path, monkeypatch):
    data, models = toy
    monkeypatch.setattr(M, "load", _no_model)
    common = ["--model", models["llava"], "--data", data, "--out", str(tmp_path / "out")]
    for extra, message in [(["--max-steps", "0"], "error: --max-steps 0 trains nothing"),
                           (["--max-steps", "-3"], "error: --max-steps -3 trains nothing"),
                           (["--epochs", "0"], "error: --epochs 0 trains nothing"),
                           (["--resume"], f"error: --resume: {tmp_path / 'out'} holds no checkpoint")]:
        with pytest.raises(SystemExit, match=re.escape(message)):
            _train(common + extra, monkeypatch)
    assert not (tmp_path / "out").exists()


def test_bad_flags_and_an_out_that_is_a_file_fail_in_one_line_before_the_model_loads(toy, tmp_path, monkeypatch):
    data, models = toy
    monkeypatch.setattr(M, "load", _no_model)
    a_file = tmp_path / "file"
    a_file.write_text("")
    n = len(perturb.unrelated_facts("train"))
    for extra, message in [(["--k-facts", "0"], f"error: --k-facts 0: UF prepends 1 to {n} facts"),
                           (["--k-facts", str(n + 1)], f"error: --k-facts {n + 1}: UF prepends 1 to {n} facts"),
                           (["--keep-checkpoints", "0"], "error: --keep-checkpoints must be at least 1"),
                           (["--eps", "-0.001"], "error: --eps -0.001: the objective's sizes must be finite"),
                           (["--alpha", "-0.1", "--tau", "0"], "error: --alpha -0.1 --tau 0: the objective's sizes"),
                           (["--lambda-cons", "nan"], "error: --lambda-cons nan: the objective's sizes"),
                           (["--pgd-steps", "-1"], "error: --pgd-steps -1: the objective's sizes"),
                           (["--preset", "fft-aug", "--pgd-step", "sign"], "error: --pgd-step sign --eps-scale none "
                            "shape PGD, and --adv none (--preset fft-aug) runs none"),
                           (["--preset", "rg", "--eps-scale", "std"], "--adv rg (--preset rg) runs none"),
                           (["--ratio-image", "0.8", "--ratio-text", "0.5"], "error: --ratio-image 0.8 --ratio-text "
                            "0.5: shares of a step's originals, each 0 to 1 and together at most 1"),
                           (["--ratio-text", "-0.1"], "error: --ratio-image 0.25 --ratio-text -0.1: shares"),
                           (["--grad-clip", "-1", "--min-lr", "1"], "error: --min-lr 1 --grad-clip -1: lr above 0"),
                           (["--lr", "0", "--warmup", "2"], "error: --lr 0 --warmup 2: lr above 0"),
                           (["--out", str(a_file)], f"error: --out {a_file}: {a_file} is a file"),
                           (["--out", str(a_file / "run")], f"error: --out {a_file / 'run'}: {a_file} is a file")]:
        with pytest.raises(SystemExit, match=re.escape(message)):
            _train(["--model", models["llava"], "--data", data, "--out", str(tmp_path / "out")] + extra, monkeypatch)


def test_a_full_disk_during_a_checkpoint_stops_in_one_line_and_the_run_resumes(toy, tmp_path, monkeypatch):
    data, models = toy
    out = tmp_path / "run"
    argv = ["--model", models["llava"], "--data", data, "--out", str(out), "--max-steps", "3", "--save-every", "1",
            "--lr", "1e-3", "--no-export"]
    write = torch.distributed.checkpoint.filesystem._write_item

    def full_disk(*a, **k):  # what writing the shards raises when the disk fills
        if "ckpt-00000002" in str(getattr(a[1], "name", "")):  # the stream of the shards file
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(*a, **k)

    with monkeypatch.context() as m:
        m.setattr(torch.distributed.checkpoint.filesystem, "_write_item", full_disk)
        with pytest.raises(SystemExit, match=re.escape(f"error: {out}/.tmp-ckpt-00000002: no space left on device")):
            _train(argv, monkeypatch)
    assert "ckpt-00000001" in os.listdir(out) and "ckpt-00000002" not in os.listdir(out)
    _train(argv + ["--resume"], monkeypatch)
    assert [r["step"] for r in _metrics(out)] == [0, 1, 2]
    assert sorted(os.listdir(out)) == ["ckpt-00000002", "ckpt-00000003", "metrics.jsonl"]


def test_bad_training_data_fails_before_training_naming_the_line(toy, tmp_path):
    data, models = toy
    lines = open(data).read().splitlines()
    lines[2] = lines[2].replace('"answer": ', '"answer": 9, "x": ')
    bad = os.path.join(os.path.dirname(data), "bad.jsonl")  # beside the images it refers to
    open(bad, "w").write("\n".join(lines) + "\n")
    res = subprocess.run([sys.executable, "train.py", "--model", models["llava"], "--data", bad, "--out",
                          str(tmp_path / "out")], cwd=HERE, capture_output=True, text=True)
    assert res.returncode != 0 and f"error: {bad}:3: answer 9 is not among" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "out").exists()


def test_non_finite_losses_skip_steps_and_then_stop(toy, tmp_path, monkeypatch):
    data, models = toy
    out = str(tmp_path / "nan")
    with pytest.raises(SystemExit, match="2 non-finite losses in a row"):
        _train(["--model", models["llava"], "--data", data, "--out", out, "--max-steps", "6", "--lr", "1e30",
                "--warmup", "0", "--max-bad-steps", "2"], monkeypatch)
    rows = _metrics(out)
    assert len(rows) >= 1 and all(math.isfinite(r["loss"]) for r in rows)
    assert not os.path.exists(os.path.join(out, "model.safetensors"))


def test_accumulation_and_activation_checkpointing_leave_the_step_unchanged(toy, tmp_path, monkeypatch):
    data, models = toy
    common = ["--model", models["llava"], "--data", data, "--max-steps", "3", "--lr", "1e-3", "--eps", "0.05"]
    _train(common + ["--out", str(tmp_path / "plain")], monkeypatch)
    _train(common + ["--out", str(tmp_path / "accum"), "--batch-size", "4", "--grad-accum", "2"], monkeypatch)
    g = _train(common + ["--out", str(tmp_path / "ckpt"), "--activation-checkpointing"], monkeypatch)
    assert g["hf_model"].is_activation_checkpointing
    plain = _metrics(tmp_path / "plain")
    for other in ("accum", "ckpt"):
        for a, b in zip(plain, _metrics(tmp_path / other)):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"],
                                                                                                       rel=1e-4)


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_any_batch_size_trains_every_task_in_its_ratio(toy, tmp_path, monkeypatch, batch):
    data, models = toy
    g = _train(["--model", models["llava"], "--data", data, "--out", str(tmp_path), "--batch-size", str(batch),
                "--preset", "vanilla", "--no-export"], monkeypatch)
    seen = {"image_heavy": 0, "text_heavy": 0, "vqa": 0}
    for step in range(24):
        for s in g["batches"].originals(step):
            seen[s["task"]] += 1
        n = (step + 1) * batch  # originals so far, at the default ratios 0.25 / 0.25 / 0.5
        assert abs(seen["image_heavy"] - n / 4) < 2 and abs(seen["text_heavy"] - n / 4) < 2
        assert abs(seen["vqa"] - n / 2) < 2
        if n % 4 == 0:
            assert seen == {"image_heavy": n // 4, "text_heavy": n // 4, "vqa": n // 2}


def test_a_batch_of_one_trains(toy, tmp_path, monkeypatch, capsys):
    data, models = toy
    out = str(tmp_path / "one")
    _train(["--model", models["llava"], "--data", data, "--out", out, "--batch-size", "1", "--max-steps", "4",
            "--eps", "0.05", "--no-export"], monkeypatch)
    rows = _metrics(out)
    assert len(rows) == 4 and all(r["sft"] > 0 for r in rows)
    assert sum(r["adv"] > 0 for r in rows) == 2  # 1 image-heavy and 1 text-heavy original in 4: the VQA half has none
    assert "image_heavy 0.25, text_heavy 0.25, vqa 0.5 (+ twins)" in capsys.readouterr().out
    for flag in ("--batch-size", "--grad-accum"):
        with pytest.raises(SystemExit, match="must be at least 1"):
            _train(["--model", models["llava"], "--data", data, "--out", str(tmp_path / "zero"), flag, "0"],
                   monkeypatch)


@pytest.mark.parametrize("shortcuts", ["on", "off"])
def test_two_processes_with_a_batch_of_one_train_like_one(toy, tmp_path, shortcuts):
    """Rank 1's second original is VQA while rank 0's is image-heavy: both must run the PGD passes, on the exact
    shortcuts' path and on the plain one. With every twin, the ranks hold different numbers of rows and consistency
    pairs, normalised by the global counts."""
    data, models = toy
    common = ["train.py", "--model", models["llava"], "--data", data, "--max-steps", "2", "--eps", "0.05",
              "--ratio-image", "0.5", "--ratio-text", "0.25", "--twins", "all", "--no-export", "--shortcuts",
              shortcuts, "--out"]
    _one_process_like_two(common, tmp_path, 1, 29541 + (shortcuts == "off") * 10, 2)


def test_an_epoch_ends_when_the_smallest_pool_has_been_seen_once(toy, tmp_path, monkeypatch, capsys):
    data, models = toy
    train = os.path.join(os.path.dirname(data), "train.jsonl")  # 4 samples of each task
    common = ["--model", models["llava"], "--data", train, "--batch-size", "2", "--no-export", "--out"]
    g = _train(common + [str(tmp_path / "a"), "--preset", "vanilla"], monkeypatch)
    # per step 2 originals: image-heavy and text-heavy 2 * 0.25 each, VQA 2 * 0.5
    assert g["schedule"].steps_per_epoch == math.ceil(4 / (2 * 0.5)) == 4
    assert "one pass over the smallest pool takes 4 steps, over the largest 8" in capsys.readouterr().out
    vqa = {s["id"] for step in range(4) for s in g["batches"].originals(step) if s["task"] == "vqa"}
    assert len(vqa) == 4  # the epoch saw every VQA sample
    g = _train(common + [str(tmp_path / "b"), "--preset", "vanilla", "--epoch-end", "largest"], monkeypatch)
    assert g["schedule"].steps_per_epoch == math.ceil(4 / (2 * 0.25)) == 8
    images = {s["id"] for step in range(8) for s in g["batches"].originals(step) if s["task"] == "image_heavy"}
    assert len(images) == 4


def test_progress_writes_plain_lines_to_a_log_file_and_one_live_line_to_a_terminal(monkeypatch):
    import io
    import types

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    clock = [0.0]
    monkeypatch.setattr(profiling, "time", types.SimpleNamespace(time=lambda: clock[0]))
    log, terminal = io.StringIO(), Terminal()
    for stream in (log, terminal):
        monkeypatch.setattr(sys, "stderr", stream)
        monkeypatch.setattr(profiling, "_last_print", [0.0])
        for done in range(1, 11):  # a step every 10 s from t0 = 100: 0.1 steps/s
            clock[0] = 100.0 + 10 * done
            profiling.progress(done, 10, 100.0, "steps", "| loss 0.5")
    # a file: the first line, then one per 30 s, and the last
    assert log.getvalue() == ("1/10 steps | 0.1 steps/s | ETA 1:30 | loss 0.5\n"
                              "4/10 steps | 0.1 steps/s | ETA 1:00 | loss 0.5\n"
                              "7/10 steps | 0.1 steps/s | ETA 0:30 | loss 0.5\n"
                              "10/10 steps | 0.1 steps/s | ETA 0:00 | loss 0.5\n")
    out = terminal.getvalue()
    assert out.count("\r") == 10 and out.count("\n") == 1 and out.endswith("\r10/10 steps | 0.1 steps/s | ETA "
                                                                         "0:00 | loss 0.5\n")


# ---- the authors' protocol as flags: every twin, the perturbation sources, their per-model settings -------

def _training_interventions(task):
    """What a task's twins may be, from APPLIES alone: every intervention of the task that changes the sample
    (orig does not; rp is a text-heavy original's own random pixels)."""
    return {n for n, tasks in APPLIES.items() if task in tasks} - {"orig", "rp"}


def test_twins_all_makes_each_intervention_once_per_original_and_pairs_each(toy, tmp_path, monkeypatch):
    data, models = toy
    g = _train(["--model", models["llava"], "--data", data, "--out", str(tmp_path), "--preset", "vanilla",
                "--no-export", "--twins", "all", "--batch-size", "3", "--grad-accum", "2"], monkeypatch)
    for step in range(3):
        originals = g["batches"].originals(step)
        for m, batch in enumerate(g["batches"](step)):
            part = originals[m::2]  # one process: micro-step m takes every second original
            expected = [(s["id"], f"{s['id']}/{n}") for s in part for n in _training_interventions(s["task"])]
            ids, n = batch["ids"], len(part)
            assert ids[:n] == [s["id"] for s in part] and sorted(ids[n:]) == sorted(t for _, t in expected)
            assert sorted((ids[o], ids[t]) for o, t in batch["pairs"]) == sorted(expected)
            # a row of each id (a small pool can put one original twice in a micro-batch: the same rows twice)
            row, pixels, tokens = {i: r for r, i in enumerate(ids)}, batch["pixel_values"], batch["input_ids"]
            for s in part:
                o = row[s["id"]]
                if s["task"] == "image_heavy":  # UF and MD change the text only
                    for name in ("uf", "md"):
                        t = row[f"{s['id']}/{name}"]
                        assert torch.equal(pixels[t], pixels[o])
                        assert batch["attention_mask"][t].sum() > batch["attention_mask"][o].sum()
                if s["task"] == "text_heavy":  # RI, FB and FW change the image only
                    fb, fw, ri = (row[f"{s['id']}/{name}"] for name in ("fb", "fw", "ri"))
                    assert all(torch.equal(tokens[t], tokens[o]) for t in (fb, fw, ri))
                    assert pixels[fb].unique().numel() == pixels[fw].unique().numel() == 3  # one value a channel
                    assert (pixels[fw] > pixels[fb]).all() and not torch.equal(pixels[ri], pixels[o])
            # the global counts: every heavy row is attacked; each original against each twin, its own
            # adversarial copy once and each twin's adversarial copy
            answers = (batch["labels"] != -100).sum(1).tolist()
            heavy = [r for r, task in enumerate(batch["tasks"]) if task != "vqa"]
            twins = {r: len(_training_interventions(s["task"])) for r, s in enumerate(part) if s["task"] != "vqa"}
            assert train.token_counts(batch, g["hf_model"].config.image_token_id, g["args"]).tolist() == \
                [sum(answers), sum(answers[r] for r in heavy), sum(answers[o] * (2 * k + 1) for o, k in twins.items())]
            pairs = train.consistency_pairs(batch, heavy)
            assert len(pairs) == len(set(pairs)) == sum(2 * k + 1 for k in twins.values())


def test_facts_file_feeds_uf_whole_with_or_without_replacement(toy, tmp_path, monkeypatch):
    data, models = toy
    facts = ["Fact one is here .", "Fact two is here .", "Fact three is here ."]
    path, empty = tmp_path / "facts.txt", tmp_path / "empty.txt"
    path.write_text("\n" + "\n\n".join(facts) + "\n  \n")  # blank lines are skipped
    empty.write_text("\n \n")
    common = ["--model", models["llava"], "--data", data, "--preset", "vanilla", "--no-export", "--twins", "all"]
    with monkeypatch.context() as m:
        m.setattr(M, "load", _no_model)
        for extra, message in [
                (["--facts-file", str(path), "--k-facts", "4"],
                 f"error: --k-facts 4: UF prepends 1 to 3 facts ({path}; more with --facts-replacement)"),
                (["--facts-file", str(empty)], f"error: --facts-file {empty}: no facts"),
                (["--facts-file", str(tmp_path / "nothing.txt")],
                 f"error: --facts-file {tmp_path / 'nothing.txt'}: cannot read the facts file")]:
            with pytest.raises(SystemExit, match=re.escape(message)):
                _train(common + ["--out", str(tmp_path / "no")] + extra, monkeypatch)
    image = next(s for s in perturb.load_samples(data) if s["task"] == "image_heavy")
    for k, replace in ((3, False), (5, True)):
        g = _train(common + ["--out", str(tmp_path / f"k{k}"), "--facts-file", str(path), "--k-facts", str(k)]
                   + ["--facts-replacement"] * replace, monkeypatch)
        draws = set()
        for step in range(20):
            uf = dict(g["batches"].twins_of(image, step))[f"{image['id']}/uf"]
            prefix = uf["question"].removesuffix(" " + image["question"])
            used = re.findall(r"Fact \w+ is here \.", prefix)
            assert " ".join(used) == prefix and len(used) == k and set(used) <= set(facts)
            assert replace or sorted(used) == sorted(facts)  # without replacement: each fact once
            draws.add(tuple(used))
        assert len(draws) > 1
    # the length pre-check's bound: with replacement the longest fact k times, a draw UF can make
    longer = ["A fact longer than the other one .", "Short fact ."]
    bound = perturb.longest(image, "uf", longer, k=4, replace=True)["question"]
    assert bound == " ".join([longer[0]] * 4) + " " + image["question"]
    with pytest.raises(ValueError, match="uf needs 4 facts that mention no option of sample .*, has 2"):
        perturb.longest(image, "uf", longer, k=4)
    # evaluation takes the same file whole, whichever pool
    assert set(perturb.perturb(image, "uf", 0, pool="eval", facts=facts, k=3)["question"].split(" . ")[:3]) == \
        {f.removesuffix(" .") for f in facts}


def test_canvas_size_sets_the_canvases_and_random_pixels(toy, tmp_path, monkeypatch):
    data, models = toy
    seen, collate = [], P.collate
    monkeypatch.setattr(P, "collate", lambda processor, rows, **k: seen.extend(rows) or collate(processor, rows, **k))
    default = P.image_size(M.load_processor(models["llava"]))
    for flag, side in (([], default), (["--canvas-size", "20"], 20)):
        g = _train(["--model", models["llava"], "--data", data, "--out", str(tmp_path / str(side)), "--preset",
                    "vanilla", "--no-export", "--twins", "all"] + flag, monkeypatch)
        seen.clear()
        g["batches"](0)
        text = [r for r in seen if r["task"] == "text_heavy" and r["intervention"] != "ri"]
        assert sorted(r["intervention"] for r in text) == ["fb", "fb", "fw", "fw", "orig", "orig"]
        assert {r["image"].size for r in text} == {(side, side)}
    assert default != 20


AUTHORS = {  # their configs/model_train/<model>/args_full_{KL,JS}_PGD.yaml, read for this test (train.PAPER says which)
    "llava-1.5-7b": dict(eps=1e-3, pgd_steps=2, lambda_cons=0.01, lr=2e-5, ratio_image=0.25, ratio_text=0.25),
    "instructblip-vicuna-7b": dict(eps=0.05, pgd_steps=4, lambda_cons=0.01, lr=2e-5, ratio_image=0.25,
                                   ratio_text=0.25),
    "qwen2.5-vl-3b": dict(eps=0.01, pgd_steps=2, lambda_cons=0.001, lr=1e-5, ratio_image=0.25, ratio_text=0.25),
    "qwen2.5-vl-7b": dict(eps=1e-3, pgd_steps=1, lambda_cons=0.001, lr=1e-5, ratio_image=0.125, ratio_text=0.125),
}


def _parse_flags(line):
    """{'eps': 0.001, 'facts_replacement': True, ...} from '--eps 0.001 --facts-replacement ...'."""
    out, words = {}, line.split()
    while words:
        name = words.pop(0).removeprefix("--").replace("-", "_")
        value = True if not words or words[0].startswith("--") else words.pop(0)
        for kind in (int, float):
            try:
                value = kind(value) if value is not True else value
                break
            except ValueError:
                pass
        out[name] = value
    return out


def test_paper_defaults_are_what_help_prints_and_the_run_records_and_explicit_flags_win(toy, tmp_path, monkeypatch,
                                                                                       capsys):
    data, models = toy
    with pytest.raises(SystemExit):
        _train(["--help"], monkeypatch)
    shown = capsys.readouterr().out
    printed = {}
    for model, row in AUTHORS.items():
        printed[model] = _parse_flags(re.search(rf"^  {re.escape(model)}: (--.*)$", shown, re.M).group(1))
        assert printed[model] == dict(model=model, **row, twins="all", facts_replacement=True, canvas_size=336,
                                      prompt="authors", pgd_scope="template")
    out = tmp_path / "run"
    _train(["--paper-defaults", "llava-1.5-7b", "--model", models["llava"], "--data", data, "--out", str(out),
            "--max-steps", "1", "--save-every", "1", "--no-export", "--lr", "1e-3"], monkeypatch)
    args = json.load(open(out / "ckpt-00000001" / "state.json"))["args"]
    assert args["model"] == models["llava"] and args["lr"] == 1e-3  # flags given explicitly win
    assert {k: args[k] for k in printed["llava-1.5-7b"] if k not in ("model", "lr")} == \
        {k: v for k, v in printed["llava-1.5-7b"].items() if k not in ("model", "lr")}  # (another family's: refused)
    assert _metrics(out)[0]["lr"] > 0


# ---- bench.py: profile, compute floor, memory plan (what it measures is never asserted as a time) -------

def test_profile_times_every_phase_without_changing_the_step(toy, tmp_path, monkeypatch):
    data, models = toy
    common = ["--model", models["llava"], "--data", data, "--max-steps", "2", "--lr", "1e-3", "--eps", "0.05",
              "--pgd-steps", "3", "--save-every", "0", "--no-export"]
    _train(common + ["--out", str(tmp_path / "plain")], monkeypatch)
    _train(common + ["--out", str(tmp_path / "profiled"), "--profile"], monkeypatch)
    plain, profiled = _metrics(tmp_path / "plain"), _metrics(tmp_path / "profiled")
    for a, b in zip(plain, profiled):
        assert a["loss"] == b["loss"] and a["tokens"] == b["tokens"] > 0 and "phases" not in a
    for m in profiled:
        assert set(m["phases"]) == {"data", "embed", "noise", "prefix", "pgd1", "pgd2", "pgd3", "forward",
                                    "backward", "optimizer"} and all(v > 0 for v in m["phases"].values())
        assert m["peak_mem"] > 2**20
    assert sum(profiled[0]["phases"].values()) <= profiled[0]["time"]  # laps partition the step
    assert os.listdir(tmp_path / "profiled") == ["metrics.jsonl"]  # --save-every 0 --no-export: nothing else
    mini = [json.loads(line) for line in open(data)]  # 4 image/text originals + 4 twins + 4 VQA rows
    _, processor = M.load(models["llava"])
    rows = [perturb.perturb(s, "orig", 0, size=P.image_size(processor)) for s in perturb.load_samples(data)]
    originals = int(P.collate(processor, rows, train=True)["attention_mask"].sum())
    assert len(mini) == 8 and profiled[0]["tokens"] > originals  # the twins' tokens count too


def test_the_compute_floor_counts_row_passes():
    import bench
    # fft-aug at the paper's mix: B originals + B/2 twins, forward 1 + backward 2 per row = 4.5 B
    assert bench.floor("fft-aug", 2) == 1.0 and bench.floor("js", 2) == bench.floor("kl", 2) == 1.0
    assert bench.floor("fft-vqa", 2) == pytest.approx(3 / 4.5)  # B VQA rows, no twins
    assert bench.floor("rg", 2) == pytest.approx((4.5 + 3 * 1.0) / 4.5)  # + one pass over the B perturbed rows
    # + T PGD steps over those B rows, forward 1 + backward w.r.t. delta 1
    assert bench.floor("ours", 2) == bench.floor("pgd", 2) == pytest.approx((4.5 + 3 + 2 * 2) / 4.5)
    assert bench.floor("ours", 3) - bench.floor("ours", 2) == pytest.approx(2 / 4.5)
    # every twin: B/4 image-heavy originals with 2 twins, B/4 text-heavy with 3, so 2.25 B rows, 1.75 B perturbed
    assert bench.floor("fft-aug", 2, twins="all") == pytest.approx(3 * 2.25 / 4.5)
    assert bench.floor("ours", 2, twins="all") == pytest.approx((3 * 2.25 + 3 * 1.75 + 2 * 2 * 1.75) / 4.5)


def test_the_memory_plan_is_the_published_architecture_sharded_as_fsdp2_does():
    import bench
    world = 4
    r = bench.plan("llava-1.5-7b", world, rows=20, length=700)
    assert r["total"] == 7_063_427_072  # llava-hf/llava-1.5-7b-hf's parameter count
    config, _ = make_parts("llava", (), **bench.ARCHS["llava-1.5-7b"])
    with torch.device("meta"):
        m = transformers.LlavaForConditionalGeneration(config)
    # FSDP2 splits every tensor on dim 0 into world chunks; rank 0 holds the first (largest) one
    shard = {n: -(-q.shape[0] // world) * q[0].numel() for n, q in m.named_parameters()}
    trained = [n for n in shard if not n.startswith("model.vision_tower.")]
    assert r["params"] == 4 * sum(shard.values()) and r["grads"] == 4 * sum(shard[n] for n in trained)
    assert r["adam"] == 2 * r["grads"]
    embed = m.model.language_model.embed_tokens.weight.numel()
    assert r["unit"] > 2 * embed  # the root unit: embedding table + lm head (+ projector) in bf16
    assert bench.plan("llava-1.5-13b", 8, 20, 700)["total"] == pytest.approx(13.35e9, rel=1e-3)


def test_the_lora_memory_plan_adapts_the_language_models_projections_and_trains_the_projector():
    import bench
    d, r, base = bench.ARCHS["llava-1.5-7b"], 16, 7_063_427_072
    h, inter = d["hidden"], d["intermediate"]
    linears = [(h, h)] * 4 + [(h, inter)] * 2 + [(inter, h)]  # (in, out) of q, k, v, o, gate, up, down
    lora = d["layers"] * sum(r * (i + o) for i, o in linears)  # A (r, in) and B (out, r) per targeted Linear
    projector = [(d["vision_hidden"], h), (h, h)]  # two Linears with biases
    trained = lora + sum(i * o + o for i, o in projector)
    one = bench.plan("llava-1.5-7b", 1, rows=20, length=700, lora=r)
    assert one["total"] == base + lora and one["trained"] == trained  # no adapter elsewhere (CLIP has q/k/v too)
    assert one["params"] == 2 * (one["total"] - trained) + 4 * trained  # frozen in bf16, trained in fp32
    assert one["grads"] == 4 * trained and one["adam"] == 8 * trained
    assert one["gpu"] < 24 * 2**30  # the claim: a 7B LoRA run fits one 24 GB GPU
    world = 4  # every tensor split on dim 0 into ceil(n / world) rows, rank 0 holding the first chunk
    shard = (d["layers"] * sum(-(-r // world) * i + -(-o // world) * r for i, o in linears)
             + sum(-(-o // world) * (i + 1) for i, o in projector))
    assert bench.plan("llava-1.5-7b", world, rows=20, length=700, lora=r)["grads"] == 4 * shard


def test_bench_times_each_preset_on_the_same_batches(tmp_path, capsys):
    import bench
    bench.main(["--arch", "tiny", "--presets", "fft-aug", "ours", "--extra-pgd-steps", "1", "3", "--steps", "1",
                "--out", str(tmp_path), "--plan"])
    results = json.load(open(tmp_path / "speed-tiny.json"))
    assert list(results) == ["fft-aug", "ours", "ours T=1", "ours T=3", "ours twins=all", "ours shortcuts=off",
                             "ours --lora 16"]
    assert results.pop("ours --lora 16")["floor"] is False  # no floor: LoRA's backward skips most weight gradients
    share = results["ours"]["share"]  # the part of the attacked rows' positions PGD ran over: image-heavy rows
    assert 0.5 < share < 1 and results["ours shortcuts=off"]["share"] == results["fft-aug"]["share"] == 1
    assert results["ours"]["final"] and not results["ours shortcuts=off"]["final"]  # no checkpointing on CPU
    assert [results[k]["floor"] for k in results] == [
        bench.floor("fft-aug", 2), *(bench.floor("ours", t, share=share, final=True) for t in (2, 1, 3)),
        bench.floor("ours", 2, twins="all", share=results["ours twins=all"]["share"], final=True),
        bench.floor("ours", 2)]
    assert bench.floor("ours", 2, share=share, final=True) < bench.floor("ours", 2, share=share) < \
        bench.floor("ours", 2) == 11.5 / 4.5  # floor's docstring units
    assert not any(k.startswith("pgd") and v for k, v in results["fft-aug"]["phases"].items())
    assert results["ours T=3"]["phases"]["pgd3"] > 0 and results["ours"]["phases"]["pgd3"] == 0
    tokens = {k: r["tokens"] * r["step"] for k, r in results.items()}  # the same batches: the same tokens
    assert len({round(t) for k, t in tokens.items() if k != "ours twins=all"}) == 1
    assert tokens["ours twins=all"] > tokens["ours"]  # the same originals with more twins
    out = capsys.readouterr().out
    assert "| fft-aug |" in out and "| 1.00 | 1.00 | 1.00 |" in out and "each extra PGD step" in out


def test_instruction_samples_train_on_their_reply_and_are_never_scored(toy, tmp_path, monkeypatch):
    import evaluate
    data, models = toy
    rows = [json.loads(line) for line in open(data)]
    image = next(r["image"] for r in rows if r["image"])
    free = [dict(id=f"chat-{i}", task="vqa", image=image, question="What is in the image ?", options=None,
                 answer="the dots are red", source="chat") for i in range(4)]
    path = os.path.join(os.path.dirname(data), "chat.jsonl")  # beside the toy images
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows + free)
    samples = perturb.load_samples(path)
    m, p = M.load(models["llava"])
    batch = P.collate(p, [samples[-1]])
    answer = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert p.tokenizer.convert_ids_to_tokens(answer) == ["the", "dots", "are", "red", "</s>"]
    assert perturb.render(samples[-1]) == "What is in the image ?"
    jobs, _ = evaluate.load_data([path], list(APPLIES))
    assert len(jobs) > 0 and not any(s["source"] == "chat" for s, _ in jobs)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(dict(free[0], task="text_heavy", image=None)) + "\n")
    with pytest.raises(DataError, match=f"{bad}:1: options null needs task vqa"):
        perturb.load_samples(str(bad))
    out = str(tmp_path / "run")
    _train(["--model", models["llava"], "--data", path, "--out", out, "--max-steps", "2", "--preset", "fft-vqa"],
           monkeypatch)
    assert len(_metrics(out)) == 2 and all(r["sft"] > 0 for r in _metrics(out))


# ---- --max-length: measured before the model loads -------------------------------------------------------

@pytest.fixture(scope="module")
def processors(toy, tmp_path_factory):
    """The processors of the toy models and of tiny checkpoints with the real tokenizers and image processors."""
    from hub.build import make_tiny_real
    from hub.qwen import make_tiny_qwen
    root = tmp_path_factory.mktemp("real")
    folders = dict(toy[1], **{"real-llava": make_tiny_real("llava", str(root / "llava")),
                              "real-instructblip": make_tiny_real("instructblip", str(root / "instructblip")),
                              "real-qwen2.5-vl": make_tiny_qwen(str(root / "qwen"))})
    return {name: M.load_processor(folder) for name, folder in folders.items()}


@pytest.mark.parametrize("name", FAMILIES + ["real-llava", "real-instructblip", "real-qwen2.5-vl"])
def test_n_tokens_is_the_length_collate_gives(processors, name):
    from PIL import Image
    p = processors[name]
    side = P.image_size(p)
    photo = Image.new("RGB", (333, 150), (200, 10, 10))  # not square: Qwen's image tokens follow its shape
    image = dict(id="img", task="image_heavy", image=photo, question="What is shown in this picture ?",
                 options=["cat", "dog", "car"], answer=2, source="t", facts={"0": "This is a dog in a field ."})
    text = dict(id="txt", task="text_heavy", image=None, question="What color is the sky ?", options=["red", "blue"],
                answer=1, source="t")
    chat = dict(id="chat", task="vqa", image=photo, question="What is in the image ?", options=None,
                answer="a red square on a plain background", source="t")
    rows = [image, perturb.perturb(image, "uf", 0, pool="train"), perturb.perturb(image, "md", 1, pool="train"),
            perturb.perturb(text, "orig", 0, size=side), perturb.perturb(text, "fb", 0, size=side), chat]
    for s in rows:
        for train in (True, False):
            ids = P.collate(p, [s], train=train)["input_ids"][0]
            assert P.n_tokens(p, s, s["image"].size, train) == len(ids), (s["id"], s["intervention"], train)
        if not name.endswith("instructblip"):  # LLaVA and Qwen expand a placeholder; InstructBLIP prepends
            assert P.n_image_tokens(p, s["image"].size) == int((ids == p.image_token_id).sum())
        else:
            assert P.n_image_tokens(p, s["image"].size) == p.num_query_tokens
    if name == "real-qwen2.5-vl":
        assert P.n_image_tokens(p, (333, 150)) == 12 * 5 != P.n_image_tokens(p, (side, side))  # 28 px per token


def _collated_lengths(processor, samples):
    return [P.collate(processor, [perturb.perturb(s, "orig", 0, size=P.image_size(processor))])["input_ids"].shape[1]
            for s in samples]


def test_a_twin_past_max_length_stops_the_run_before_the_model_loads(toy, tmp_path, monkeypatch):
    data, models = toy
    samples = perturb.load_samples(data)
    fits = max(_collated_lengths(M.load_processor(models["llava"]), samples))  # every original fits
    monkeypatch.setattr(M, "load", _no_model)
    with pytest.raises(SystemExit) as e:
        _train(["--model", models["llava"], "--data", data, "--out", str(tmp_path / "out"), "--max-length", str(fits)],
               monkeypatch)
    msg = str(e.value)
    assert msg.startswith(f"error: --max-length {fits}: 2 of the 8 samples can become longer rows in training, e.g. "
                          f"sample 'toy-train-img-0000") and "\n" not in msg, msg
    assert re.search(rf"of {re.escape(data)}, as its uf twin: \d+ tokens with its answer, \d+% of them image tokens",
                     msg) and "lower --k-facts" in msg, msg
    assert not (tmp_path / "out").exists()


def test_a_run_at_a_max_length_every_row_fits_trains(toy, tmp_path, monkeypatch):
    data, models = toy
    with monkeypatch.context() as m:
        m.setattr(M, "load", _no_model)
        with pytest.raises(SystemExit) as e:
            _train(["--model", models["qwen2.5-vl"], "--data", data, "--out", str(tmp_path / "no"), "--max-length", "50"],
                   monkeypatch)
    longest = max(map(int, re.findall(r"(\d+) tokens with its answer", str(e.value))))
    out = str(tmp_path / "out")
    _train(["--model", models["qwen2.5-vl"], "--data", data, "--out", out, "--max-length", str(longest),
            "--max-steps", "2", "--no-export"], monkeypatch)
    assert len(_metrics(out)) == 2


def test_a_row_longer_than_measured_stops_in_one_line_naming_the_sample(toy, tmp_path, monkeypatch):
    """collate's exact check stays behind the estimate: should it miss a row, the run stops with a line, not a
    traceback."""
    data, models = toy
    monkeypatch.setattr(P, "lengths", lambda processor, samples, sizes, train=True, style="ours": [1] * len(samples))
    with pytest.raises(SystemExit, match=r"^error: sample '[^']+'.*: \d+ tokens with its answer .* more than "
                                         r"max_length=30; truncating would cut the answer \(raise max_length\)$"):
        _train(["--model", models["llava"], "--data", data, "--out", str(tmp_path / "out"), "--max-length", "30",
                "--max-steps", "1"], monkeypatch)
