"""The LTX-2 workload of `usp-infer bench`: a step is `pipeline.Denoiser.step`, what `generate` runs.

Random weights of a named `ltx2.SHAPES` config are made on the device; the text is random connector
output of 1,024 tokens under an all-ones mask (the connectors fill padding with registers, so the real
model sees no mask); 24 fps, so the audio is round(frames / 24 * 25) tokens. Torch alone is needed,
except for the diffusers baseline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, replace

import torch
from torch import Tensor, nn

from ..graphs import CudaGraph, GraphedCall
from ..guidance import LocalStats
from ..parallel.plan import Plan, stg_shares_forward
from .model import (
    LOCAL_ATTENTION,
    SHAPES,
    LTX2Config,
    LTX2Transformer,
    flops,
    rope_tables,
)
from .pipeline import BranchForward, Denoiser, LTX2Guidance, ModalityGuidance, guide

FPS = 24.0
TEXT_TOKENS = 1024
SIGMA, DT = 0.9, -0.025  # a mid-schedule step; the values do not change the work


def audio_tokens(num_frames: int) -> int:
    return round(num_frames / FPS * 25)


def guidance(cfg: LTX2Config, branches: int) -> LTX2Guidance:
    """1 branch: cond; 2: + uncond; 3: + STG-perturbed; 4: + modality-isolated (diffusers' LTX-2.3 scales)."""
    def scales(cfg_scale: float) -> ModalityGuidance:
        return ModalityGuidance(cfg=cfg_scale if branches > 1 else 1.0, stg=1.0 if branches > 2 else 0.0,
                                modality=3.0 if branches > 3 else 1.0, rescale=0.7)

    return LTX2Guidance(scales(3.0), scales(7.0), (min(28, cfg.num_layers - 1),))


def random_model(cfg: LTX2Config, device: torch.device, dtype: torch.dtype, seed: int,
                 randomize: Callable[[nn.Module, int], None]) -> LTX2Transformer:
    with torch.device("meta"):
        model = LTX2Transformer(cfg)
    model = model.to(dtype).to_empty(device=device)
    randomize(model, seed)
    return model.eval().requires_grad_(False)


def _text_widths(cfg: LTX2Config) -> tuple[int, int]:
    """What the connectors hand the transformer: caption width for LTX-2.0 (it projects), inner widths for 2.3."""
    if cfg.use_prompt_embeddings:
        return cfg.caption_channels, cfg.caption_channels
    return cfg.cross_attention_dim, cfg.audio_cross_attention_dim


def _inputs(cfg: LTX2Config, grid: tuple[int, int, int], num_frames: int, device, dtype, gen):
    tokens, audio = grid[0] * grid[1] * grid[2], audio_tokens(num_frames)
    video = torch.randn(1, tokens, cfg.in_channels, generator=gen, device=device)
    audio_latents = torch.randn(1, audio, cfg.audio_in_channels, generator=gen, device=device)
    width, audio_width = _text_widths(cfg)
    mask = torch.ones(1, TEXT_TOKENS, dtype=torch.bool, device=device)
    text = {name: (torch.randn(1, TEXT_TOKENS, width, generator=gen, device=device).to(dtype),
                   torch.randn(1, TEXT_TOKENS, audio_width, generator=gen, device=device).to(dtype), mask)
            for name in ("cond", "uncond")}
    return video, audio_latents, text


def make_step(model: LTX2Transformer, s, plan: Plan, video_self: Callable | None,
              cuda_graphs: bool = False) -> tuple[Callable[[], None], dict]:
    """The timed step on this rank and its state ({"finite": ...}); `video_self` overrides the attention;
    cuda_graphs: the block loop replayed as a CUDA graph (graphs.py; captured in the second step)."""
    cfg, device = model.cfg, s.device
    grid = s.grid
    shard = plan.shard(grid[0] * grid[1] * grid[2])
    gen = torch.Generator(device).manual_seed(1)  # the same global inputs on every rank
    video, audio, text = _inputs(cfg, grid, s.num_frames, device, s.dtype, gen)
    video = shard.split(video)
    rope = rope_tables(cfg, *grid, FPS, audio.shape[1], device).map_video(lambda x: shard.split(x, dim=1))
    attn = replace(LOCAL_ATTENTION, video_self=video_self or plan.self_attention(shard),
                   video_to_audio=plan.kv_sharded_attention(shard))
    g = guidance(cfg, s.branches)
    names = tuple(n for n in g.branches() if n != "perturbed" or cfg.perturbed_attn)
    keep = level = None
    if s.image:  # image-to-video: the first latent frame is the image, at timestep 0, never stepped
        cond = torch.zeros(1, shard.total, device=device)
        cond[:, : grid[1] * grid[2]] = 1.0
        keep, level = shard.split(cond)[..., None] > 0, 1.0 - shard.split(cond)
    blocks = GraphedCall(model.run_blocks, CudaGraph(device)) if cuda_graphs else None
    forward = BranchForward(model, text, rope, attn, g.stg_blocks, s.branch_mode, blocks=blocks)
    denoiser = Denoiser(forward, plan, names, g, shard, shard.total * cfg.in_channels,
                        audio.shape[1] * audio.shape[2], keep, level)
    t = torch.tensor(SIGMA * 1000.0, device=device)
    state = {"video": video, "audio": audio, "finite": True}

    def step() -> None:
        state["video"], state["audio"] = denoiser.step(state["video"], state["audio"], t, SIGMA, DT)
        state["finite"] &= not plan.any_nonfinite(state["video"], state["audio"])

    return step, state


def step_flops(cfg: LTX2Config, s, cfg_degree: int | None = 1) -> dict[str, float]:
    """The FLOPs of one step's forwards as this code runs them on a cfg degree (None: as diffusers' pipeline
    runs them): the perturbed row skips the blocks before the first STG block where it shares a batch with the
    cond row (batched branches, both on one cfg rank: run_branches puts branch j on rank j % degree)."""
    grid = s.grid
    g = guidance(cfg, s.branches)
    names = [n for n in g.branches() if n != "perturbed" or cfg.perturbed_attn]
    shared = min(g.stg_blocks) if cfg_degree and stg_shares_forward(names, cfg_degree, s.branch_mode) else 0
    parts = flops(cfg, grid[0] * grid[1] * grid[2], audio_tokens(s.num_frames), TEXT_TOKENS, len(names),
                  isolated=names.count("isolated"), shared_blocks=shared)
    parts.pop("total")  # the record sums the parts itself
    return parts


def v2a_exchange_bytes(cfg: LTX2Config, video_tokens: int, audio_tokens: int, batch: int, ranks: int) -> dict:
    """Bytes one rank sends per step for the video->audio attention over a sequence split on `ranks` ranks.

    Ours (usp.KVShardedAttention): per block an all-reduce (max) of the fp32 log-sum-exp (B, H_a, S_a) and
    one (sum) of the weighted outputs with their weights (B, H_a, S_a, D_a + 1): audio-sized, whatever the
    video's length; a ring all-reduce sends 2 (P - 1) / P of its payload. The alternative, an all-gather of
    the projected video keys and values (B, S_v, H_a * D_a) each, sends (P - 1) / P of them in the model dtype.
    """
    heads, dim = cfg.audio_num_attention_heads, cfg.audio_attention_head_dim
    merge = 4 * batch * heads * audio_tokens * (1 + dim + 1)  # lse max + (out, weight) sum, fp32
    gather = 2 * 2 * batch * video_tokens * heads * dim  # k and v, bf16
    share = (ranks - 1) / ranks
    return {"log_sum_exp_merge": cfg.num_layers * merge * 2 * share, "all_gather": cfg.num_layers * gather * share}


def diffusers_cases(s, seed: int, randomize, measure) -> list[tuple[str, list[float], list[float], bool]]:
    """diffusers' LTX2VideoTransformer3DModel, one GPU, the same weights' shape and inputs, two ways:

    `pipeline`: as LTX2Pipeline calls it per step (the CFG pair batched, then the STG pass, then the
    modality-isolated pass); `batched`: all branches as rows of one call (its isolation switch is per
    call, so the isolated row runs with the cross-modal attention on: the same work, not the same output).
    The guidance combine and both Euler updates are the same as ours.
    """
    from diffusers import LTX2VideoTransformer3DModel

    cfg, device = SHAPES[s.shape], s.device
    with torch.device("meta"):
        model = LTX2VideoTransformer3DModel(**asdict(cfg))
    model = model.to(s.dtype).to_empty(device=device)
    randomize(model, seed)
    model.eval().requires_grad_(False)
    grid = s.grid
    gen = torch.Generator(device).manual_seed(1)
    video, audio, text = _inputs(cfg, grid, s.num_frames, device, s.dtype, gen)
    g = guidance(cfg, s.branches)
    names = g.branches()
    tokens = video.shape[1]
    timestep = torch.full((1, tokens), SIGMA * 1000.0, device=device)
    if s.image:
        timestep[:, : grid[1] * grid[2]] = 0.0
    use_cross = cfg.cross_attn_mod

    def call(rows: tuple[str, ...], state, **kw) -> tuple[Tensor, Tensor]:
        b = len(rows)
        texts = [text["uncond" if n == "uncond" else "cond"] for n in rows]
        t = torch.full((b,), SIGMA * 1000.0, device=device)
        return model(
            hidden_states=state["video"].to(s.dtype).expand(b, -1, -1),
            audio_hidden_states=state["audio"].to(s.dtype).expand(b, -1, -1),
            encoder_hidden_states=torch.cat([x[0] for x in texts]),
            audio_encoder_hidden_states=torch.cat([x[1] for x in texts]),
            timestep=timestep.expand(b, -1), audio_timestep=t, sigma=t, audio_sigma=t,
            encoder_attention_mask=torch.cat([x[2] for x in texts]).to(s.dtype),
            audio_encoder_attention_mask=torch.cat([x[2] for x in texts]).to(s.dtype),
            num_frames=grid[0], height=grid[1], width=grid[2], fps=FPS, audio_num_frames=audio.shape[1],
            use_cross_timestep=use_cross, return_dict=False, **kw,
        )

    def run(mode: str):
        state = {"video": video, "audio": audio, "finite": True}

        def predict() -> dict[str, tuple[Tensor, Tensor]]:
            def stg(rows: tuple[str, ...]) -> dict:  # its perturbation mask is 0 on perturbed rows, in the model dtype
                mask = torch.tensor([0.0 if n == "perturbed" else 1.0 for n in rows], device=device, dtype=s.dtype)
                return dict(spatio_temporal_guidance_blocks=list(g.stg_blocks), perturbation_mask=mask)

            if mode == "batched":
                rows = names
                out = call(rows, state, **(stg(rows) if "perturbed" in rows else {}))
                return {n: (out[0][i : i + 1].float(), out[1][i : i + 1].float()) for i, n in enumerate(rows)}
            preds = {}
            pair = tuple(n for n in names if n in ("cond", "uncond"))
            out = call(pair, state)
            preds |= {n: (out[0][i : i + 1].float(), out[1][i : i + 1].float()) for i, n in enumerate(pair)}
            if "perturbed" in names:
                out = call(("perturbed",), state, **stg(("perturbed",)))
                preds["perturbed"] = (out[0].float(), out[1].float())
            if "isolated" in names:
                out = call(("isolated",), state, isolate_modalities=True)
                preds["isolated"] = (out[0].float(), out[1].float())
            return preds

        def step() -> None:
            preds = predict()
            v, a = state["video"], state["audio"]
            vx0 = {n: v - SIGMA * p[0] for n, p in preds.items()}
            ax0 = {n: a - SIGMA * p[1] for n, p in preds.items()}
            vv = (v - guide(vx0, g.video, LocalStats(), v.numel())) / SIGMA
            av = (a - guide(ax0, g.audio, LocalStats(), a.numel())) / SIGMA
            state["video"], state["audio"] = v + DT * vv, a + DT * av
            state["finite"] &= bool(torch.isfinite(state["video"]).all() and torch.isfinite(state["audio"]).all())

        times, peaks = measure(step)
        return times, peaks, state["finite"]

    results = []
    for mode in ("pipeline", "batched"):
        times, peaks, finite = run(mode)
        results.append((mode, times, peaks, finite))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results

