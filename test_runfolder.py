"""Tests of the run folder (checkpoint.py) under misuse (issue 26): an export replaces the earlier one of the other
kind, one run at a time holds --out, an adapter refuses a base changed since its export, and --overwrite keeps
what evaluate.py wrote. On test_train.py's tiny models and toy samples.
Run all tests: python -m pytest -q test_*.py
"""
import json
import os
import re
import shutil
import subprocess
import sys

import huggingface_hub
import pytest

import checkpoint
import evaluate
import model as M
from checkpoint import RunError
from test_train import _no_model, _train, toy  # noqa: F401

TINY = ["--max-steps", "2", "--save-every", "2", "--lr", "1e-3", "--eps", "0.05"]


def _kinds(out):
    """Which exports --out holds: a model (config.json), an adapter (adapter_config.json), a --merge run's adapter/."""
    return {k for k, f in (("model", "config.json"), ("adapter", "adapter_config.json"), ("merge", "adapter"))
            if os.path.exists(os.path.join(out, f))}


def test_an_export_replaces_the_earlier_export_of_the_other_kind(toy, tmp_path, monkeypatch):
    data, models = toy
    out = str(tmp_path / "run")
    lora = ["--model", models["llava"], "--data", data, "--out", out, "--lora", "4"] + TINY
    _train(lora, monkeypatch)
    assert _kinds(out) == {"adapter"}
    _train(lora + ["--resume", "--merge"], monkeypatch)  # the same run exported merged: no adapter left on top
    assert _kinds(out) == {"model", "merge"} and M.adapter_base(out) is None
    _train(lora + ["--resume"], monkeypatch)  # and back: no merged model beside the adapter
    assert _kinds(out) == {"adapter"}
    full = ["--model", models["llava"], "--data", data, "--out", out] + TINY
    _train(full + ["--overwrite", "--no-export"], monkeypatch)  # a full run over the adapter, cut before its export
    _train(full + ["--resume"], monkeypatch)
    assert _kinds(out) == {"model"} and M.adapter_base(out) is None  # evaluate.py --model OUT scores this run
    assert not os.path.exists(os.path.join(out, "adapter_model.safetensors"))


# A run holding --out, as train.py's and evaluate.py's rank 0 do (checkpoint.hold): an exclusive flock of OUT/.lock
HOLD = """import fcntl, os, sys, time
os.makedirs(sys.argv[1])
f = open(os.path.join(sys.argv[1], ".lock"), "w")
fcntl.flock(f, fcntl.LOCK_EX)
f.write(f"pid {os.getpid()} on this host")
f.flush()
print("held", flush=True)
time.sleep(300)
"""


def test_a_second_run_into_a_held_folder_is_refused_and_a_killed_holders_lock_blocks_nobody(toy, tmp_path,
                                                                                             monkeypatch):
    data, models = toy
    out = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, out], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        held = re.escape(f"{out}: another run holds this folder (pid {holder.pid} on ")
        argv = ["--model", models["llava"], "--data", data, "--out", out] + TINY
        with monkeypatch.context() as m:
            m.setattr(M, "load", _no_model)
            with pytest.raises(SystemExit, match="^error: " + held):
                _train(argv, monkeypatch)
            test = os.path.join(os.path.dirname(data), "test.jsonl")
            with pytest.raises(RunError, match="^" + held):
                evaluate.run(models["llava"], [test], out)
        assert sorted(os.listdir(out)) == [".lock"]  # nothing written
    finally:
        holder.kill()  # as a crash would: the file stays, the kernel drops the lock
        holder.wait()
    assert os.path.exists(os.path.join(out, ".lock"))
    _train(argv, monkeypatch)
    assert not os.path.exists(os.path.join(out, ".lock")) and _kinds(out) == {"model"}


def test_an_adapter_refuses_a_base_rebuilt_in_place_since_its_export(toy, tmp_path, monkeypatch):
    data, models = toy
    base, out = str(tmp_path / "base"), str(tmp_path / "run")
    shutil.copytree(models["llava"], base)
    _train(["--model", base, "--data", data, "--out", out, "--lora", "4"] + TINY, monkeypatch)
    assert M.adapter_base(out) == base
    words = open(os.path.join(os.path.dirname(data), "vocab.txt")).read().split()
    M.make_tiny("llava", base, words, seed=1)  # the same config, other weights
    changed = re.escape(f"{out}: its base {base} changed since the adapter was trained on it (weights "
                        "model.safetensors [")
    with pytest.raises(RunError, match="^" + changed):
        M.load(out)
    monkeypatch.setattr(M, "load", _no_model)
    with pytest.raises(RunError, match="^" + changed):  # evaluate.py: one line, before the model loads
        evaluate.run(out, [os.path.join(os.path.dirname(data), "test.jsonl")], str(tmp_path / "eval"))


def test_an_adapter_on_a_hub_base_warns_when_its_snapshot_cannot_be_checked(tmp_path, monkeypatch, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/base"}))
    (adapter / "base_identity.json").write_text(json.dumps({"model": "org/base", "revision": "aaa"}))
    cache = os.path.join("hub", "models--org--base", "snapshots", "{}", "config.json")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: cache.format("aaa"))
    assert M.adapter_base(str(adapter)) == "org/base" and capsys.readouterr().err == ""
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: cache.format("bbb"))
    assert M.adapter_base(str(adapter)) == "org/base"
    assert f"warning: {adapter}: its base org/base is a hub model, checked by its snapshot alone: aaa at export, " \
           "bbb now" in capsys.readouterr().err


def test_overwrite_removes_only_what_training_wrote(toy, tmp_path, monkeypatch):
    data, models = toy
    out = str(tmp_path / "run")
    argv = ["--model", models["llava"], "--data", data, "--out", out] + TINY
    _train(argv, monkeypatch)
    evaluate.run(out, [os.path.join(os.path.dirname(data), "test.jsonl")], out, batch_size=4)  # into the same folder
    with open(os.path.join(out, "diagnosis.json"), "w") as f:
        f.write("{}")  # as diagnose.py writes beside predictions.jsonl
    kept = {name: open(os.path.join(out, name)).read() for name in ("predictions.jsonl", "run.json", "diagnosis.json")}
    _train(argv + ["--overwrite", "--lora", "4"], monkeypatch)
    assert {name: open(os.path.join(out, name)).read() for name in kept} == kept
    assert _kinds(out) == {"adapter"} and sorted(checkpoint.checkpoints(out)) == ["ckpt-00000002"]
