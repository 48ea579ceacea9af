"""Tests of --workers (train.py, evaluate.py): DataLoader worker processes prepare the same batches, in the
same order, as the main process would, so losses and predictions do not depend on the number of workers.
Run all tests: python -m pytest -q test_*.py
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader

import evaluate
import model as M
import prompts as P
import train
from test_train import toy  # noqa: F401 (one session-scoped toy world for both files)

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def world(toy):
    """test_train.py's toy world (8 training samples: one global batch at the default ratios), its test file
    and its tiny LLaVA."""
    data, models = toy
    return data, os.path.join(os.path.dirname(data), "test.jsonl"), models["llava"]


def _train(argv, monkeypatch):
    """train.py in this process (a group of one): (its globals, what its DataLoader delivered, its num_workers)."""
    seen, workers = [], []

    class Recording(DataLoader):
        def __iter__(self):
            workers.append(self.num_workers)
            for item in super().__iter__():
                seen.append(item)
                yield item

    env = dict(os.environ)
    monkeypatch.setattr(sys, "argv", ["train.py"] + argv)
    monkeypatch.setattr(torch.utils.data, "DataLoader", Recording)
    try:
        return train.main(argv), seen, workers
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(env)


def _losses(folder):
    return [(r["step"], r["tokens"], r["loss"], r["sft"], r["adv"], r["cons"], r["grad_norm"])
            for r in map(json.loads, open(os.path.join(folder, "metrics.jsonl")))]


def _same(a, b, where="batch"):
    """Exactly equal: tensors of the same dtype, shape and values, and every list, tuple, dict and value."""
    assert type(a) is type(b), (where, type(a), type(b))
    if torch.is_tensor(a):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_train_batches_and_losses_are_the_same_for_any_number_of_workers_and_after_a_resume(world, tmp_path,
                                                                                           monkeypatch):
    data, _, llava = world
    common = ["--model", llava, "--data", data, "--max-steps", "3", "--lr", "1e-3", "--eps", "0.05", "--no-export",
              "--grad-accum", "2", "--batch-size", "4"]
    g, main, n = _train(common + ["--out", str(tmp_path / "main"), "--workers", "0", "--save-every", "0"], monkeypatch)
    assert n == [0] and len(main) == 3
    # what the loop trained on is micro_batches(step), called here in this process, for steps 0, 1, 2
    for step, batches in enumerate(main):
        _same(batches, g["batches"](step), f"step {step}")
    assert all(len(b) == 2 and b[0]["pairs"] and b[0]["pixel_values"].shape[0] > 4 for b in main)  # twins
    assert not any(torch.equal(main[0][0]["pixel_values"], b[0]["pixel_values"]) for b in main[1:])

    out = tmp_path / "workers"
    _, forked, n = _train(common + ["--out", str(out), "--workers", "2", "--save-every", "2"], monkeypatch)
    assert n == [2]
    _same(forked, main)
    assert _losses(out) == _losses(tmp_path / "main")  # exactly
    rng = torch.get_rng_state()  # after step 2, from the RNG state that the checkpoint of step 2 holds

    # a resume at step 2 (another number of workers: not a setting of the run) starts its loader there
    shutil.rmtree(out / "ckpt-00000003")
    _, resumed, n = _train(common + ["--out", str(out), "--workers", "1", "--resume"], monkeypatch)
    assert n == [1]
    _same(resumed, main[2:])
    assert _losses(out) == _losses(tmp_path / "main")
    assert torch.equal(torch.get_rng_state(), rng)  # the loader draws nothing from the RNG that resume restores


def test_two_processes_with_workers_train_like_one(world, tmp_path, monkeypatch):
    """Workers forked by each rank after gloo started: the same steps as one process without workers."""
    data, _, llava = world
    common = ["--model", llava, "--data", data, "--max-steps", "2", "--lr", "1e-3", "--eps", "0.05", "--no-export",
              "--save-every", "0", "--out"]
    _train(common + [str(tmp_path / "one"), "--batch-size", "8", "--workers", "0"], monkeypatch)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29571", "train.py"] + common + [str(tmp_path / "two"), "--batch-size", "4", "--workers",
                                                           "2"], cwd=HERE, env=env, capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-5000:]
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):  # the same rows (step, tokens); losses all-reduced: equal up to float order
        assert a[:2] == b[:2] and a[2:] == pytest.approx(b[2:], rel=1e-4, abs=1e-7), a[0]


def test_a_row_too_long_in_a_worker_stops_the_run_in_one_line(world, tmp_path, monkeypatch):
    data, _, llava = world
    monkeypatch.setattr(P, "lengths", lambda processor, samples, sizes, train=True, style="ours": [1] * len(samples))
    with pytest.raises(SystemExit, match=r"^error: sample '[^']+'.*: \d+ tokens with its answer .* more than "
                                         r"max_length=30; truncating would cut the answer \(raise max_length\)$"):
        _train(["--model", llava, "--data", data, "--out", str(tmp_path / "out"), "--max-length", "30",
                "--max-steps", "1", "--workers", "2"], monkeypatch)


@pytest.mark.parametrize("scoring", ["logits", "generate"])
def test_evaluate_predicts_the_same_for_any_number_of_workers(world, tmp_path, scoring):
    _, test, llava = world
    m, p = M.load(llava)
    runs = {n: evaluate.run(llava, [test], str(tmp_path / str(n)), batch_size=3, loaded=(m, p), workers=n,
                            scoring=scoring, max_new_tokens=2)
            for n in (0, 2)}
    assert runs[0] == runs[2] and len(runs[0]) > 6  # every probability (or text) exactly
    assert {r["intervention"] for r in runs[0]} == set(evaluate.perturb.APPLIES)
    m.config.text_config.max_position_embeddings = 8
    with pytest.raises(evaluate.RunError, match="max_length") as e:
        evaluate.run(llava, [test], str(tmp_path / "short"), loaded=(m, p), workers=2)
    assert "\n" not in str(e.value)  # the worker's error as itself, not wrapped in the worker's traceback
