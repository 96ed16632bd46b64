"""The flow-matching schedule both LTX families use: diffusers' FlowMatchEulerDiscreteScheduler set up as
LTXPipeline and LTX2Pipeline set it (sigmas linspace(1, 1/N, N), a dynamic shift from the global token count,
the terminal stretch), and the settings the released checkpoints ship with."""

from __future__ import annotations

import numpy as np
import torch

# The scheduler settings LTX-Video and LTX-2 checkpoints ship (mu 0.95 at 1,024 tokens -> 2.05 at 4,096).
# As Lightricks/LTX-Video ships scheduler/scheduler_config.json (and diffusers' conversion script):
# the shift mu is interpolated from the token count, 0.95 at 1024 tokens to 2.05 at 4096.
SCHEDULER_CONFIG: dict = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.95,
    "max_shift": 2.05,
    "base_image_seq_len": 1024,
    "max_image_seq_len": 4096,
    "shift_terminal": 0.1,
    "time_shift_type": "exponential",
}


def sigma_schedule(scheduler_config: dict, steps: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps, sigmas) for `steps` steps, dynamic shift from the global token count, as LTXPipeline."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.ltx.pipeline_ltx import calculate_shift

    if steps == 1:
        # The terminal stretch rescales the schedule so that its last sigma is `shift_terminal`; one step has
        # only sigma 1 (which every shift keeps at 1), so the stretch divides by zero (diffusers' LTXPipeline
        # gives NaN too). Without it one step is the plain Euler step from sigma 1 to 0: the model's x0 guess.
        scheduler_config = {**scheduler_config, "shift_terminal": None}
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    mu = calculate_shift(
        tokens,
        scheduler.config.get("base_image_seq_len", 256),
        scheduler.config.get("max_image_seq_len", 4096),
        scheduler.config.get("base_shift", 0.5),
        scheduler.config.get("max_shift", 1.15),
    )
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu, device="cpu")
    return scheduler.timesteps, scheduler.sigmas


def explicit_schedule(scheduler_config: dict, sigmas) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps, sigmas + [0]) for a sigma list run as given (LTX-2's distilled and stage-2 lists): diffusers'
    FlowMatchEulerDiscreteScheduler with use_dynamic_shifting=False and shift_terminal=None, in float32 as it
    computes them; its `shift` (1 in the LTX folders) still maps s to shift s / (1 + (shift - 1) s)."""
    s = torch.tensor(sigmas, dtype=torch.float32)
    shift = float(scheduler_config.get("shift", 1.0))
    s = shift * s / (1 + (shift - 1) * s)
    return s * scheduler_config.get("num_train_timesteps", 1000), torch.cat([s, torch.zeros(1)])
