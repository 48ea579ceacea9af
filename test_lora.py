"""Tests of train.py --lora: PEFT adapters on the language model with the projector trained in full, the adapter
folder and the merged export, checkpoints and resume, two processes, and evaluate.py on an adapter folder; on
test_train.py's tiny models of the three families and toy samples.
Run all tests: python -m pytest -q test_*.py
"""
import json
import os
import re
import shutil

import peft
import pytest
import torch
import torch.distributed.checkpoint as dcp
import transformers
from safetensors.torch import load_file

import evaluate
import model as M
import perturb
import prompts as P
from test_train import FAMILIES, _metrics, _no_model, _one_process_like_two, _train, toy  # noqa: F401

R, ALPHA = 4, 12.0  # not the default alpha 2R, so the scale alpha / R is the flag's
LORA = ["--lora", str(R), "--lora-alpha", str(ALPHA), "--lr", "1e-2", "--eps", "0.05"]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def runs(toy, tmp_path_factory):
    """train.py --lora --merge for 2 steps, once per family asked for: family -> (--out, train.py's globals)."""
    data, models = toy
    done = {}

    def run(fam):
        if fam not in done:
            out = str(tmp_path_factory.mktemp("lora") / fam)
            with pytest.MonkeyPatch.context() as m:
                done[fam] = out, _train(["--model", models[fam], "--data", data, "--out", out, "--max-steps", "2",
                                         "--merge"] + LORA, m)
        return done[fam]
    return run


def _batch(processor, data):
    return P.collate(processor, [perturb.perturb(s, "orig", 0, size=P.image_size(processor))
                                 for s in perturb.load_samples(data)])


@pytest.mark.parametrize("fam", FAMILIES)
def test_a_lora_step_trains_only_the_adapters_of_the_language_model_and_the_projector(toy, runs, fam):
    out, g = runs(fam)
    projector = M.FAMILIES[fam]["projector"]
    lm = "language_model.model.layers." if fam == "instructblip" else "model.language_model.layers."
    names = [n.removeprefix("model.") for n, _ in g["trainable"]]  # the optimizer's, as Step names them
    adapters = {n for n in names if ".lora_" in n}
    layers = M.load(toy[1][fam])[0].config.get_text_config().num_hidden_layers
    assert len(adapters) == 2 * len(PROJECTIONS) * layers  # A and B of each projection of each LLM block
    assert all(re.fullmatch(re.escape(lm) + r"\d+\.\w+\.(\w+)\.lora_[AB]\.default\.weight", n).group(1) in PROJECTIONS
               for n in adapters)
    assert set(names) - adapters == {n for n in names if n.startswith(projector + ".modules_to_save.default.")} != set()
    base = dict(M.load(toy[1][fam])[0].named_parameters())
    merged = dict(transformers.AutoModelForImageTextToText.from_pretrained(out).named_parameters())
    changed = {n for n in base if not torch.equal(base[n], merged[n])}
    adapted = {n for n in base if n.startswith(lm) and n.endswith(".weight") and n.split(".")[-2] in PROJECTIONS}
    assert changed == adapted | {n for n in base if n.startswith(projector + ".")}  # vision, embeddings, head: as were


@pytest.mark.parametrize("fam", FAMILIES)
def test_the_adapter_is_what_training_held_loads_with_peft_and_merges_to_w_plus_b_a(toy, runs, fam):
    data, models = toy
    out, g = runs(fam)
    folder = os.path.join(out, "adapter")
    config = json.load(open(os.path.join(folder, "adapter_config.json")))
    assert config["base_model_name_or_path"] == os.path.abspath(models[fam]) and (config["r"], config["lora_alpha"]) \
        == (R, ALPHA)
    saved = load_file(os.path.join(folder, "adapter_model.safetensors"))
    held = {"base_model.model." + k.replace(".default.", ".").replace(".modules_to_save.", "."): v
            for k, v in g["full"].items()}  # the trained weights as train.py held them at the end
    assert saved.keys() == held.keys() and all(torch.equal(saved[k], held[k]) for k in saved)
    # merged = W + B @ A * alpha / r for every adapted projection; the projector is the adapter's; the rest the base's
    base = M.load(models[fam])[0].state_dict()
    expected = dict(base)
    for k in saved:
        name = k.removeprefix("base_model.model.")
        if ".lora_A." in name:
            w = name.replace(".lora_A.", ".")
            expected[w] = base[w] + saved[k.replace("lora_A", "lora_B")] @ saved[k] * (ALPHA / R)
        elif ".lora_B." not in name:
            expected[name] = saved[k]
    plain = transformers.AutoModelForImageTextToText.from_pretrained(out).eval()
    state = plain.state_dict()
    assert all(torch.allclose(state[k], expected[k], atol=1e-6) for k in state)
    # PEFT's own unmerged model (W x + B A x alpha / r) gives the merged export's logits
    cls = M.FAMILIES[fam]["cls"]
    unmerged = peft.PeftModel.from_pretrained(cls.from_pretrained(models[fam]), folder).eval()
    batch = M.model_inputs(_batch(M.load_processor(folder), data))
    with torch.no_grad():
        a, b, untrained = (m(**batch).logits for m in (unmerged, plain, cls.from_pretrained(models[fam])))
        assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, untrained)


def test_activation_checkpointing_leaves_a_lora_step_unchanged(toy, runs, tmp_path, monkeypatch):
    data, models = toy
    out, _ = runs("llava")
    g = _train(["--model", models["llava"], "--data", data, "--out", str(tmp_path / "ckpt"), "--max-steps", "2",
                "--activation-checkpointing", "--no-export"] + LORA, monkeypatch)
    assert g["hf_model"].is_activation_checkpointing
    for a, b in zip(_metrics(out), _metrics(tmp_path / "ckpt"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


def test_under_bf16_the_frozen_base_is_stored_in_bf16_and_the_trained_weights_in_fp32(toy, tmp_path, monkeypatch):
    """What makes a 7B LoRA run fit one 24 GB GPU (bench.py's plan): frozen weights are only read, in the compute
    dtype, so they are stored in it; FSDP2 asks one dtype only of the trained ones (and the optimizer keeps fp32)."""
    data, models = toy
    g = _train(["--model", models["llava"], "--data", data, "--out", str(tmp_path / "bf16"), "--max-steps", "1",
                "--dtype", "bfloat16", "--no-export"] + LORA, monkeypatch)
    dtypes = {(q.requires_grad, q.dtype) for q in g["step_model"].parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}
    assert all(q.dtype == torch.float32 for group in g["optimizer"].param_groups for q in group["params"])
    assert _metrics(tmp_path / "bf16")[0]["loss"] > 0


def test_evaluate_scores_an_adapter_folder_as_its_merged_model(toy, runs, tmp_path):
    data, models = toy
    out, _ = runs("llava")
    test = os.path.join(os.path.dirname(data), "test.jsonl")
    adapter = os.path.join(out, "adapter")
    assert M.checkpoint_family(adapter) == "llava" and M.identity(adapter)["base"] == M.identity(models["llava"])
    rows = {name: evaluate.run(folder, [test], str(tmp_path / name), batch_size=4)
            for name, folder in (("adapter", adapter), ("merged", out), ("base", models["llava"]))}
    assert len(rows["adapter"]) == len(rows["merged"]) > 0
    for a, b, base in zip(rows["adapter"], rows["merged"], rows["base"]):
        assert (a["id"], a["intervention"]) == (b["id"], b["intervention"])
        assert a["probs"] == pytest.approx(b["probs"], abs=1e-5)
        assert a["probs"] != pytest.approx(base["probs"], abs=1e-4)  # the adapter is there
    moved = tmp_path / "moved"  # an adapter whose base is gone fails in one line naming its config
    shutil.copytree(adapter, moved)
    config = json.load(open(moved / "adapter_config.json"))
    json.dump(config | {"base_model_name_or_path": str(tmp_path / "gone")}, open(moved / "adapter_config.json", "w"))
    with pytest.raises(FileNotFoundError, match=re.escape(f"{moved}/adapter_config.json: base_model_name_or_path "
                                                          f"{tmp_path / 'gone'}: no such folder")):
        M.load(str(moved))


def test_a_lora_run_resumes_exactly_from_adapter_only_checkpoints_and_refuses_other_lora(toy, tmp_path, monkeypatch):
    data, models = toy
    out = tmp_path / "run"
    argv = ["--model", models["llava"], "--data", data, "--out", str(out), "--max-steps", "4", "--save-every", "2"]
    argv += LORA
    g = _train(argv, monkeypatch)
    whole, adapter = _metrics(out), load_file(out / "adapter_model.safetensors")
    saved = dcp.FileSystemReader(out / "ckpt-00000004").read_metadata().state_dict_metadata
    weights = [k.removeprefix("model.") for k in saved if k.startswith("model.")]
    assert sorted(weights) == sorted(n for n, _ in g["trainable"])
    assert all(".lora_" in n or ".modules_to_save." in n for n in weights)  # no frozen weight
    moments = [k for k in saved if k.startswith("optim.state.") and k.endswith(".exp_avg")]
    assert sorted(moments) == sorted(f"optim.state.{n}.exp_avg" for n in weights)
    shutil.rmtree(out / "ckpt-00000004")  # as if killed between the checkpoints at steps 2 and 4
    _train(argv + ["--resume"], monkeypatch)
    assert [r["step"] for r in _metrics(out)] == [0, 1, 2, 3]
    for a, b in zip(whole, _metrics(out)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    again = load_file(out / "adapter_model.safetensors")
    assert all(torch.allclose(adapter[k], again[k], atol=1e-6) for k in adapter)
    monkeypatch.setattr(M, "load", _no_model)
    for extra, message in [(["--lora", "8"], "--lora 4 then, 8 now"),
                           (["--lora-alpha", "2"], "--lora-alpha 12.0 then, 2.0 now"),
                           (["--lora-targets", "q_proj"], "--lora-targets [q_proj, k_proj")]:
        with pytest.raises(SystemExit, match=re.escape(message)):
            _train(argv + extra + ["--resume"], monkeypatch)
    state = out / "ckpt-00000004" / "state.json"  # a checkpoint from before --lora existed trained in full
    old = json.loads(state.read_text())
    del old["args"]["lora"]
    state.write_text(json.dumps(old))
    with pytest.raises(SystemExit, match=re.escape("--lora 0 then, 4 now")):
        _train(argv + ["--resume"], monkeypatch)


def test_two_processes_train_a_lora_like_one(toy, tmp_path):
    """FSDP2 shards each block with its frozen base weights and trained adapters in one unit."""
    data, models = toy
    common = ["train.py", "--model", models["llava"], "--data", data, "--max-steps", "2"] + LORA + ["--out"]
    _one_process_like_two(common, tmp_path, 4, 29561, 2)
    one, two = (load_file(tmp_path / run / "adapter_model.safetensors") for run in ("one", "two"))
    assert one.keys() == two.keys() and all(torch.allclose(one[k], two[k], atol=1e-5) for k in one)


def test_bad_lora_flags_fail_in_one_line_before_the_model_loads(toy, tmp_path, monkeypatch):
    data, models = toy
    monkeypatch.setattr(M, "load", _no_model)
    argv = ["--model", models["llava"], "--data", data, "--out", str(tmp_path / "out")]
    for extra in (["--merge"], ["--lora", "-1"], ["--lora", "4", "--no-freeze-vision"]):
        with pytest.raises(SystemExit, match=r"^error: --lora .*: --lora takes a rank \(0: off\), --merge needs one"):
            _train(argv + extra, monkeypatch)
