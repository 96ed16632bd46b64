"""usp_infer.ltx2.model against diffusers' LTX2VideoTransformer3DModel: tiny random weights, fp32, CPU."""

import copy
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from diffusers import LTX2VideoTransformer3DModel
from safetensors.torch import save_file
from test_ltx import randomize, rel_err
from torch.utils.flop_counter import FlopCounterMode

from usp_infer.ltx2 import model as ltx2
from usp_infer.ltx2.model import (
    LOCAL_ATTENTION,
    SHAPES,
    LTX2Attention,
    LTX2Config,
    LTX2Transformer,
    flops,
    load_transformer,
    rope_tables,
)

# The same ops in the same order as diffusers except where we fuse (addcmul for x * (1 + s) + t, gathering
# per-token modulation from the distinct timesteps, complex RoPE products): a few fp32 ulps per op over two
# blocks, so ~1e-7 measured; 1e-5 leaves room for other BLAS/SDPA summation orders, while a real math
# difference (a wrong modulation slot, a missed gate, the wrong RoPE pairing) moves the outputs by > 1e-3,
# as the checks that perturbations must move rows by > 1e-3 show.
RTOL = 1e-5

COMMON = dict(in_channels=8, out_channels=6, audio_in_channels=8, audio_out_channels=4, num_layers=2)
CONFIGS = {
    # LTX-2.0 flags: caption_projection, no gates, no cross_attn_mod, interleaved RoPE. Video 2 x 8 (16 channels:
    # 3-D RoPE leaves 2 pairs unrotated), audio 2 x 4; learned block norms; gate timestep factor 1/1000.
    "ltx2.0": dict(COMMON, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                   audio_num_attention_heads=2, audio_attention_head_dim=4, audio_cross_attention_dim=8,
                   caption_channels=12, rope_type="interleaved", norm_elementwise_affine=True,
                   cross_attn_timestep_scale_multiplier=1),
    # LTX-2.3 flags: gates, cross_attn_mod, prompt_adaln, perturbed_attn, connectors-width text, split RoPE.
    # Video 2 x 16 (32 channels: 1 unrotated pair in head 0), audio 2 x 8.
    "ltx2.3": dict(COMMON, num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
                   audio_num_attention_heads=2, audio_attention_head_dim=8, audio_cross_attention_dim=16,
                   rope_type="split", gated_attn=True, cross_attn_mod=True, audio_gated_attn=True,
                   audio_cross_attn_mod=True, use_prompt_embeddings=False, perturbed_attn=True),
}
GRID = (3, 2, 4)  # latent frames, height, width: S_v = 24 video tokens
S = GRID[0] * GRID[1] * GRID[2]
FPS = 24.0
S_A = 7  # audio tokens
L = 6  # text tokens


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tensors are tiny: intra-op threads only cost here, and a lot on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_reference(kwargs: dict, seed: int = 0) -> LTX2VideoTransformer3DModel:
    """diffusers' model, every parameter random."""
    torch.manual_seed(seed)
    return randomize(LTX2VideoTransformer3DModel(**kwargs).eval())


def text_width(kwargs: dict) -> tuple[int, int]:
    if kwargs.get("use_prompt_embeddings", True):
        return kwargs["caption_channels"], kwargs["caption_channels"]
    return kwargs["cross_attention_dim"], kwargs["audio_cross_attention_dim"]


def make_inputs(kwargs: dict, batch: int, timestep: str, mask: str = "padded", seed: int = 1) -> dict:
    """Our forward's tensors. timestep: "sample" (B,), "i2v" (B, S) with frame 0 at 0, "token" all distinct."""
    g = torch.Generator().manual_seed(seed)
    width, audio_width = text_width(kwargs)
    t = torch.rand(batch, generator=g) * 1000
    if timestep == "sample":
        video_t = t
    elif timestep == "i2v":  # t * (1 - conditioning mask): the first latent frame is clean
        video_t = t[:, None] * (torch.arange(S) >= S // GRID[0]).float()
    else:
        video_t = torch.rand(batch, S, generator=g) * 1000
    text_mask = audio_text_mask = None
    if mask == "padded":  # row b keeps its first L - 1 - (b % 3) tokens, the rest is padding
        keep = L - 1 - torch.arange(batch) % 3
        text_mask = torch.arange(L)[None, :] < keep[:, None]
        audio_text_mask = torch.arange(L)[None, :] < (keep - 1)[:, None]
    elif mask == "ones":
        text_mask = audio_text_mask = torch.ones(batch, L, dtype=torch.bool)
    return dict(
        video=torch.randn(batch, S, kwargs["in_channels"], generator=g),
        audio=torch.randn(batch, S_A, kwargs["audio_in_channels"], generator=g),
        text=torch.randn(batch, L, width, generator=g),
        audio_text=torch.randn(batch, L, audio_width, generator=g),
        text_mask=text_mask,
        audio_text_mask=audio_text_mask,
        timestep=video_t,
        audio_timestep=torch.rand(batch, generator=g) * 1000,
        sigma=torch.rand(batch, generator=g),
        audio_sigma=torch.rand(batch, generator=g),
    )


def rows(inputs: dict, index) -> dict:
    return {k: v if v is None else v[index] for k, v in inputs.items()}


def run_reference(ref, inputs: dict, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    mask = {k: None if inputs[k] is None else inputs[k].float() for k in ("text_mask", "audio_text_mask")}
    with torch.no_grad():
        return ref(
            hidden_states=inputs["video"], audio_hidden_states=inputs["audio"],
            encoder_hidden_states=inputs["text"], audio_encoder_hidden_states=inputs["audio_text"],
            encoder_attention_mask=mask["text_mask"], audio_encoder_attention_mask=mask["audio_text_mask"],
            timestep=inputs["timestep"], audio_timestep=inputs["audio_timestep"],
            sigma=inputs["sigma"], audio_sigma=inputs["audio_sigma"],
            num_frames=GRID[0], height=GRID[1], width=GRID[2], fps=FPS, audio_num_frames=S_A,
            return_dict=False, **kwargs,
        )


def run_ours(model: LTX2Transformer, inputs: dict, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model(**inputs, rope=rope_tables(model.cfg, *GRID, FPS, S_A), **kwargs)


def assert_close(got: tuple, expected: tuple) -> None:
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        assert rel_err(g, e) <= RTOL, rel_err(g, e)


def from_reference(ref) -> LTX2Transformer:
    model = LTX2Transformer(LTX2Config.from_dict(dict(ref.config)))
    model.load_state_dict(ref.state_dict())
    return model.eval()


@pytest.fixture(scope="module", params=[(name, sharded) for name in CONFIGS for sharded in (False, True)],
                ids=lambda p: f"{p[0]}-{'sharded' if p[1] else 'single'}")
def pair(request, tmp_path_factory):
    """(diffusers model, our model loaded from its save_pretrained folder, config kwargs)."""
    name, sharded = request.param
    ref = make_reference(CONFIGS[name])
    folder = tmp_path_factory.mktemp(name)
    ref.save_pretrained(folder, **({"max_shard_size": "30KB"} if sharded else {}))
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    assert index.is_file() == sharded and len(list(folder.glob("*.safetensors"))) > sharded
    return ref, load_transformer(folder, "cpu", torch.float32), CONFIGS[name]


@pytest.fixture(scope="module", params=list(CONFIGS))
def models(request):
    ref = make_reference(CONFIGS[request.param])
    return ref, from_reference(ref), CONFIGS[request.param]


@pytest.mark.parametrize("cross", [False, True], ids=["own-timestep", "cross-timestep"])
@pytest.mark.parametrize("timestep", ["sample", "i2v", "token"])
def test_matches_diffusers(pair, timestep, cross):
    ref, ours, kwargs = pair
    inputs = make_inputs(kwargs, batch=3, timestep=timestep)
    default, ours.use_cross_timestep = ours.use_cross_timestep, cross
    try:
        assert_close(run_ours(ours, inputs), run_reference(ref, inputs, use_cross_timestep=cross))
    finally:
        ours.use_cross_timestep = default


@pytest.mark.parametrize("mask", ["ones", "none"])
def test_unpadded_text(models, mask):
    ref, ours, kwargs = models
    inputs = make_inputs(kwargs, batch=2, timestep="sample", mask=mask)
    assert_close(run_ours(ours, inputs), run_reference(ref, inputs, use_cross_timestep=ours.use_cross_timestep))


def test_default_cross_timestep_follows_weights(pair):
    _, ours, kwargs = pair
    assert ours.use_cross_timestep == kwargs.get("cross_attn_mod", False)
    inputs = make_inputs(kwargs, batch=2, timestep="sample")
    base = run_ours(ours, inputs)
    ours.use_cross_timestep = not ours.use_cross_timestep
    try:
        flipped = run_ours(ours, inputs)
    finally:
        ours.use_cross_timestep = not ours.use_cross_timestep
    assert rel_err(flipped[0], base[0]) > 1e-3 and rel_err(flipped[1], base[1]) > 1e-3


def test_load_transformer_override(tmp_path):
    make_reference(CONFIGS["ltx2.3"]).save_pretrained(tmp_path)
    assert load_transformer(tmp_path, "cpu", torch.float32).use_cross_timestep
    assert not load_transformer(tmp_path, "cpu", torch.float32, use_cross_timestep=False).use_cross_timestep


def test_loaded_state_dict_is_diffusers(pair):
    ref, ours, _ = pair
    theirs, mine = ref.state_dict(), ours.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert not any(p.requires_grad for p in ours.parameters())


@pytest.mark.parametrize("blocks", [(0,), (1,), (0, 1)])
def test_stg_rows(models, blocks):
    ref, ours, kwargs = models
    inputs = make_inputs(kwargs, batch=3, timestep="i2v")
    stg_rows = torch.tensor([False, True, False])
    base = run_ours(ours, inputs)
    got = run_ours(ours, inputs, stg_blocks=blocks, stg_rows=stg_rows)
    expected = run_reference(ref, inputs, spatio_temporal_guidance_blocks=list(blocks),
                             perturbation_mask=(~stg_rows).float(), use_cross_timestep=ours.use_cross_timestep)
    assert_close(got, expected)
    for g, b in zip(got, base):  # unperturbed rows run the identical computation
        assert torch.equal(g[~stg_rows], b[~stg_rows])
        if kwargs.get("perturbed_attn"):
            assert rel_err(g[stg_rows], b[stg_rows]) > 1e-3
        else:  # LTX-2.0 weights have no perturbable attention: STG is a no-op there, as in diffusers
            assert torch.equal(g, b)


def test_stg_every_row_by_default(models):
    ref, ours, kwargs = models
    inputs = make_inputs(kwargs, batch=2, timestep="sample")
    expected = run_reference(ref, inputs, spatio_temporal_guidance_blocks=[1],
                             use_cross_timestep=ours.use_cross_timestep)
    assert_close(run_ours(ours, inputs, stg_blocks=(1,)), expected)


def test_stg_video_alone(models):
    """stg_audio=False (audio-to-video) perturbs the video's self-attention only: neither plain STG nor none."""
    _, ours, kwargs = models
    if not kwargs.get("perturbed_attn"):
        pytest.skip("LTX-2.0 weights have no perturbable attention")
    inputs = make_inputs(kwargs, batch=2, timestep="sample")
    plain, both, video = (run_ours(ours, inputs, **kw) for kw in ({}, {"stg_blocks": (0,)},
                                                                   {"stg_blocks": (0,), "stg_audio": False}))
    for stream in range(2):
        assert rel_err(video[stream], plain[stream]) > 1e-3 and rel_err(video[stream], both[stream]) > 1e-3


@pytest.mark.parametrize("isolate", [[True, False, True], [False, True, True], [True, True, True]],
                         ids=["among-others", "trailing", "all"])  # zero gates; rows skipped; nothing cross-modal
def test_isolate_rows(models, isolate):
    ref, ours, kwargs = models
    inputs = make_inputs(kwargs, batch=3, timestep="i2v")
    isolate = torch.tensor(isolate)
    base = run_ours(ours, inputs)
    got = run_ours(ours, inputs, isolate_rows=isolate)
    expected = run_reference(ref, inputs, isolate_modalities=True, use_cross_timestep=ours.use_cross_timestep)
    for g, e, b in zip(got, expected, base):
        assert rel_err(g[isolate], e[isolate]) <= RTOL
        # The other rows are untouched; run in a smaller batch, their GEMMs may sum in another order: RTOL.
        assert (~isolate).sum() == 0 or rel_err(g[~isolate], b[~isolate]) <= RTOL
        assert rel_err(g[isolate], b[isolate]) > 1e-3


@pytest.mark.parametrize("timestep", ["sample", "i2v"])
def test_four_branches_in_one_batch(models, timestep):
    """Rows cond, uncond, perturbed, isolated (uncond with its own text) equal diffusers' three calls."""
    ref, ours, kwargs = models
    cond = make_inputs(kwargs, batch=1, timestep=timestep, seed=2)
    uncond = rows(make_inputs(kwargs, batch=2, timestep=timestep, seed=3), slice(1, 2))  # another text length
    batch = {k: None if v is None else torch.cat([v] * 4) for k, v in cond.items()}
    for k in ("text", "audio_text", "text_mask", "audio_text_mask"):
        batch[k][1] = uncond[k][0]
    stg_blocks = (1,)
    got = run_ours(ours, batch, stg_blocks=stg_blocks, stg_rows=torch.tensor([False, False, True, False]),
                   isolate_rows=torch.tensor([False, False, False, True]))
    cross = dict(use_cross_timestep=ours.use_cross_timestep)
    pair_expected = run_reference(ref, rows(batch, slice(0, 2)), **cross)
    perturbed = run_reference(ref, rows(batch, slice(2, 3)),
                              spatio_temporal_guidance_blocks=list(stg_blocks), **cross)
    isolated = run_reference(ref, rows(batch, slice(3, 4)), isolate_modalities=True, **cross)
    expected = tuple(torch.cat([pair_expected[j], perturbed[j], isolated[j]]) for j in range(2))
    for g, e in zip(got, expected):
        for row in range(4):
            assert rel_err(g[row], e[row]) <= RTOL, (row, rel_err(g[row], e[row]))
    assert rel_err(got[0][0], got[0][1]) > 1e-3  # the uncond text is really another text


@pytest.mark.parametrize("timestep", ["sample", "i2v"])
def test_perturbed_row_starts_from_the_cond_row_at_the_first_stg_block(models, timestep):
    """stg_source, as BranchForward batches the four branches (text rows cond, uncond, cond, cond): the outputs
    equal diffusers' three calls and the whole computation, while the perturbed row skips the blocks before the
    first STG block (LTX-2.3 weights; LTX-2.0 ones have nothing to perturb, so nothing to share)."""
    ref, ours, kwargs = models
    cond = make_inputs(kwargs, batch=1, timestep=timestep, seed=2)
    uncond = make_inputs(kwargs, batch=1, timestep=timestep, seed=3)
    batch = {k: None if v is None else torch.cat([v] * 4) for k, v in cond.items()}
    texts = ("text", "audio_text", "text_mask", "audio_text_mask")
    for k in texts:
        batch[k][1] = uncond[k][0]
    flags = dict(stg_blocks=(1,), stg_rows=torch.tensor([False, False, True, False]),
                 isolate_rows=torch.tensor([False, False, False, True]))
    ours_inputs = dict(batch, **{k: torch.cat([cond[k], uncond[k]]) for k in texts})  # one row per prompt
    calls = []

    def video_self(q, k, v):
        calls.append(q.shape[0])
        return LOCAL_ATTENTION.video_self(q, k, v)

    spied = LTX2Attention(**dict(asdict(LOCAL_ATTENTION), video_self=video_self))
    shared = run_ours(ours, ours_inputs, attn=spied, text_rows=(0, 1, 0, 0), stg_source=0, **flags)
    whole = run_ours(ours, ours_inputs, text_rows=(0, 1, 0, 0), **flags)
    cross = dict(use_cross_timestep=ours.use_cross_timestep)
    pair_expected = run_reference(ref, rows(batch, slice(0, 2)), **cross)
    perturbed = run_reference(ref, rows(batch, slice(2, 3)), spatio_temporal_guidance_blocks=[1], **cross)
    isolated = run_reference(ref, rows(batch, slice(3, 4)), isolate_modalities=True, **cross)
    expected = tuple(torch.cat([pair_expected[j], perturbed[j], isolated[j]]) for j in range(2))
    for g, w, e in zip(shared, whole, expected):
        for row in range(4):
            assert rel_err(g[row], e[row]) <= RTOL, (row, rel_err(g[row], e[row]))
        assert rel_err(g, w) <= RTOL  # the same function; the prefix's GEMMs have one row fewer
    if kwargs.get("perturbed_attn"):
        assert calls == [3, 4]  # block 0 without the perturbed row, block 1 with it
        assert rel_err(shared[0][2], shared[0][0]) > 1e-3  # and the perturbation is applied from block 1
    else:
        assert calls == [4, 4]
    with pytest.raises(ValueError, match="stg_source 2: need a batch row .* neither STG nor isolated"):
        run_ours(ours, ours_inputs, text_rows=(0, 1, 0, 0), stg_source=2, **flags)
    with pytest.raises(ValueError, match="stg_source 1: every STG row must share its text row"):
        run_ours(ours, ours_inputs, text_rows=(0, 1, 0, 0), stg_source=1, **flags)


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="Inductor's CPU code needs a C++ compiler")
def test_compiled_blocks_share_the_stg_prefix_with_a_dynamic_batch():
    """Compiled blocks run the shared prefix too (3 rows, then 4 from the STG block on) and equal eager, also when
    the recompile at 4 rows makes the batch dimension dynamic, as torch 2.11 did on a GPU: a block that wrote rows
    of an input in place (x[:n] = ..., x and x[:n] both graph inputs across a graph break) failed AOTAutograd's
    merge of aliased inputs there ("Expected !size_bytes_is_heap_allocated_")."""
    kwargs = CONFIGS["ltx2.3"]
    cond, uncond = (make_inputs(kwargs, batch=1, timestep="sample", seed=seed) for seed in (2, 3))
    texts = ("text", "audio_text", "text_mask", "audio_text_mask")
    inputs = {k: None if v is None else torch.cat([v] * 4) for k, v in cond.items()}
    inputs.update({k: torch.cat([cond[k], uncond[k]]) for k in texts})
    flags = dict(stg_blocks=(1,), stg_rows=torch.tensor([False, False, True, False]),
                 isolate_rows=torch.tensor([False, False, False, True]), text_rows=(0, 1, 0, 0), stg_source=0)
    ours = from_reference(make_reference(kwargs))
    eager = run_ours(ours, inputs, **flags)
    calls = []

    @torch.compiler.disable  # as the real attention functions: called between the compiled graphs
    def video_self(q, k, v):
        calls.append(q.shape[0])
        return LOCAL_ATTENTION.video_self(q, k, v)

    spied = LTX2Attention(**dict(asdict(LOCAL_ATTENTION), video_self=video_self))
    torch._dynamo.reset()
    dynamic = torch._dynamo.config.automatic_dynamic_shapes
    try:
        torch._dynamo.config.automatic_dynamic_shapes = True  # torch's default, whatever an earlier test left
        ltx2.compile_blocks(ours)
        assert torch._dynamo.config.automatic_dynamic_shapes is False  # every shape static (layers.compile_each)
        assert all(rel_err(g, e) <= RTOL for g, e in zip(run_ours(ours, inputs, attn=spied, **flags), eager))
        assert calls == [3, 4]  # compiled, block 0 still runs without the perturbed row
        torch._dynamo.reset()
        with torch._dynamo.config.patch(automatic_dynamic_shapes=True, assume_static_by_default=True):
            for block in ours.transformer_blocks:
                block.compile(dynamic=None)  # a recompile marks the changed sizes dynamic
            assert all(rel_err(g, e) <= RTOL for g, e in zip(run_ours(ours, inputs, **flags), eager))
    finally:
        torch._dynamo.config.automatic_dynamic_shapes = dynamic
        torch._dynamo.reset()


def test_each_attention_function_is_used():
    ref = make_reference(CONFIGS["ltx2.3"])
    ours = from_reference(ref)
    inputs = make_inputs(CONFIGS["ltx2.3"], batch=2, timestep="sample")
    base = run_ours(ours, inputs)
    calls: dict[str, list] = {}

    def spy(name, fn):
        def wrapped(q, k, v, *bias):
            calls.setdefault(name, []).append((tuple(q.shape), tuple(k.shape)))
            return fn(q, k, v, *bias)
        return wrapped

    fields = ("video_self", "audio_self", "text", "audio_to_video", "video_to_audio")
    spied = LTX2Attention(**{f: spy(f, getattr(LOCAL_ATTENTION, f)) for f in fields})
    assert all(torch.equal(g, b) for g, b in zip(run_ours(ours, inputs, attn=spied), base))
    n = CONFIGS["ltx2.3"]["num_layers"]
    # (B, S, H, D): video 2 x 16, audio and audio<->video 2 x 8; text keys are cut to the longest kept prompt.
    assert calls == {
        "video_self": [((2, S, 2, 16), (2, S, 2, 16))] * n,
        "audio_self": [((2, S_A, 2, 8), (2, S_A, 2, 8))] * n,
        "text": [((2, S, 2, 16), (2, L - 1, 2, 16)), ((2, S_A, 2, 8), (2, L - 2, 2, 8))] * n,
        "audio_to_video": [((2, S, 2, 8), (2, S_A, 2, 8))] * n,
        "video_to_audio": [((2, S_A, 2, 8), (2, S, 2, 8))] * n,
    }
    for f in fields:  # and each one's result matters
        zeroed = LTX2Attention(**dict({g: getattr(LOCAL_ATTENTION, g) for g in fields},
                                      **{f: lambda q, k, v, *bias: torch.zeros_like(q)}))
        out = run_ours(ours, inputs, attn=zeroed)
        assert max(rel_err(o, b) for o, b in zip(out, base)) > 1e-3, f


@pytest.mark.parametrize("rope_type", ["interleaved", "split"])
@pytest.mark.parametrize("shape", ["tiny", "real"])
def test_rope_tables_bit_identical(rope_type, shape):
    """Our tables hold exactly diffusers' values (its own modules, fp64 frequencies), re-laid with tokens on dim 1."""
    kwargs = CONFIGS["ltx2.3"] if shape == "tiny" else {}
    with torch.device("meta"):  # the RoPE modules hold no weights: only the config matters
        ref = LTX2VideoTransformer3DModel.from_config(dict(kwargs, rope_type=rope_type, num_layers=1))
    cfg = LTX2Config.from_dict(dict(ref.config))
    grid, audio_tokens, fps = (4, 3, 5), 11, 25.0
    mine = rope_tables(cfg, *grid, fps, audio_tokens)
    video = ref.rope.prepare_video_coords(1, *grid, "cpu", fps=fps)
    audio = ref.audio_rope.prepare_audio_coords(1, audio_tokens, "cpu")
    theirs = {"video": ref.rope(video), "audio": ref.audio_rope(audio),
              "video_cross": ref.cross_attn_rope(video[:, :1]), "audio_cross": ref.cross_attn_audio_rope(audio[:, :1])}
    for name, (cos, sin) in theirs.items():
        table = getattr(mine, name)
        if rope_type == "interleaved":  # (1, S, C) with each angle twice -> (1, S, C/2, 2)
            expected = torch.stack([cos[..., ::2], sin[..., ::2]], dim=-1)
        else:  # (1, H, S, r) -> (1, S, H, 2, r)
            expected = torch.stack([cos, sin], dim=2).permute(0, 3, 1, 2, 4)
        assert table.dtype == torch.float32 and torch.equal(table, expected), name
    narrowed = mine.map_video(lambda t: t.narrow(1, 2, 5))
    assert narrowed.video.shape[1] == narrowed.video_cross.shape[1] == 5 and narrowed.audio is mine.audio


def test_config_from_dict():
    for kwargs in CONFIGS.values():
        assert LTX2Config.from_dict(dict(make_reference(kwargs).config)) == LTX2Config(**kwargs)
    with pytest.raises(ValueError, match="use_keyframes_abs_pos_embedding=True"):
        LTX2Config.from_dict({"use_keyframes_abs_pos_embedding": True})
    with pytest.raises(ValueError, match="ff_bias=False"):
        LTX2Config.from_dict({"ff_bias": False})
    with pytest.raises(ValueError, match="activation_fn='gelu'"):
        LTX2Config.from_dict({"activation_fn": "gelu"})
    with pytest.raises(ValueError, match=r"\['num_blocks'\]"):
        LTX2Config.from_dict({"num_blocks": 3})
    with pytest.raises(ValueError, match="rope_type='rotary'"):
        LTX2Config(rope_type="rotary")
    with pytest.raises(ValueError, match="cross_attention_dim=64"):
        LTX2Config(cross_attention_dim=64)
    with pytest.raises(ValueError, match="num_layers=0: must be an integer >= 1"):
        LTX2Config(num_layers=0)
    assert LTX2Config(causal_offset=0).causal_offset == 0
    assert LTX2Config.from_dict({"out_channels": None, "in_channels": 64}).out_channels == 64


@pytest.mark.parametrize("name", ["ltx-2-19b", "ltx-2.3-22b", "ltx2-tiny"])
def test_shapes_build(name):
    with torch.device("meta"):
        model = LTX2Transformer(SHAPES[name])
        theirs = LTX2VideoTransformer3DModel(**asdict(SHAPES[name]))
    assert model.state_dict().keys() == theirs.state_dict().keys()
    params = sum(p.numel() for p in model.parameters())
    if name == "ltx2-tiny":
        committed = Path(__file__).parents[1] / "models/ltx2-tiny/transformer/config.json"
        assert LTX2Config.from_dict(json.loads(committed.read_text())) == SHAPES[name]
    else:  # ~18.9 B for both real ones (2.3's extra size is in its connectors and VAE)
        assert 18.5e9 < params < 19.5e9, params


def _matmul_attention(q, k, v, bias=None):
    """Attention as plain matmuls, (B, S, H, D) in and out, so torch's FLOP counter sees its products."""
    scores = q.transpose(1, 2) @ k.permute(0, 2, 3, 1) / q.shape[-1] ** 0.5  # (B, H, S, L)
    return (scores.softmax(-1) @ v.transpose(1, 2)).transpose(1, 2)


def test_shared_text_rows_equal_repeated_text(models):
    """Rows that share a prompt (text_rows) give what the same text repeated per row gives; rows that share a
    text row but not sigma (which modulates the text) are refused."""
    _, ours, kwargs = models
    inputs = make_inputs(kwargs, batch=4, timestep="i2v")
    per_text = ("text", "audio_text", "text_mask", "audio_text_mask")
    share = [0, 1, 0, 0]  # cond, uncond, perturbed, isolated
    full = dict(inputs, **{k: inputs[k][share] for k in per_text},
                **{k: inputs[k][[0, 1, 0, 0]] for k in ("sigma", "audio_sigma")})
    expected = run_ours(ours, full, isolate_rows=torch.tensor([False, False, False, True]))
    shared = dict(full, **{k: inputs[k][:2] for k in per_text})
    got = run_ours(ours, shared, isolate_rows=torch.tensor([False, False, False, True]), text_rows=tuple(share))
    assert_close(got, expected)
    with pytest.raises(ValueError, match="share sigma"):
        run_ours(ours, dict(shared, sigma=inputs["sigma"]), text_rows=tuple(share))
    with pytest.raises(ValueError, match="text_rows"):
        run_ours(ours, shared, text_rows=(0, 0, 0, 0))


@pytest.mark.parametrize("family", ["ltx-video", "ltx2"])
def test_config_from_dict_refuses_what_it_cannot_run(family):
    """Both families' configs: an unsupported value of a fixed key and an unknown key are refused by name,
    bookkeeping keys are ignored, and an output width of None takes the input's (as diffusers does)."""
    from usp_infer.ltx_video.model import LTXConfig

    cls, model = (LTXConfig, "LTXVideoTransformer3DModel") if family == "ltx-video" else (LTX2Config, "LTX2Video")
    base = dict(in_channels=8, out_channels=None, _class_name=model, _diffusers_version="0.42.1")
    cfg = cls.from_dict(base)
    assert cfg.out_channels == 8
    with pytest.raises(ValueError, match=r"qk_norm='rms_norm' is not supported"):
        cls.from_dict(dict(base, qk_norm="rms_norm"))
    with pytest.raises(ValueError, match=rf"unknown config keys \['colour'\]: not an {model}"):
        cls.from_dict(dict(base, colour=1))
    if family == "ltx2":
        assert cls.from_dict(dict(base, audio_in_channels=6, audio_out_channels=0)).audio_out_channels == 6


def test_flops_match_counted_matmuls():
    """flops() equals the FLOPs torch's counter sees in a per-sample forward, attention products included."""
    counted = LTX2Attention(_matmul_attention, _matmul_attention, _matmul_attention, _matmul_attention,
                            _matmul_attention)
    for name, kwargs in CONFIGS.items():
        ours = from_reference(make_reference(kwargs))
        inputs = make_inputs(kwargs, batch=2, timestep="sample", mask="none")
        with FlopCounterMode(display=False) as counter:
            run_ours(ours, inputs, attn=counted)
        assert flops(ours.cfg, S, S_A, L, batch=2)["total"] == counter.get_total_flops(), name
        with FlopCounterMode(display=False) as counter:  # an isolated last row runs no audio<->video attention
            run_ours(ours, inputs, attn=counted, isolate_rows=torch.tensor([False, True]))
        assert flops(ours.cfg, S, S_A, L, batch=2, isolated=1)["total"] == counter.get_total_flops(), name
        # A perturbed row sharing block 0 with the cond row (one text row for all three) runs one block fewer:
        # what flops() takes off is that block's per-row work, less the text K/V, which run once per prompt anyway;
        # the kept rows' per-sample embeddings are made once more for the prefix (a few small GEMMs).
        three = {k: None if v is None else (v[:1] if k.endswith("text") else torch.cat([v[:1]] * 3))
                 for k, v in inputs.items()}
        flags = dict(stg_blocks=(1,), stg_rows=torch.tensor([False, True, False]),
                     isolate_rows=torch.tensor([False, False, True]), text_rows=(0, 0, 0))
        counts = []
        for source in (None, 0):
            with FlopCounterMode(display=False) as counter:
                run_ours(ours, three, attn=counted, stg_source=source, **flags)
            counts.append(counter.get_total_flops())
        d, da = ours.cfg.inner_dim, ours.cfg.audio_inner_dim
        text_kv = 2 * 2 * L * (d * d + da * da)
        shared = 1 if ours.cfg.perturbed_attn else 0
        kept = [0, 2]
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            ours._condition(three["text"], three["audio_text"], three["text_mask"], three["audio_text_mask"],
                            *(three[k][kept] for k in ("timestep", "audio_timestep", "sigma", "audio_sigma")),
                            flags["isolate_rows"][kept], (0, 0), torch.float32)
        prefix = counter.get_total_flops() if shared else 0
        saved = flops(ours.cfg, S, S_A, L, 3, 1)["total"] - flops(ours.cfg, S, S_A, L, 3, 1, shared)["total"]
        assert counts[0] - counts[1] == (saved - text_kv - prefix if shared else 0), name
        assert saved > 0 if shared else saved == 0, name
    real = flops(SHAPES["ltx-2.3-22b"], 6144, 126, 1024, batch=4)
    assert 7e14 < real["total"] < 9e14  # REFERENCE.md: about 800 TFLOP per 4-branch step at 768x512x121
    # the perturbed row from block 28 on: 20 of its 48 blocks, so about 28/48 of a branch's quarter less
    shared = flops(SHAPES["ltx-2.3-22b"], 6144, 126, 1024, batch=4, isolated=1, shared_blocks=28)
    assert 0.85 < shared["total"] / flops(SHAPES["ltx-2.3-22b"], 6144, 126, 1024, batch=4, isolated=1)["total"] < 0.87


def test_input_validation(models):
    _, ours, kwargs = models
    inputs = make_inputs(kwargs, batch=2, timestep="sample")
    with pytest.raises(ValueError, match="timestep"):
        run_ours(ours, dict(inputs, timestep=torch.zeros(2, S + 1)))
    with pytest.raises(ValueError, match="audio_sigma"):
        run_ours(ours, dict(inputs, audio_sigma=torch.zeros(3)))
    with pytest.raises(ValueError, match=r"rope.video has 12 tokens for 24"):
        with torch.no_grad():
            ours(**inputs, rope=rope_tables(ours.cfg, *GRID, FPS, S_A).map_video(lambda t: t[:, :12]))
    with pytest.raises(ValueError, match=r"stg_blocks \[2\] out of range"):
        run_ours(ours, inputs, stg_blocks=(2,))
    with pytest.raises(ValueError, match="isolate_rows"):
        run_ours(ours, inputs, isolate_rows=torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="text"):
        run_ours(ours, dict(inputs, text=inputs["text"][..., :-1]))


def _write_folder(folder, config: dict, state: dict) -> None:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "diffusion_pytorch_model.safetensors")


def test_load_errors(tmp_path):
    ref = make_reference(CONFIGS["ltx2.3"])
    config, state = dict(ref.config), ref.state_dict()
    key = "transformer_blocks.1.attn1.to_gate_logits.weight"
    _write_folder(tmp_path / "missing", config, {k: v for k, v in state.items() if k != key})
    with pytest.raises(ValueError, match=f"'{key}' is in none of"):
        load_transformer(tmp_path / "missing", "cpu", torch.float32)
    _write_folder(tmp_path / "extra", config, dict(state, **{"caption_projection.linear_1.weight": torch.zeros(3)}))
    with pytest.raises(ValueError, match="unexpected key 'caption_projection.linear_1.weight'; is this a "
                                         "LTX2Transformer checkpoint"):
        load_transformer(tmp_path / "extra", "cpu", torch.float32)
    _write_folder(tmp_path / "shape", config, dict(state, **{key: torch.zeros(3, 32)}))
    with pytest.raises(ValueError, match=rf"'{key}' has shape \(3, 32\), config.json implies \(2, 32\)"):
        load_transformer(tmp_path / "shape", "cpu", torch.float32)
    _write_folder(tmp_path / "config", dict(config, use_keyframes_abs_pos_embedding=True), state)
    with pytest.raises(ValueError, match="use_keyframes_abs_pos_embedding"):
        load_transformer(tmp_path / "config", "cpu", torch.float32)
    _write_folder(tmp_path / "good", config, state)
    half = load_transformer(tmp_path / "good", "cpu", torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())


def test_block_traces_in_one_graph_per_attention_gap():
    """A compiled block breaks only at its 6 injected attention calls: no data-dependent control flow, and no
    helper frame between the block and an attention call (each would split the graphs further)."""
    ours = from_reference(make_reference(CONFIGS["ltx2.3"]))
    inputs = make_inputs(CONFIGS["ltx2.3"], batch=2, timestep="i2v")  # per-token modulation, STG: the most to trace
    block = ours.transformer_blocks[1]
    seen = []
    hook = block.register_forward_pre_hook(lambda module, args: seen.append(args))
    run_ours(ours, inputs, stg_blocks=(1,), stg_rows=torch.tensor([False, True]))
    hook.remove()
    with torch.no_grad():
        explained = torch._dynamo.explain(block)(*seen[0])
    assert explained.graph_count == 7 and explained.graph_break_count == 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_rope_forms_agree(monkeypatch, dtype):
    """The eager split RoPE (written into halves of its output) and the form compiled graphs fuse agree."""
    cfg = LTX2Config(**CONFIGS["ltx2.3"])
    table = rope_tables(cfg, *GRID, FPS, S_A).video
    x = torch.randn(2, S, cfg.inner_dim).to(dtype)
    eager = ltx2._apply_split_rope(x, table)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    fused = ltx2._apply_split_rope(x, table)
    # The same products; only whether a product and its sum round once (fused) or twice differs: an ulp.
    assert eager.dtype == fused.dtype == dtype and rel_err(eager.float(), fused.float()) < 1e-6


@pytest.mark.parametrize("extra", [
    # Asymmetric flags: each stream's gates and query modulation on its own; static prompt tables (no prompt_adaln).
    dict(CONFIGS["ltx2.3"], gated_attn=False, cross_attn_mod=False, use_prompt_adaln_single=False),
    dict(CONFIGS["ltx2.3"], audio_gated_attn=False, audio_cross_attn_mod=False, rope_type="interleaved"),
    # fp32 RoPE frequencies, a non-causal VAE's positions, split RoPE on LTX-2.0 flags.
    dict(CONFIGS["ltx2.0"], rope_double_precision=False, causal_offset=0, rope_type="split"),
], ids=["video-plain", "audio-plain", "fp32-rope"])
def test_other_flag_sets(extra):
    ref = make_reference(extra)
    ours = from_reference(ref)
    inputs = make_inputs(extra, batch=2, timestep="i2v")
    for cross in (False, True):
        ours.use_cross_timestep = cross
        assert_close(run_ours(ours, inputs), run_reference(ref, inputs, use_cross_timestep=cross))


def test_bf16_close_to_fp32(models):
    """In bf16 the same forward stays within bf16 rounding of diffusers' fp32 result."""
    ref, ours, kwargs = models
    inputs = make_inputs(kwargs, batch=2, timestep="i2v")
    expected = run_reference(ref, inputs, use_cross_timestep=ours.use_cross_timestep)
    half = {k: v.bfloat16() if v is not None and v.is_floating_point() and v.ndim == 3 else v
            for k, v in inputs.items()}
    got = run_ours(copy.deepcopy(ours).bfloat16(), half)
    for g, e in zip(got, expected):
        assert g.dtype == torch.bfloat16 and rel_err(g.float(), e) < 3e-2
