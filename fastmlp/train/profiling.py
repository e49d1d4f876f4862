"""--profile-steps N: a torch.profiler record of N training steps, written into RUN_DIR/profile/.

    python -m fastmlp train --profile-steps 20 --epochs 1

The window starts after WARMUP_STEPS steps of the session (a new run, or a resumed one), so one-time
work (allocator growth, lazy optimizer state, compilation) stays out of it, and ends after N steps
or with the training, whichever comes first. Written then:
- profile/trace.json: the timeline (Perfetto, https://ui.perfetto.dev, or chrome://tracing), CPU
  ops and, on a GPU, the kernels each op launched;
- profile/ops.txt: the ops by self time (GPU time on a GPU), with call counts: where a step's time
  goes, fastmlp's fused ops (fastmlp::linear_act_forward, ...) among torch's.
The profiler observes and changes no numbers: a profiled run trains exactly as one that is not.
"""

import os
from pathlib import Path

import torch

from .checkpoint import atomic_write_text

__all__ = ["StepProfiler", "WARMUP_STEPS", "PROFILE_FOLDER"]

WARMUP_STEPS = 5
PROFILE_FOLDER = "profile"


class StepProfiler:
    """Profiles `steps` optimizer steps, from WARMUP_STEPS steps into a session that starts at
    global step session_start; call before_step / after_step around each optimizer step."""

    def __init__(self, run_dir, steps, device, session_start):
        self.dir = Path(run_dir) / PROFILE_FOLDER
        self.steps, self.cuda = steps, torch.device(device).type == "cuda"
        self.start = session_start + WARMUP_STEPS
        self.prof, self.profiled, self.done = None, 0, False

    def before_step(self, global_step):
        if self.prof is None and not self.done and global_step >= self.start:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=activities)
            self.prof.__enter__()

    def after_step(self):
        """Returns the written files once the window is full, else None."""
        if self.prof is None:
            return None
        self.profiled += 1
        return self.finish() if self.profiled >= self.steps else None

    def finish(self):
        """Stop and write what was recorded (the window cut short by the end of training too);
        returns the written files, or None if nothing was recorded."""
        if self.prof is None:
            return None
        prof, self.prof, self.done = self.prof, None, True
        prof.__exit__(None, None, None)
        self.dir.mkdir(exist_ok=True)
        trace = self.dir / "trace.json"
        tmp = self.dir / ".trace.json.tmp"
        prof.export_chrome_trace(str(tmp))
        os.replace(tmp, trace)  # (whole, or the old one: as the other files of the run folder)
        sort = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        ops = self.dir / "ops.txt"
        atomic_write_text(ops, f"{self.profiled} training steps, ops by {sort.replace('_', ' ')}\n"
                          + prof.key_averages().table(sort_by=sort, row_limit=40) + "\n")
        return trace, ops

    def abandon(self):
        """Stop without writing (the run stopped with an error or Ctrl-C)."""
        if self.prof is not None:
            prof, self.prof = self.prof, None
            prof.__exit__(None, None, None)
