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
