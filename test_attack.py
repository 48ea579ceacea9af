"""Tests of the worst-case attack at evaluation (attack.py, evaluate.py --attack-eps) and of its rows in diagnose.py
and the robustness curve (charts.py), on a tiny random-init LLaVA.
  python -m pytest -q test_attack.py
"""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import attack as A
import perturb
import prompts as P
from checkpoint import RunError
from test_core import _pred, _saved_figures, _samples, _write_dataset, tiny  # noqa: F401 (tiny: a fixture)

HERE = os.path.dirname(os.path.abspath(__file__))


def _batch(p, samples, train=False):
    """The samples under orig, collated as evaluate.py does, with the sample text's mask."""
    chosen = [perturb.perturb(s, "orig", 0, size=P.image_size(p)) for s in samples]
    batch = P.collate(p, chosen, train=train)
    if not train:  # (training's collate marks it itself)
        batch["sample_mask"] = A.sample_mask(p, chosen, batch)
    letters = P.option_token_ids(p, 4)
    return chosen, batch, [letters[:len(s["options"])] for s in chosen]


def _rows(samples):
    """Image- and text-heavy samples of several lengths (a batch with padding)."""
    out = []
    for s in samples[:2]:
        out += [dict(s, id=f"{s['id']}-{k}", question=s["question"] + " really" * k) for k in range(3)]
    return out


def test_the_attack_changes_only_the_task_irrelevant_modality_and_stays_in_the_ball(tiny):
    m, p, _ = tiny("llava")
    chosen, batch, letters = _batch(p, _rows(_samples()))
    eps = 0.05
    out = A.perturbation(m, batch, letters, eps, steps=3, noise=A.start(m, batch, [s["id"] for s in chosen],
                                                                       ["x"] * len(chosen)))
    delta, mask = out["delta"], out["mask"]
    image = batch["input_ids"] == m.config.image_token_id
    for r, s in enumerate(chosen):  # independently: which tokens are the sample's text, which the image's
        if s["task"] == "text_heavy":
            assert torch.equal(mask[r], image[r])
        else:
            text = p.tokenizer(perturb.render(s), add_special_tokens=False)["input_ids"]
            assert batch["input_ids"][r][mask[r]].tolist() == text  # the sample's text, not the template's
            assert not (mask[r] & image[r]).any() and not (mask[r] & ~batch["attention_mask"][r].bool()).any()
    assert (delta[~mask] == 0).all()  # the template, the other modality, the padding: untouched
    assert delta.abs().max() <= eps and (delta[mask] != 0).all()  # in the ball, every masked element moved
    # training's batch (answer tokens appended): the attack's positions are never the answer's
    _, train_batch, letters = _batch(p, _rows(_samples())[:2], train=True)
    out = A.perturbation(m, train_batch, letters, eps, steps=1)
    answer = train_batch["labels"] != -100
    assert answer.any() and not (out["mask"] & answer).any() and (out["delta"][answer] == 0).all()


def test_a_radius_relative_to_the_embeddings_std_is_each_rows_own(tiny, tmp_path, monkeypatch):
    """--attack-scale std: each row's ball is eps times the std of its own attacked embeddings (computed here from
    the embedding table and the tower's output by hand), rows named "attack@0.5std"; diagnose and the curve read
    them, and a curve mixing them with absolute radii is refused."""
    import diagnose
    import evaluate
    import model as M
    m, p, folder = tiny("llava")
    chosen, batch, letters = _batch(p, _rows(_samples()))
    ids = [s["id"] for s in chosen]
    out = A.perturbation(m, batch, letters, 0.5, steps=2, noise=A.start(m, batch, ids, ["x"] * len(ids)), scale="std")
    with torch.no_grad():
        embeds, _ = M.embed(m, batch)
    stds = [embeds[r][out["mask"][r]].double().std(unbiased=False) for r in range(len(ids))]
    assert max(stds) > 3 * min(stds)  # image tokens and text: radii far apart in absolute terms
    for r, std in enumerate(stds):  # the start is clamped to the ball, so its edge is reached
        assert out["delta"][r].abs().max().item() == pytest.approx(0.5 * std.item(), rel=1e-5)
    assert perturb.attack_radius("attack@0.5std") == 0.5 and perturb.attack_scale("attack@0.5std") == "std"
    assert perturb.attack_radius("attack@0.50std") is None and perturb.applies("attack@0.5std") == perturb.ATTACKED
    data = _write_dataset(str(tmp_path / "data"), n=2)
    rows = evaluate.run(folder, [data], str(tmp_path / "rel"), ["orig"], batch_size=4, loaded=(m, p),
                        attack=A.settings([0.5], 2, scale="std"))
    assert {r["intervention"] for r in rows} == {"orig", "attack@0.5std"}
    assert json.load(open(tmp_path / "rel" / "run.json"))["attack"] == dict(eps=[0.5], steps=2, alpha=0.25, scale="std")
    summary = diagnose.summarize(diagnose.read(str(tmp_path / "rel" / "predictions.jsonl")))
    assert all(list(cells) == ["orig", "attack@0.5std"] for source, cells in summary.items() if source != "vqa")
    saved = _saved_figures(monkeypatch)
    diagnose.main(["--chart", str(tmp_path / "rel.png"), str(tmp_path / "rel" / "predictions.jsonl")])
    assert saved[0].axes[0].get_xlabel().endswith("x their std)")
    (absolute,) = _write_runs(tmp_path, {"vanilla": RUNS["vanilla"]})
    with pytest.raises(SystemExit, match="absolute in some rows and relative to the embeddings' std in others"):
        diagnose.main(["--chart", str(tmp_path / "c.png"), str(tmp_path / "rel" / "predictions.jsonl"), str(absolute)])


def test_a_zero_radius_changes_no_answer_and_the_target_is_the_clean_prediction(tiny, tmp_path):
    import evaluate
    m, p, folder = tiny("llava")
    data = _write_dataset(str(tmp_path / "data"), n=3)
    rows = evaluate.run(folder, [data], str(tmp_path / "out"), interventions=["orig"], batch_size=4, loaded=(m, p))
    samples = [s for s in perturb.load_samples(data) if s["task"] != "vqa"]
    chosen, batch, letters = _batch(p, samples)
    out = A.perturbation(m, batch, letters, 0.0, steps=2)
    orig = {r["id"]: r for r in rows}
    assert (out["delta"] == 0).all() and torch.equal(out["probs"], out["clean"])  # the clean pass's own numbers
    for r, s in enumerate(chosen):  # and evaluate's orig rows (another batch: within float noise)
        probs = out["probs"][r, :len(s["options"])]
        assert probs.tolist() == pytest.approx(orig[s["id"]]["probs"], abs=1e-5)
        assert int(probs.argmax()) == orig[s["id"]]["pred"] == int(out["target"][r])  # delta_cp 0: no flip
    # label-free: the target is the clean argmax, not the answer (this random model gets most answers wrong)
    assert torch.equal(out["target"], out["clean"].argmax(-1))
    assert any(int(t) != s["answer"] for t, s in zip(out["target"], chosen))


def test_a_larger_radius_never_lowers_the_loss_it_maximises(tiny):
    m, p, _ = tiny("llava")
    chosen, batch, letters = _batch(p, _rows(_samples()))
    ids = [s["id"] for s in chosen]
    losses = []
    for eps in (1e-3, 1e-2, 1e-1):  # each radius's own random start, as evaluate.py draws it
        start = A.start(m, batch, ids, [perturb.attack_name(eps)] * len(ids))
        out = A.perturbation(m, batch, letters, eps, steps=10, noise=start)
        losses.append(out["loss"])
        clean = -out["clean"].log()[torch.arange(len(ids)), out["target"]]
        assert (out["loss"] >= clean).all()  # the best point found is no better for the model than no attack
    losses = torch.stack(losses)
    assert (losses.diff(dim=0) >= 0).all() and (losses[-1] > losses[0]).all(), losses


def _evaluate_cli(tmp_path, out, *extra):
    data = _write_dataset(str(tmp_path / "data"), n=3)
    return ["evaluate.py", "--model", "M", "--data", data, "--out", str(tmp_path / out), *extra]


def test_two_processes_give_the_rows_of_one(tiny, tmp_path):
    import evaluate
    m, p, folder = tiny("llava")
    args = _evaluate_cli(tmp_path, "n2", "--batch-size", "3", "--interventions", "md", "fb", "--attack-eps", "0.01",
                         "0.1", "--attack-steps", "2")
    args[2] = folder
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29571"] + args, env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=HERE, capture_output=True,
                         text=True)
    assert two.returncode == 0, two.stderr[-2000:]
    one = evaluate.run(folder, [args[4]], str(tmp_path / "n1"), ["md", "fb"], batch_size=3, loaded=(m, p),
                       attack=A.settings([0.01, 0.1], 2))
    with open(tmp_path / "n2" / "predictions.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["intervention"] for r in rows].count("attack@0.1") == 6 and len(rows) == len(one)
    for a, b in zip(one, rows):
        assert {k: v for k, v in a.items() if k != "probs"} == {k: v for k, v in b.items() if k != "probs"}
        assert a["probs"] == pytest.approx(b["probs"], abs=1e-5)
    assert json.load(open(tmp_path / "n2" / "run.json"))["attack"] == dict(eps=[0.01, 0.1], steps=2, alpha=0.25)


def test_a_resumed_attack_gives_the_rows_of_an_uninterrupted_run(tiny, tmp_path, monkeypatch):
    import evaluate
    m, p, folder = tiny("llava")
    data = _write_dataset(str(tmp_path / "data"), n=3)
    out, attack = tmp_path / "out", A.settings([0.01, 0.1], 2)
    run = dict(interventions=["uf"], batch_size=2, loaded=(m, p), attack=attack)
    evaluate.run(folder, [data], str(out), **run)
    full = (out / "predictions.jsonl").read_text()
    lines = full.splitlines(keepends=True)
    assert [json.loads(x)["intervention"] for x in lines[:5]] == ["orig", "uf", "attack@0.01", "attack@0.1", "orig"]
    (out / "predictions.jsonl").write_text("".join(lines[:9]) + lines[9][:15])  # killed mid-line
    attacked, real = [], A.found
    monkeypatch.setattr(A, "found", lambda *a: attacked.append(len(a[2])) or real(*a))
    evaluate.run(folder, [data], str(out), resume=True, **run)
    assert (out / "predictions.jsonl").read_text() == full
    assert 0 < sum(attacked) < sum("attack@" in x for x in lines)  # img-0's attacks were not run again
    with pytest.raises(RunError, match="other settings"):  # other radii: refused like any other setting
        evaluate.run(folder, [data], str(out), resume=True, **dict(run, attack=A.settings([0.02], 2)))


def test_bad_attack_settings_are_refused_in_one_line_before_the_model_loads(tmp_path, capsys):
    import evaluate
    cases = {("--score", "generate", "--attack-eps", "0.01"): "error: --attack-eps needs --score logits",
             ("--attack-eps", "0.01", "-0.001"): "error: --attack-eps -0.001 0.01 --attack-steps 10 --attack-alpha "
                                                "0.25: radii and step size must be finite, above 0; steps at least 1",
             ("--attack-eps", "0"): "error: --attack-eps 0 ",
             ("--attack-eps", "nan"): "error: --attack-eps nan ",
             ("--attack-eps", "0.01", "--attack-steps", "0"): "error: --attack-eps 0.01 --attack-steps 0 ",
             ("--attack-eps", "0.01", "--attack-alpha", "0"): "error: --attack-eps 0.01 --attack-steps 10 "
                                                               "--attack-alpha 0:",
             ("--attack-steps", "3"): "error: --attack-steps, --attack-alpha and --attack-scale are options of",
             ("--attack-scale", "std"): "error: --attack-steps, --attack-alpha and --attack-scale are options of"}
    for extra, message in cases.items():
        with pytest.raises(SystemExit) as e:
            evaluate.main(_evaluate_cli(tmp_path, "out", *extra)[1:])  # --model M: no such model, never loaded
        assert str(e.value.code).startswith(message) and "\n" not in str(e.value.code)
    assert not (tmp_path / "out").exists()
    data = _write_dataset(str(tmp_path / "data"), n=1)
    generic = (None, SimpleNamespace(family=P.GENERIC))  # a model of the generic path (no FAMILIES row), unloaded
    with pytest.raises(RunError, match=r"^--attack-eps: M has no row in model.FAMILIES, so no input-embedding path"):
        evaluate.run("M", [data], str(tmp_path / "out"), loaded=generic, attack=A.settings([0.01]))
    vqa = tmp_path / "data" / "vqa.jsonl"
    vqa.write_text("".join(line for line in open(data) if '"vqa"' in line))
    with pytest.raises(RunError, match=r"^--attack-eps: the data has no image- or text-heavy sample"):
        evaluate.run("M", [str(vqa)], str(tmp_path / "out"), ["orig"], loaded=generic, attack=A.settings([0.01]))


# ---- diagnose.py and the robustness curve -------------------------------------------------------------------

def _attack_run(flips):
    """Rows of one run: orig and attack rows of image- (two sources) and text-heavy samples; `flips` maps
    (id, radius) to whether the attack flipped the answer."""
    rows = []
    for sid, task, source in (("a", "image_heavy", "cls"), ("b", "image_heavy", "cls"), ("c", "image_heavy", "obj"),
                              ("t", "text_heavy", "qa"), ("u", "text_heavy", "qa")):
        rows.append(_pred(sid, task, source, "orig", [0.7, 0.3], 0, 0))
        for eps in (0.01, 0.1):
            flip = flips.get((sid, eps), False)
            probs = [0.4, 0.6] if flip else [0.6, 0.4]
            rows.append(dict(_pred(sid, task, source, perturb.attack_name(eps), probs, int(flip), 0),
                             eps=eps))
    rows.append(_pred("v", "vqa", "vqa", "orig", [0.6, 0.4], 0, 0))
    return rows


RUNS = {"vanilla": {("a", 0.01): True, ("a", 0.1): True, ("c", 0.1): True, ("t", 0.1): True, ("u", 0.1): True},
        "ours": {("b", 0.1): True}}


def _write_runs(tmp_path, runs=RUNS):
    paths = []
    for name, flips in runs.items():
        paths.append(tmp_path / name / "eval" / "predictions.jsonl")
        paths[-1].parent.mkdir(parents=True)
        paths[-1].write_text("".join(json.dumps(r) + "\n" for r in _attack_run(flips)))
    return paths


def test_diagnose_reads_attack_rows_as_interventions_of_image_and_text_heavy_tasks(tmp_path):
    import diagnose
    (path,) = _write_runs(tmp_path, {"vanilla": RUNS["vanilla"]})
    summary = diagnose.summarize(diagnose.read(str(path)))
    assert list(summary["cls"]) == ["orig", "attack@0.01", "attack@0.1"]
    assert summary["cls"]["attack@0.01"]["delta_cp"] == 0.5 and summary["qa"]["attack@0.1"]["delta_cp"] == 1
    assert summary["qa"]["attack@0.1"]["tv"] == pytest.approx(0.3) and summary["qa"]["attack@0.1"]["acc"] == 0
    assert "| cls | worst" not in diagnose.table(summary)  # the paper's worst column is of heuristic interventions
    for name, task in (("attack@0.01", "vqa"), ("attack@0", "image_heavy"), ("attack@1e-2", "image_heavy")):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps(_pred("v", "vqa" if task == "vqa" else "image_heavy", "s", "orig", [0.6, 0.4], 0, 0))
                       + "\n" + json.dumps(_pred("v", task, "s", name, [0.6, 0.4], 0, 0)) + "\n")
        with pytest.raises(perturb.DataError, match=f"intervention '{name}' does not apply to task '{task}'"):
            diagnose.read(str(bad))


def test_curve_points_are_delta_cp_per_task_kind_over_the_runs_sources(tmp_path):
    import diagnose
    import charts
    runs = [diagnose.read(str(q)) for q in _write_runs(tmp_path)]
    points = charts.curve_points(runs, diagnose.summarize)
    assert list(points) == ["image_heavy", "text_heavy"]
    for task, ids in (("image_heavy", "abc"), ("text_heavy", "tu")):
        for line, flips in zip(points[task], RUNS.values()):  # by hand: the share of the kind's samples flipped
            want = []
            for eps in (0.01, 0.1):
                f = [flips.get((i, eps), False) for i in ids]
                want.append((eps, sum(f) / len(f), *diagnose.bootstrap_ci(f)))
            assert len(line) == len(want) and all(got == pytest.approx(w) for got, w in zip(line, want))
    assert points["image_heavy"][0][0][1] == pytest.approx(1 / 3)  # a of a, b (cls) and c (obj): sources pooled


def test_the_chart_of_attack_runs_is_the_robustness_curve(tmp_path, monkeypatch):
    import diagnose
    saved = _saved_figures(monkeypatch)
    paths = _write_runs(tmp_path)
    png = tmp_path / "curve.png"
    diagnose.main(["--chart", str(png)] + [str(q) for q in paths])
    axes = saved[0].axes
    assert [ax.get_title() for ax in axes] == ["image-heavy", "text-heavy"] and axes[0].get_xscale() == "log"
    for ax, want in zip(axes, ([1 / 3, 2 / 3], [0, 1])):  # vanilla's line, by hand (see RUNS)
        vanilla, ours = ax.containers
        assert (vanilla.get_label(), ours.get_label()) == ("vanilla", "ours")
        assert list(vanilla.lines[0].get_xdata()) == [0.01, 0.1] and list(vanilla.lines[0].get_ydata()) == \
            pytest.approx(want)
    assert Image.open(png).size == (1000, 450)
    image = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)
    counts = [int((image == c).all(1).sum()) for c in ([31, 119, 180], [255, 127, 14])]  # C0, C1
    assert min(counts) > 200 and (image != 255).any(1).mean() > 0.02  # lines drawn, not a blank canvas
    # the radar on request, the attacks its axes too; a run without attack rows cannot join a curve
    diagnose.main(["--chart", str(tmp_path / "radar.png"), "--chart-kind", "radar", str(paths[0])])
    labels = [t.get_text() for t in saved[1].axes[0].get_xticklabels()]
    assert labels[:3] == ["cls\norig", "cls\nattack@0.01", "cls\nattack@0.1"]
    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in _attack_run({}) if "attack" not in r["intervention"]))
    with pytest.raises(SystemExit, match=f"error: {plain}: no attack rows for the robustness curve"):
        diagnose.main(["--chart", str(tmp_path / "c2.png"), str(paths[0]), str(plain)])
    with pytest.raises(SystemExit, match="--relative is an option of the radar chart"):
        diagnose.main(["--chart", str(tmp_path / "c2.png"), "--relative", str(paths[0])])
    assert not (tmp_path / "c2.png").exists()
