"""What a run says of its own progress: the count, rate and time left of train.py's steps and evaluate.py's samples
(progress), and train.py --profile: seconds per phase of a step, peak memory, and how much of the attacked rows'
positions PGD's passes covered (shortcuts.py fills it), written to metrics.jsonl for bench.py.
"""
import resource
import sys
import time

import torch

_last_print = [0.0]


def progress(done, total, t0, unit="samples", extra="", every=30.0):
    """Count, rate and time left on stderr. In a terminal one self-overwriting line, at most twice a
    second; in a file (torchrun, a batch scheduler) a plain line at most every `every` seconds and at the
    end, where self-overwriting updates would pile up into one line of thousands of characters."""
    tty = sys.stderr.isatty()
    if done < total and time.time() - _last_print[0] < (0.5 if tty else every):
        return
    _last_print[0] = time.time()
    rate = done / max(time.time() - t0, 1e-9)
    eta = (total - done) / rate if rate > 0 else 0
    line = f"{done}/{total} {unit} | {rate:.1f} {unit}/s | ETA {int(eta) // 60}:{int(eta) % 60:02d} {extra}"
    if tty:
        print("\r" + line, end="\n" if done >= total else "", file=sys.stderr, flush=True)
    else:
        print(line.rstrip(), file=sys.stderr, flush=True)


class Profile:
    """Off, a lap costs nothing."""

    def __init__(self, on=False, device=None):
        self.on, self.device = on, device
        self.new_step()

    def new_step(self):
        self.phases, self.mark, self.notes = {}, 0.0, {}
        self.shortcut = {"covered": 0, "whole": 0, "final": False}
        if self.on and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.lap()

    def lap(self, name=None):
        """Adds the seconds since the previous lap to phases[name], once the GPU has finished its queue."""
        if self.on:
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            if name:
                self.phases[name] = self.phases.get(name, 0.0) + now - self.mark
            self.mark = now

    def note(self, name, value):
        """A number of this micro-batch for metrics.jsonl (its step records the mean over micro-batches). Kept as a
        tensor until record(): reading it now would make the host wait for the device mid-step."""
        self.notes.setdefault(name, []).append(value.detach() if torch.is_tensor(value) else value)

    def record(self):
        """What metrics.jsonl gets of this step: the notes' means over its micro-batches (this rank's: losses.pgd's
        pgd_move, train.losses_of's adv_over_clean), and with --profile on, the phases and peak memory."""
        notes = {k: float(sum(v) / len(v)) for k, v in self.notes.items()}
        if not self.on:
            return notes
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # on CPU the peak resident size (Linux: KiB)
        return {**notes, "phases": self.phases, "peak_mem": peak, "shortcut": self.shortcut}
