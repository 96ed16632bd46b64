"""usp_infer.ltx_video.model against diffusers' LTXVideoTransformer3DModel: tiny random weights, fp32, CPU."""

import copy
import json
import shutil

import pytest
import torch
from diffusers import LTXVideoTransformer3DModel
from diffusers.models.transformers.transformer_ltx import LTXVideoRotaryPosEmbed
from safetensors.torch import save_file
from torch import nn

from usp_infer.layers import sdpa_attention, timestep_features
from usp_infer.ltx_video.model import (
    SHAPES,
    LTXConfig,
    LTXTransformer,
    Perturbation,
    compile_blocks,
    load_transformer,
    rope_tables,
)

# Same ops in the same order, bit-exact with torch 2.13 on CPU today; 1e-5 relative leaves room for kernels
# that sum in another order (fused vs composite RMS-norm, SDPA with a broadcast vs an expanded mask),
# a few fp32 ulps per op, while any real math difference shows up at 1e-3 or more (see the mutation-style
# checks below that require perturbed outputs to move by > 1e-3).
RTOL = 1e-5

CONFIGS = {
    # 2 heads x 8: head_dim 8, inner_dim 16 (16 % 6 = 4 channels of RoPE padding), in_channels 8.
    "tiny": dict(
        in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, num_layers=2, caption_channels=16,
    ),
    # 2 heads x 64 as the real models' head_dim; in != out != 128; affine block norms; no q/k/v bias.
    "wide": dict(
        in_channels=24, out_channels=12, num_attention_heads=2, attention_head_dim=64,
        cross_attention_dim=128, num_layers=2, caption_channels=32,
        norm_elementwise_affine=True, attention_bias=False,
    ),
}
GRID = (2, 3, 4)  # latent frames, height, width: S = 24 tokens
SCALE = (8 / 25, 32.0, 32.0)  # rope_interpolation_scale as LTXPipeline passes it at 25 fps
S = GRID[0] * GRID[1] * GRID[2]
TEXT_LEN = 6


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter random, so no norm is 1, no gate 1 and no table is trivially small (either family)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif p.ndim == 2 and "scale_shift_table" not in name:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
            else:  # biases and scale_shift_tables
                p.copy_(0.3 * torch.randn_like(p))
    return model


def make_reference(kwargs: dict, seed: int = 0) -> LTXVideoTransformer3DModel:
    """diffusers' model, every parameter random."""
    torch.manual_seed(seed)
    return randomize(LTXVideoTransformer3DModel(**kwargs).eval())


def make_inputs(kwargs: dict, batch: int, timestep: str, mask: str, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    text_mask = None
    if mask == "ones":
        text_mask = torch.ones(batch, TEXT_LEN)
    elif mask == "padded":  # row b keeps its first TEXT_LEN - 1 - b tokens, the rest is padding
        text_mask = torch.arange(TEXT_LEN)[None, :] < (TEXT_LEN - 1 - torch.arange(batch))[:, None]
    return dict(
        hidden_states=torch.randn(batch, S, kwargs["in_channels"], generator=g),
        encoder_hidden_states=torch.randn(batch, TEXT_LEN, kwargs["caption_channels"], generator=g),
        timestep=_timesteps(timestep, batch, g),
        encoder_attention_mask=text_mask,
    )


def _timesteps(kind: str, batch: int, g: torch.Generator) -> torch.Tensor:
    """"sample" (B,); "token" (B, S) all distinct; "i2v" (B, S): the first latent frame clean, the rest at t."""
    if kind != "i2v":
        return torch.rand((batch,) if kind == "sample" else (batch, S), generator=g) * 1000
    first_frame = torch.arange(S) < GRID[1] * GRID[2]
    return torch.where(first_frame, 0.0, torch.rand(batch, 1, generator=g) * 1000)


def run_reference(ref: LTXVideoTransformer3DModel, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return ref(**inputs, num_frames=GRID[0], height=GRID[1], width=GRID[2],
                   rope_interpolation_scale=SCALE, return_dict=False)[0]


def from_reference(ref: LTXVideoTransformer3DModel) -> LTXTransformer:
    model = LTXTransformer(LTXConfig.from_dict(dict(ref.config)))
    model.load_state_dict(ref.state_dict())
    return model.eval()


def run_ours(model, inputs: dict, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs, rope=rope_tables(model.cfg, *GRID, SCALE), **kwargs)


@pytest.fixture(scope="module", params=[(name, sharded) for name in CONFIGS for sharded in (False, True)],
                ids=lambda p: f"{p[0]}-{'sharded' if p[1] else 'single'}")
def pair(request, tmp_path_factory):
    """(diffusers model, our model loaded from its save_pretrained folder, config kwargs)."""
    name, sharded = request.param
    ref = make_reference(CONFIGS[name])
    folder = tmp_path_factory.mktemp(name)
    ref.save_pretrained(folder, **({"max_shard_size": "20KB"} if sharded else {}))
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    assert index.is_file() == sharded and len(list(folder.glob("*.safetensors"))) > sharded
    return ref, load_transformer(folder, "cpu", torch.float32), CONFIGS[name]


@pytest.mark.parametrize("timestep,mask", [("sample", "ones"), ("token", "ones"), ("sample", "padded"),
                                           ("token", "padded"), ("sample", "none"), ("i2v", "padded")])
def test_matches_diffusers(pair, timestep, mask):
    ref, ours, kwargs = pair
    inputs = make_inputs(kwargs, batch=2, timestep=timestep, mask=mask)
    expected = run_reference(ref, inputs)
    got = run_ours(ours, inputs)
    assert got.shape == (2, S, kwargs["out_channels"])
    assert rel_err(got, expected) <= RTOL


def test_padding_mask_matters(pair):
    """Guards the padded-mask comparison above against a mask that silently does nothing."""
    _, ours, kwargs = pair
    padded = make_inputs(kwargs, batch=2, timestep="sample", mask="padded")
    unmasked = dict(padded, encoder_attention_mask=None)
    assert rel_err(run_ours(ours, padded), run_ours(ours, unmasked)) > 1e-3


def test_loaded_state_dict_is_diffusers(pair):
    ref, ours, _ = pair
    theirs, mine = ref.state_dict(), ours.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert not any(p.requires_grad for p in ours.parameters())


@pytest.mark.parametrize("dim,patch", [(16, (1, 1)), (24, (1, 1)), (128, (2, 2)), (2048, (1, 1))])
def test_rope_tables_bit_identical(dim, patch):
    cfg = LTXConfig(num_attention_heads=2, attention_head_dim=dim // 2, cross_attention_dim=dim,
                    patch_size=patch[0], patch_size_t=patch[1])
    grid = (3, 5, 7)
    theirs = LTXVideoRotaryPosEmbed(dim, patch_size=patch[0], patch_size_t=patch[1])(
        torch.zeros(1, 1, dim), *grid, rope_interpolation_scale=SCALE)
    mine = rope_tables(cfg, *grid, SCALE, "cpu")
    for a, b in zip(mine, theirs):
        assert a.dtype == torch.float32 and a.shape == (1, 3 * 5 * 7, dim)
        assert torch.equal(a, b)


def test_attn_fn_is_used():
    ref = make_reference(CONFIGS["tiny"])
    ours = from_reference(ref)
    inputs = make_inputs(CONFIGS["tiny"], batch=2, timestep="sample", mask="padded")
    shapes = []

    def counting(q, k, v):
        shapes.append(q.shape)
        return sdpa_attention(q, k, v)

    assert torch.equal(run_ours(ours, inputs, attn_fn=counting), run_ours(ours, inputs))
    assert shapes == [(2, S, 2, 8)] * CONFIGS["tiny"]["num_layers"]  # one self-attention per block, (B, S, H, D)
    zero_attn = run_ours(ours, inputs, attn_fn=lambda q, k, v: torch.zeros_like(q))
    assert rel_err(zero_attn, run_ours(ours, inputs)) > 1e-3


class _PerturbedSelfAttention:
    """diffusers attention processor returning what our perturbed self-attention should (Lightricks semantics)."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if self.mode == "values":
            return attn.to_out[0](attn.to_v(hidden_states))
        if self.mode == "skip":
            return attn.to_out[0](hidden_states)
        return torch.zeros_like(hidden_states)  # residual: nothing added to the block's hidden states


class _SkippedBlock(nn.Module):
    def forward(self, hidden_states, **kwargs):
        return hidden_states


def perturbed_reference(ref: LTXVideoTransformer3DModel, mode: str, blocks: tuple[int, ...]):
    ref = copy.deepcopy(ref)
    for i in blocks:
        if mode == "block":
            ref.transformer_blocks[i] = _SkippedBlock()
        else:
            ref.transformer_blocks[i].attn1.set_processor(_PerturbedSelfAttention(mode))
    return ref


@pytest.mark.parametrize("mode", ["values", "skip", "residual", "block"])
@pytest.mark.parametrize("blocks", [(0,), (1,)])
def test_perturbation_modes(mode, blocks):
    ref = make_reference(CONFIGS["tiny"])
    ours = from_reference(ref)
    inputs = make_inputs(CONFIGS["tiny"], batch=3, timestep="token", mask="padded")
    rows = torch.tensor([False, True, False])
    base = run_ours(ours, inputs)
    out = run_ours(ours, inputs, perturbation=Perturbation(blocks=blocks, mode=mode, rows=rows))
    # Unperturbed rows go through the identical computation, so they must be bit-identical.
    assert torch.equal(out[~rows], base[~rows])
    assert rel_err(out[rows], base[rows]) > 1e-3
    expected = run_reference(perturbed_reference(ref, mode, blocks), inputs)
    assert rel_err(out[rows], expected[rows]) <= RTOL


@pytest.mark.parametrize("mode", ["values", "block"])
@pytest.mark.parametrize("timestep", ["sample", "i2v"])
def test_perturbed_row_starts_from_the_cond_row_at_the_first_perturbed_block(mode, timestep):
    """stg_source, as the Denoiser batches (uncond, cond, perturbed): the perturbed row skips block 0 and starts
    from the cond row's hidden states at block 1; the outputs equal the whole computation and diffusers'."""
    ref = make_reference(CONFIGS["tiny"])
    ours = from_reference(ref)
    inputs = make_inputs(CONFIGS["tiny"], batch=3, timestep=timestep, mask="padded")
    inputs = {k: torch.cat([v[:2], v[1:2]]) for k, v in inputs.items()}  # the perturbed row is the cond row
    perturbation = Perturbation(blocks=(1,), mode=mode, rows=torch.tensor([False, False, True]))
    calls = []

    def attn_fn(q, k, v):
        calls.append(q.shape[0])
        return sdpa_attention(q, k, v)

    shared = run_ours(ours, inputs, attn_fn=attn_fn, perturbation=perturbation, stg_source=1)
    whole = run_ours(ours, inputs, perturbation=perturbation)
    assert calls == [2, 3]  # block 0 without the perturbed row, block 1 with it
    assert rel_err(shared, whole) <= RTOL
    expected = run_reference(perturbed_reference(ref, mode, (1,)), inputs)
    assert rel_err(shared[2], expected[2]) <= RTOL and rel_err(shared[2], shared[1]) > 1e-3
    with pytest.raises(ValueError, match="stg_source 2: need an unperturbed batch row"):
        run_ours(ours, inputs, perturbation=perturbation, stg_source=2)


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="Inductor's CPU code needs a C++ compiler")
def test_compiled_blocks_start_the_perturbed_row_at_the_first_perturbed_block():
    """compile_blocks keeps the sharing: block 0 without the perturbed row, block 1 with it, outputs as eager."""
    ours = from_reference(make_reference(CONFIGS["tiny"]))
    inputs = make_inputs(CONFIGS["tiny"], batch=3, timestep="sample", mask="padded")
    inputs = {k: torch.cat([v[:2], v[1:2]]) for k, v in inputs.items()}  # the perturbed row is the cond row
    perturbation = Perturbation(blocks=(1,), mode="values", rows=torch.tensor([False, False, True]))
    eager = run_ours(ours, inputs, perturbation=perturbation, stg_source=1)
    calls = []

    @torch.compiler.disable  # as the real attention: called between the compiled graphs
    def attn_fn(q, k, v):
        calls.append(q.shape[0])
        return sdpa_attention(q, k, v)

    torch._dynamo.reset()
    try:
        compile_blocks(ours)
        compiled = run_ours(ours, inputs, attn_fn=attn_fn, perturbation=perturbation, stg_source=1)
    finally:
        torch._dynamo.reset()
    assert calls == [2, 3]
    assert rel_err(compiled, eager) <= RTOL


def test_values_mode_one_layer_by_hand():
    """1-layer model: the perturbed output recomputed from the block's parts, without diffusers."""
    kwargs = dict(CONFIGS["tiny"], num_layers=1)
    ours = from_reference(make_reference(kwargs))
    inputs = make_inputs(kwargs, batch=1, timestep="sample", mask="none")
    out = run_ours(ours, inputs, perturbation=Perturbation(blocks=(0,), mode="values", rows=torch.tensor([True])))
    with torch.no_grad():
        x = ours.proj_in(inputs["hidden_states"])
        emb = ours.time_embed.emb.timestep_embedder(timestep_features(inputs["timestep"]))
        temb = ours.time_embed.linear(torch.nn.functional.silu(emb))[:, None]
        block = ours.transformer_blocks[0]
        shift, scale, gate, shift2, scale2, gate2 = (block.scale_shift_table + temb.unflatten(2, (6, -1))).unbind(2)
        h = block.norm1(x) * (1 + scale) + shift
        x = x + block.attn1.to_out[0](block.attn1.to_v(h)) * gate  # attention output := V
        x = x + block.attn2.cross_attention(x, ours.caption_projection(inputs["encoder_hidden_states"]), None)
        x = x + block.ff(block.norm2(x) * (1 + scale2) + shift2) * gate2
        shift, scale = (ours.scale_shift_table + emb[:, None, None]).unbind(2)
        expected = ours.proj_out(torch.nn.functional.layer_norm(x, (16,), eps=1e-6) * (1 + scale) + shift)
    assert rel_err(out, expected) <= RTOL


def test_perturbation_validation():
    ours = from_reference(make_reference(CONFIGS["tiny"]))
    inputs = make_inputs(CONFIGS["tiny"], batch=2, timestep="sample", mask="ones")
    with pytest.raises(ValueError, match="'attention_values'"):
        Perturbation(blocks=(0,), mode="attention_values", rows=torch.tensor([True, False]))
    with pytest.raises(ValueError, match="bool"):
        Perturbation(blocks=(0,), mode="values", rows=torch.tensor([1, 0]))
    with pytest.raises(ValueError, match=r"\[2\] out of range"):
        run_ours(ours, inputs, perturbation=Perturbation(blocks=(2,), mode="values", rows=torch.tensor([True, False])))
    with pytest.raises(ValueError, match="3 entries for a batch of 2"):
        run_ours(ours, inputs, perturbation=Perturbation(blocks=(0,), mode="values", rows=torch.ones(3, dtype=bool)))


def test_input_validation():
    ours = from_reference(make_reference(CONFIGS["tiny"]))
    inputs = make_inputs(CONFIGS["tiny"], batch=2, timestep="sample", mask="ones")
    with pytest.raises(ValueError, match="rope table"):
        with torch.no_grad():
            ours(**inputs, rope=tuple(t[:, : S // 2] for t in rope_tables(ours.cfg, *GRID, SCALE)))
    with pytest.raises(ValueError, match="timestep"):
        run_ours(ours, dict(inputs, timestep=torch.zeros(2, S + 1)))


def test_config_from_dict():
    ref = make_reference(CONFIGS["wide"])
    assert LTXConfig.from_dict(dict(ref.config)) == LTXConfig(**CONFIGS["wide"])
    assert SHAPES["ltx-video-13b"].inner_dim == 4096 and SHAPES["ltx-video-2b"].num_layers == 28
    with pytest.raises(ValueError, match="activation_fn='gelu'"):
        LTXConfig.from_dict({"activation_fn": "gelu"})
    with pytest.raises(ValueError, match="qk_norm"):
        LTXConfig.from_dict({"qk_norm": "rms_norm"})
    with pytest.raises(ValueError, match="num_blocks"):
        LTXConfig.from_dict({"num_blocks": 3})
    with pytest.raises(ValueError, match="cross_attention_dim=64"):
        LTXConfig(cross_attention_dim=64)


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    ref = make_reference(CONFIGS["tiny"])
    folder = tmp_path_factory.mktemp("tiny-src")
    ref.save_pretrained(folder)
    return ref, folder


def _write_folder(folder, config: dict, state: dict) -> None:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "diffusion_pytorch_model.safetensors")


def test_load_errors(saved_tiny, tmp_path):
    ref, good = saved_tiny
    config, state = dict(ref.config), ref.state_dict()
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_transformer(tmp_path / "nowhere", "cpu", torch.float32)
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="no_weights"):
        load_transformer(tmp_path / "no_weights", "cpu", torch.float32)

    _write_folder(tmp_path / "missing", config, {k: v for k, v in state.items() if k != "proj_out.bias"})
    with pytest.raises(ValueError, match="'proj_out.bias'"):
        load_transformer(tmp_path / "missing", "cpu", torch.float32)
    _write_folder(tmp_path / "extra", config, dict(state, **{"rope.freqs": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model.safetensors: unexpected key 'rope.freqs'"):
        load_transformer(tmp_path / "extra", "cpu", torch.float32)
    _write_folder(tmp_path / "shape", config, dict(state, **{"proj_in.weight": torch.zeros(16, 9)}))
    with pytest.raises(ValueError, match=r"'proj_in.weight' has shape \(16, 9\)"):
        load_transformer(tmp_path / "shape", "cpu", torch.float32)

    half = load_transformer(good, "cpu", torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in half.parameters())


def test_two_weight_files_without_an_index_are_refused(saved_tiny, tmp_path):
    """Two *.safetensors and no index: which is the model is unknown (a stale copy beside the new one), so neither
    loads; the error names both."""
    ref, _ = saved_tiny
    state = ref.state_dict()
    _write_folder(tmp_path / "two", dict(ref.config), state)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "two" / "old.safetensors")
    with pytest.raises(ValueError, match=r"holds \['diffusion_pytorch_model.safetensors', 'old.safetensors'\] but no "
                                         r"diffusion_pytorch_model.safetensors.index.json: keep one file"):
        load_transformer(tmp_path / "two", "cpu", torch.float32)


def test_text_pads_are_cut_only_when_every_row_keeps_a_token():
    from usp_infer.layers import drop_trailing_pads

    text = torch.randn(2, 6, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    cut, cut_mask = drop_trailing_pads(text, mask)
    assert torch.equal(cut, text[:, :3]) and torch.equal(cut_mask, mask[:, :3])
    mask[1] = 0  # a row that keeps nothing attends evenly over all its pads: nothing may be cut
    same, same_mask = drop_trailing_pads(text, mask)
    assert same is text and same_mask is mask
