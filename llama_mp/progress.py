"""A progress line with rate and ETA, printed on global rank 0 at most every `every` seconds."""

import sys
import time

import torch.distributed as dist


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    def __init__(self, total: int, desc: str, unit: str = "items", every: float = 10.0, enabled: bool = True):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.done, self.extra = 0, 0  # extra: a second counter (tokens) reported as a rate only
        self.start = self.last = time.perf_counter()
        self.printed = False
        self.enabled = enabled and (not dist.is_initialized() or dist.get_rank() == 0)

    def update(self, n: int = 1, tokens: int = 0) -> None:
        self.done += n
        self.extra += tokens
        now = time.perf_counter()
        # A closing line only for jobs that already reported: short calls inside a longer job stay quiet.
        if self.enabled and (now - self.last >= self.every or (self.done >= self.total and self.printed)):
            self.last, self.printed = now, True
            self.print(now)

    def print(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        tok = f", {self.extra / elapsed:.0f} tok/s" if self.extra else ""
        eta_text = _duration(eta) if eta != float("inf") else "?"
        print(f"[{self.desc}] {self.done}/{self.total} {self.unit} ({rate:.2f}/s{tok}), "
              f"elapsed {_duration(elapsed)}, ETA {eta_text}", file=sys.stderr, flush=True)
