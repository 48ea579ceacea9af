"""train.py --profile: seconds per phase of a step, peak memory, and how much of the attacked rows' positions PGD's
passes covered (shortcuts.py fills it), written to metrics.jsonl for bench.py. Off, a lap costs nothing.
"""
import resource
import time

import torch


class Profile:
    def __init__(self, on=False, device=None):
        self.on, self.device = on, device
        self.new_step()

    def new_step(self):
        self.phases, self.mark = {}, 0.0
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

    def record(self):
        """What metrics.jsonl gets of this step: nothing when off."""
        if not self.on:
            return {}
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else \
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # on CPU the peak resident size (Linux: KiB)
        return {"phases": self.phases, "peak_mem": peak, "shortcut": self.shortcut}
