"""train.py's data: the task pools of --data mixed in the ratios of --ratio-image and --ratio-text, each pool an
endless stream of reshuffled passes (Schedule), and each step's rows: its originals with their heuristically
perturbed twins, collated per micro-step (Batches), and each row's noise (noise_like). A step's rows and noise
depend on (seed, step) alone, so a resumed run, and any split over ranks and micro-steps, sees exactly the same ones.
"""
import hashlib
import math
import random
import sys
from fractions import Fraction

import torch

import perturb
import samples as S
import prompts as P

TWINS = perturb.twins()  # heuristic perturbations to train on, by task: the twin column of perturb.INTERVENTIONS


def ratios(args):
    """Each task's share of a step's originals, as exact fractions: in floats ceil(100 * 0.55) is 56, and the
    schedule would drift from the ratios."""
    image, text = (Fraction(r).limit_denominator(10**6) for r in (args.ratio_image, args.ratio_text))
    return {"image_heavy": image, "text_heavy": text, "vqa": max(Fraction(0), 1 - image - text)}


def read(args):
    """(paths, samples, file of each sample by id()): the files of --data, checked and their images decoded, so
    bad files fail here, before any model is loaded (with one line naming the file and line)."""
    paths = [S.data_file(d, "train") for d in args.data]
    try:
        loaded = S.load_files(paths, decode=True)  # a broken image, or an id in two files, too
    except (perturb.DataError, FileNotFoundError) as e:  # messages written for people: file, line, what to do
        sys.exit(f"error: {e}")
    return paths, [s for _, part in loaded for s in part], {id(s): path for path, part in loaded for s in part}


def ri_images(args, samples, schedule):
    """The real images RI twins draw from (--ri-folder's instead of the data's image-heavy ones), or None."""
    if not args.aug or "text_heavy" not in schedule.pools:
        return None
    try:
        return perturb.ri_pool(samples, args.ri_folder)
    except perturb.DataError as e:
        sys.exit(f"error: text-heavy twins need real images for RI: {e}")


class Schedule:
    """The originals of every step, from the task pools with a positive ratio."""

    def __init__(self, args, samples, world, paths):
        rates = ratios(args)
        self.seed, self.G = args.seed, args.batch_size * world * args.grad_accum  # originals per step, all ranks
        self.pools = {t: [s for s in samples if s["task"] == t] for t in rates if rates[t] > 0}
        self.pools = {t: pool for t, pool in self.pools.items() if pool}
        if not self.pools:
            sys.exit(f"error: no training samples for the tasks with a positive ratio "
                     f"{ {t: float(r) for t, r in rates.items()} } in {paths}")
        if list(self.pools) == ["vqa"] and (args.aug or args.adv != "none" or args.cons != "none"):
            sys.exit(f"error: --preset {args.preset} trains on VQA samples alone here (the data, or the ratios, has no "
                     f"image- or text-heavy ones), so its twins, PGD and L_cons would do nothing: add such data, or "
                     f"pass --preset fft-vqa for plain fine-tuning")
        self.share = {t: rates[t] / sum(rates[t] for t in self.pools) for t in self.pools}
        # steps for one pass over each pool; the authors' sampler ends an epoch when the first pool runs out
        # (their 10-hour runs), where waiting for the largest (LLaVA-Instruct's 624k) would take 20-40 times longer
        self.passes = {t: math.ceil(len(self.pools[t]) / (self.G * self.share[t])) for t in self.pools}
        self.steps_per_epoch = (min if args.epoch_end == "smallest" else max)(self.passes.values())
        self.max_steps = args.max_steps if args.max_steps is not None else \
            math.ceil(args.epochs * self.steps_per_epoch)
        self.shuffled = {}  # task -> (cycle, permutation): one shuffle per pass over a pool

    def summary(self, args):
        twins = ("+ twins" if args.twins == "one" else "+ every twin of each") if args.aug else "no twins"
        return (f"originals per step {', '.join(f'{t} {float(self.G * self.share[t]):g}' for t in self.pools)} "
                f"({twins}); one pass over the smallest pool takes {min(self.passes.values())} steps, over the largest "
                f"{max(self.passes.values())}")

    def permutation(self, task, cycle):
        if self.shuffled.get(task, (None,))[0] != cycle:
            n = len(self.pools[task])
            self.shuffled[task] = cycle, random.Random(f"{self.seed}/{task}/{cycle}").sample(range(n), n)
        return self.shuffled[task][1]

    def slot(self, n):
        """The task of the n-th original overall (the slots of all steps in a row) and its index in that
        task's stream. The first task takes slot n where ceil(n * share) steps up, the next does the same
        among the slots left, and so on: after any n slots every task holds n * share of them within 2, at
        every batch size, and n alone decides, so any split over ranks and micro-steps gives the same step."""
        left = Fraction(1)
        for t in self.pools:
            q = self.share[t] / left  # its share of the slots the earlier tasks left; 1 for the last task
            k = math.ceil(n * q)  # its slots before n
            if math.ceil((n + 1) * q) > k:
                return t, k
            n, left = n - k, left - self.share[t]

    def originals(self, step):
        """The global batch of `step`."""
        out = []
        for t, j in map(self.slot, range(step * self.G, (step + 1) * self.G)):
            pool = self.pools[t]
            out.append(pool[self.permutation(t, j // len(pool))[j % len(pool)]])
        return out


class Batches:
    """This rank's micro-batches of every step: its share of the step's originals (Schedule), then their
    twins; `pairs` links each twin row to its original. Calling it may happen in a --workers process: CPU only,
    and nothing of the model (a forked worker must not touch CUDA)."""

    def __init__(self, args, schedule, processor, size, facts, ri_images, rank=0, world=1):
        self.args, self.originals, self.processor, self.size = args, schedule.originals, processor, size
        self.facts, self.ri_images, self.rank, self.world = facts, ri_images, rank, world

    def perturbed(self, s, name, rng):
        """s under a training intervention: the train pool of wordings, the run's facts and canvas size."""
        return perturb.perturb(s, name, rng, size=self.size, pool="train", ri_images=self.ri_images,
                               k=self.args.k_facts, facts=self.facts, replace=self.args.facts_replacement)

    def twins_of(self, s, step):
        """s's twins at `step`, as (row id, sample): --twins one draws one of its task's training interventions,
        --twins all makes each, each from its own seed."""
        a = self.args
        if not a.aug or s["task"] not in TWINS:
            return []
        if a.twins == "one":
            rng = random.Random(f"{a.seed}/{step}/{s['id']}/twin")
            return [(f"{s['id']}/twin", self.perturbed(s, rng.choice(TWINS[s["task"]]), rng))]
        return [(f"{s['id']}/{name}", self.perturbed(s, name, random.Random(f"{a.seed}/{step}/{s['id']}/{name}")))
                for name in TWINS[s["task"]]]

    def __call__(self, step):
        """[batch per micro-step], or the line that stops the run (the loop prints it)."""
        a, mine, out = self.args, self.originals(step), []
        for m in range(a.grad_accum):
            part = mine[m * self.world + self.rank::self.world * a.grad_accum]
            twins = [(i, row_id, t) for i, s in enumerate(part) for row_id, t in self.twins_of(s, step)]
            rows = [perturb.perturb(s, "orig", 0, size=self.size) for s in part] + [t for _, _, t in twins]
            try:
                batch = P.collate(self.processor, rows, train=True, max_length=a.max_length, style=a.prompt)
            except ValueError as e:  # the exact check, should a row be longer than measured before the model loaded
                return f"error: {e}"
            batch["ids"] = [s["id"] for s in part] + [row_id for _, row_id, _ in twins]  # seeds of each row's noise
            batch["pairs"] = [(i, len(part) + j) for j, (i, _, _) in enumerate(twins)]
            out.append(batch)
        return out


def noise_like(embeds, ids, seed, step, kind):
    """Standard normal noise per row of embeds (B, L, D), seeded by (seed, step, the row's sample id, kind): the same
    values whatever the padding, rank or process count, so one process and many compute the same step. PGD's
    random start and RG's noise (losses.pgd's and gaussian_noise's noise=), drawn like the twins above."""
    noise = torch.zeros_like(embeds)
    for r, sid in enumerate(ids):
        key = hashlib.sha256(f"{seed}/{step}/{sid}/{kind}".encode()).digest()
        g = torch.Generator().manual_seed(int.from_bytes(key[:8], "little"))
        noise[r] = torch.randn(embeds.shape[1:], generator=g).to(embeds.device, embeds.dtype)
    return noise
