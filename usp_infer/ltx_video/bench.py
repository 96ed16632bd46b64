"""The LTX-Video workload of `usp-infer bench`: a step is `pipeline.Denoiser.step`, what `generate` runs.

Random weights of a named `model.SHAPES` config are made on the device; the text is random T5-width output
of 128 tokens of which 24 are a prompt under the mask (the rest padding, as for a short prompt); 25 fps.
Torch alone is needed, except for the diffusers baseline.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Callable

import torch
from torch import Tensor, nn

from ..graphs import CudaGraph, GraphedCall
from ..guidance import Guider, LocalStats, StepScales
from ..layers import AttnFn
from ..parallel.plan import Plan, stg_shares_forward
from .model import LTXConfig, LTXTransformer, rope_tables
from .pipeline import Denoiser

TEXT_TOKENS = 128  # T5 length LTXPipeline pads the prompt to
PROMPT_TOKENS = 24  # real tokens under the text mask; the rest is padding, as for a short prompt
FPS = 25.0
SIGMA, DT = 0.9, -0.025  # a mid-schedule step; the values do not change the work


def step_flops(cfg: LTXConfig, tokens: int, branches: int, text_tokens: int = TEXT_TOKENS,
               shared_blocks: int = 0) -> dict[str, int]:
    """Model FLOPs of one step (2 per multiply-add), by part: what an implementation computes. `shared_blocks`:
    block evaluations a perturbed row does not run (it starts from the cond row's hidden states at its first
    perturbed block: `shared_blocks` below).

    Per branch and layer, with d = heads x head_dim, n video tokens and t text tokens:
    self-attention q, k, v, out projections 8nd^2; its QK^T and PV 4n^2d; cross-attention q and out on
    the video 4nd^2, k and v on the text 4td^2, its QK^T and PV 4ntd; FFN d -> 4d -> d 16nd^2. Once per
    branch: proj_in, proj_out, the caption projection and the timestep embedding. Pads are not counted.
    """
    d, n, t, layers = cfg.inner_dim, tokens, text_tokens, cfg.num_layers
    per_branch = {
        "self_attn_proj": 8 * n * d * d * layers,
        "self_attn_sdpa": 4 * n * n * d * layers,
        "cross_attn_proj": (4 * n + 4 * t) * d * d * layers,
        "cross_attn_sdpa": 4 * n * t * d * layers,
        "ffn": 16 * n * d * d * layers,
        "embed_out": 2 * n * d * (cfg.in_channels + cfg.out_channels)
        + 2 * t * d * (cfg.caption_channels + d)
        + 2 * d * (256 + d + 6 * d),
    }
    runs = branches * layers - shared_blocks  # block evaluations; "embed_out" is once per branch
    return {part: flops * branches if part == "embed_out" else flops // layers * runs
            for part, flops in per_branch.items()}


def shared_blocks(s, cfg_degree: int | None) -> int:
    """Blocks the perturbed row skips in one step as this code runs it on a cfg degree (None: as diffusers runs
    it, every block): with batched branches and the cond row on the same cfg rank (branch j on rank j % degree),
    the blocks before the first perturbed one."""
    scales = s.guidance().at(SIGMA)
    return min(scales.stg_blocks) if cfg_degree and stg_shares_forward(scales.branches, cfg_degree, s.branch_mode) else 0


def random_model(cfg: LTXConfig, device: torch.device, dtype: torch.dtype, seed: int,
                 randomize: Callable[[nn.Module, int], None]) -> LTXTransformer:
    """The transformer with random weights allocated once, directly on `device` in `dtype`."""
    with torch.device("meta"):
        model = LTXTransformer(cfg)
    model = model.to(dtype).to_empty(device=device)
    randomize(model, seed)
    return model.eval().requires_grad_(False)


def make_step(model: LTXTransformer, s, plan: Plan, video_self: AttnFn | None,
              cuda_graphs: bool = False) -> tuple[Callable[[], None], dict]:
    """One denoising step of the bench's setup `s`; `video_self` replaces the self-attention (the exchange-free
    variant that measures the exchanges' share), None = the plan's own; cuda_graphs: the block loop replayed
    as a CUDA graph (graphs.py; captured in the second step)."""
    cfg, device = s.cfg, s.device
    shard = plan.shard(s.tokens)
    gen = torch.Generator(device).manual_seed(1)  # the same global inputs on every rank
    latents = shard.split(torch.randn(1, s.tokens, cfg.in_channels, generator=gen, device=device))
    rope = tuple(shard.split(t) for t in rope_tables(cfg, *s.grid, (8 / FPS, 32.0, 32.0), device))
    attn_fn = video_self or plan.self_attention(shard)
    mask = (torch.arange(TEXT_TOKENS, device=device) < PROMPT_TOKENS)[None]  # (1, L)
    text = {name: (torch.randn(1, TEXT_TOKENS, cfg.caption_channels, generator=gen, device=device).to(s.dtype), mask)
            for name in ("cond", "uncond")}
    guider = Guider(stats=shard, count=s.tokens * cfg.in_channels)
    blocks = GraphedCall(model.run_blocks, CudaGraph(device)) if cuda_graphs else None
    denoiser = Denoiser(model, plan, text, rope, attn_fn, guider, s.branch_mode, blocks=blocks)
    scales: StepScales = s.guidance().at(SIGMA)
    t, sigma, sigma_next = (torch.tensor(v, device=device) for v in (SIGMA * 1000.0, SIGMA, SIGMA + DT))
    level = None
    if s.image:  # image-to-video: the first latent frame at noise level 0 (timestep 0), never stepped
        full = torch.ones(1, s.tokens, 1, device=device)
        full[:, : s.grid[1] * s.grid[2]] = 0.0
        level = shard.split(full)
    state = {"latents": latents, "finite": True}

    def step() -> None:
        state["latents"] = denoiser.step(state["latents"], t, sigma, sigma_next, scales, level)
        state["finite"] &= not plan.any_nonfinite(state["latents"])

    return step, state


def diffusers_case(s, world: int, seed: int, randomize: Callable[[nn.Module, int], None],
                   measure: Callable) -> tuple[list[float], list[float], bool, str, Callable[[], str]]:
    """diffusers' LTXVideoTransformer3DModel, Ulysses over every rank (`enable_parallelism`), branches batched.

    It is timed without the text mask: given one, its Ulysses path fails (the mask is not sharded by heads). The returned
    function tries that once and says what happened; call it last, since a failure may leave ranks apart.
    """
    import diffusers  # the baseline only: the rest of bench needs nothing beyond torch
    from diffusers import ContextParallelConfig, LTXVideoTransformer3DModel

    cfg, device = s.cfg, s.device
    with torch.device("meta"):
        model = LTXVideoTransformer3DModel(**asdict(cfg))
    model = model.to(s.dtype).to_empty(device=device)
    randomize(model, seed)
    model.eval().requires_grad_(False)
    if world > 1:
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
    frames, height, width = s.grid
    gen = torch.Generator(device).manual_seed(1)
    b = s.branches
    latents = torch.randn(1, s.tokens, cfg.in_channels, generator=gen, device=device)
    text = torch.randn(b, TEXT_TOKENS, cfg.caption_channels, generator=gen, device=device).to(s.dtype)
    scales = s.guidance().at(SIGMA)
    guider = Guider(stats=LocalStats(), count=s.tokens * cfg.in_channels)  # its output is gathered: all tokens
    timestep = torch.full((b,), SIGMA * 1000.0, device=device)
    state = {"latents": latents, "finite": True}

    def forward(mask: Tensor | None) -> Tensor:
        return model(hidden_states=state["latents"].to(s.dtype).expand(b, -1, -1), encoder_hidden_states=text,
                     timestep=timestep, encoder_attention_mask=mask, num_frames=frames, height=height, width=width,
                     rope_interpolation_scale=(8 / FPS, 32.0, 32.0), return_dict=False)[0]

    def step() -> None:
        preds = dict(zip(scales.branches, forward(None).float().split(1)))
        state["latents"] = state["latents"] + DT * guider.combine(preds, scales)
        state["finite"] &= bool(torch.isfinite(state["latents"]).all())

    def try_mask() -> str:
        mask = (torch.arange(TEXT_TOKENS, device=device) < PROMPT_TOKENS)[None].expand(b, -1).to(s.dtype)
        try:
            with torch.no_grad():
                forward(mask)
            return "ok"
        except Exception as e:  # noqa: BLE001 - recorded: the baseline table depends on this fact
            return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]

    times, peaks = measure(step)
    return times, peaks, state["finite"], f"diffusers {diffusers.__version__}", try_mask
