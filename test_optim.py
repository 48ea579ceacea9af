"""Tests of train.py's optimizer step (issue 28): fused AdamW where the parameters live on CPU or CUDA, FSDP2's
sharded parameters included; the same numbers as the for-loop within float tolerance; checkpoints written with the
loop resume under fused; and bench.py's comparison of the two. Timings are never asserted.
Run: python -m pytest -q test_optim.py
"""
import json
import shutil
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import train
from test_train import _metrics, _train, toy  # noqa: F401 (toy: the fixture of tiny models and toy samples)

ARGS = SimpleNamespace(lr=1e-3, weight_decay=0.1, adam_eps=1e-6)


def adamw_by_hand(params, grads, lr, wd, eps, b1=0.9, b2=0.999):
    """AdamW (Loshchilov & Hutter, decoupled weight decay, bias-corrected moments) in float64, step by step."""
    p = [q.double() for q in params]
    m, v = [torch.zeros_like(q) for q in p], [torch.zeros_like(q) for q in p]
    for t, gs in enumerate(grads, 1):
        for i, g in enumerate(g.double() for g in gs):
            m[i], v[i] = b1 * m[i] + (1 - b1) * g, b2 * v[i] + (1 - b2) * g * g
            p[i] = p[i] * (1 - lr * wd) - lr * (m[i] / (1 - b1 ** t)) / ((v[i] / (1 - b2 ** t)).sqrt() + eps)
    return p


def stepped(params, grads, optimizer):
    for gs in grads:
        for q, g in zip(params, gs):
            q.grad = g.clone()
        optimizer.step()
    return params


def test_fused_and_the_loop_are_adamw_by_hand_within_float_tolerance():
    torch.manual_seed(0)
    shapes = [(64, 32), (32,), (16, 64)]
    init = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(5)]
    expected = adamw_by_hand(init, grads, lr=1e-3, wd=0.1, eps=1e-6)
    out = {}
    for fused in (None, True):
        params = [torch.nn.Parameter(q.clone()) for q in init]
        out[fused] = stepped(params, grads, torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, eps=1e-6,
                                                              fused=fused))
        # fp32 rounding of parameters near 3 (one ulp: 2.4e-7), against a move of 6e-3
        assert all((q.double() - e).abs().max() < 1e-6 for q, e in zip(out[fused], expected))
    assert all((a - b).abs().max() < 2e-7 for a, b in zip(out[None], out[True]))  # the last bit or two


@pytest.fixture
def group_of_one(monkeypatch):
    """A gloo process group of one, as `python train.py` makes."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for k, v in dict(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(k, v)
    dist.init_process_group("gloo")
    yield
    dist.destroy_process_group()


def test_train_steps_fsdp2_shards_fused_as_the_loop_does_with_the_same_state(group_of_one):
    def sharded():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.LayerNorm(64), torch.nn.Linear(64, 8))
        mesh = init_device_mesh("cpu", (1,))
        fully_shard(model[0], mesh=mesh)
        fully_shard(model, mesh=mesh)
        return [(n, q) for n, q in model.named_parameters()]

    shapes = [q.shape for _, q in sharded()]
    torch.manual_seed(1)
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]
    optimizers = {}
    for fused in (True, None):
        trainable = sharded()
        optimizer = train.adamw(ARGS, trainable)
        assert [g["fused"] for g in optimizer.param_groups] == [True, True]  # CPU DTensors: fused applies
        for g in optimizer.param_groups:
            g["fused"] = fused  # None: what train.py built before issue 28 (the loop over tensors, on CPU)
        params = [q for _, q in trainable]
        assert type(params[0]).__name__ == "DTensor"
        dgrads = [[torch.distributed.tensor.distribute_tensor(g, q.device_mesh, q.placements) for q, g in
                   zip(params, gs)] for gs in grads]
        stepped(params, dgrads, optimizer)
        optimizers[fused] = optimizer, [q.full_tensor() for q in params]
    (fused, a), (loop, b) = optimizers[True], optimizers[None]
    assert all((x - y).abs().max() < 2e-7 for x, y in zip(a, b))
    expected = adamw_by_hand([q.full_tensor() for _, q in sharded()], grads, 1e-3, 0.1, 1e-6)
    # weight decay only on matrices: LayerNorm's and the biases' were 0.0 above, so compare those with wd 0
    no_decay = adamw_by_hand([q.full_tensor() for _, q in sharded()], grads, 1e-3, 0.0, 1e-6)
    for (n, q), x, e, e0 in zip(sharded(), a, expected, no_decay):
        assert (x.double() - (e if q.ndim >= 2 else e0)).abs().max() < 1e-6, n
    s, t = fused.state_dict(), loop.state_dict()  # one format: checkpoints of either load into either
    assert [{k: v for k, v in g.items() if k != "fused"} for g in s["param_groups"]] == \
        [{k: v for k, v in g.items() if k != "fused"} for g in t["param_groups"]]
    assert {i: {k: (v.dtype, v.device, v.shape) for k, v in st.items()} for i, st in s["state"].items()} == \
        {i: {k: (v.dtype, v.device, v.shape) for k, v in st.items()} for i, st in t["state"].items()}
    assert all(float(st["step"]) == 3 for st in s["state"].values())


ADAMW = train.adamw  # before any test patches it


def loop_adamw(args, trainable):
    """train.adamw as it was before issue 28: torch's default, a loop over tensors on CPU."""
    optimizer = ADAMW(args, trainable)
    for group in optimizer.param_groups:
        group["fused"] = None
    return optimizer


def test_a_checkpoint_of_the_loop_resumes_under_fused_and_fused_resumes_exactly(toy, tmp_path, monkeypatch):
    data, models = toy
    argv = ["--model", models["llava"], "--data", data, "--max-steps", "4", "--save-every", "2", "--lr", "1e-3",
            "--eps", "0.05", "--no-export", "--twins", "all", "--out"]
    with monkeypatch.context() as m:
        m.setattr(train, "adamw", loop_adamw)
        assert not any(g["fused"] for g in _train(argv + [str(tmp_path / "loop")], monkeypatch)["optimizer"]
                       .param_groups)
    new = _train(argv + [str(tmp_path / "fused")], monkeypatch)
    assert all(g["fused"] for g in new["optimizer"].param_groups)
    for name in ("loop", "fused"):
        whole = _metrics(tmp_path / name)
        shutil.copytree(tmp_path / name / "ckpt-00000002", tmp_path / f"{name}-resumed" / "ckpt-00000002")
        run = _train(argv + [str(tmp_path / f"{name}-resumed"), "--resume"], monkeypatch)
        assert all(g["fused"] for g in run["optimizer"].param_groups)  # this run's choice, not the checkpoint's
        assert {float(s["step"]) for s in run["optimizer"].state.values()} == {4.0}  # the moments went on
        resumed = _metrics(tmp_path / f"{name}-resumed")
        assert [r["step"] for r in resumed] == [2, 3]
        for k in ("loss", "sft", "adv", "cons", "grad_norm"):
            assert resumed[0][k] == whole[2][k]  # the weights the checkpoint holds, exactly
            if name == "fused":
                assert resumed[1][k] == whole[3][k]  # exact resume, as the uninterrupted run
            else:  # one update by fused instead of the loop
                assert resumed[1][k] == pytest.approx(whole[3][k], rel=1e-6 if k != "cons" else 1e-4)


def test_bench_compares_the_loop_with_the_chosen_step_and_projects_the_7b_update(tmp_path, capsys):
    import bench
    bench.main(["--arch", "tiny", "--optimizer", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    r = json.load(open(tmp_path / "optimizer-tiny.json"))
    assert r["chosen"] == "fused" and r["params"] > 0 and r["loop"] > 0 and r["fused"] > 0
    assert "| AdamW loop (before issue 28) |" in out and "| AdamW fused (train.py's) |" in out
    assert "llava-1.5-7b: 6.76B trained parameters" in out
