"""Our LTX-2 pipeline equals diffusers' LTX2Pipeline / LTX2ImageToVideoPipeline for the same seed.

Tiny folders from make_tiny_ltx2 (2.0 and 2.3 style), fp32 on CPU. Until usp_infer/ltx2.py is
merged, the transformer is diffusers' own, behind `DiffusersLTX2` (the agreed interface of
notes/ltx2_interface.md, test-only). Tolerance 1e-4 absolute: the only differences are the batch
layout of the branches and the order of float operations in guidance and Euler updates.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import LTX2ImageToVideoPipeline, LTX2Pipeline
from PIL import Image

from usp_infer.ltx2.pipeline import (
    LTX2Guidance,
    LTX2Request,
    ModalityGuidance,
    generate,
    load_components,
)
from usp_infer.ltx2.tiny import make_tiny_ltx2
from usp_infer.media import write_video

H, W, FRAMES, FPS, STEPS = 64, 64, 9, 24.0, 3  # 3: a sigma between 1 and the terminal 0.1 shows the shift
# Image to video at a non-square size with three latent frames (3 x 5 tokens each) and three steps: the first
# frame's tokens are a minority, the scheduler steps frames 1-2 only, and the VAE's 32x / 8x compression,
# patch 4 and shifted statistics all act on the image latent.
I2V = dict(height=96, width=160, num_frames=17, fps=25.0, steps=3)
PROMPT, NEGATIVE = "a cat walking in the rain", "blurry, distorted"
ATOL = 1e-4

CFG_ONLY = LTX2Guidance(ModalityGuidance(cfg=3.0), ModalityGuidance(cfg=5.0), stg_blocks=())
FULL = LTX2Guidance(
    ModalityGuidance(cfg=3.0, stg=1.0, modality=3.0, rescale=0.7),
    ModalityGuidance(cfg=7.0, stg=0.5, modality=2.0, rescale=0.5),
    stg_blocks=(1,),
)


# --- test-only adapter: diffusers' transformer behind our interface -------------------------------


@dataclass(frozen=True)
class _Rope:
    frames: int
    height: int
    width: int
    fps: float
    audio_tokens: int

    def map_video(self, fn):
        return self


@dataclass(frozen=True)
class _Attention:
    video_self: object = None
    audio_self: object = None
    text: object = None
    audio_to_video: object = None
    video_to_audio: object = None


ARCH = SimpleNamespace(
    rope_tables=lambda cfg, f, h, w, fps, audio_tokens, device: _Rope(f, h, w, fps, audio_tokens),
    LOCAL_ATTENTION=_Attention(),
)


class DiffusersLTX2(torch.nn.Module):
    def __init__(self, model, use_cross_timestep: bool):
        super().__init__()
        self.model, self.use_cross_timestep = model, use_cross_timestep
        self.cfg = SimpleNamespace(num_layers=model.config.num_layers, perturbed_attn=model.config.perturbed_attn)
        self.calls = []  # batch sizes, so tests can see batched vs sequential

    def forward(self, video, audio, text, audio_text, text_mask, audio_text_mask, timestep, audio_timestep,
                sigma, audio_sigma, rope, attn=None, stg_blocks=(), stg_rows=None, isolate_rows=None, text_rows=None,
                stg_source=None):  # diffusers runs the perturbed rows whole
        self.calls.append(video.shape[0])
        if text_rows is not None:  # one row per prompt -> one per batch row, as diffusers takes them
            rows = list(text_rows)
            text, audio_text, text_mask, audio_text_mask = (t[rows] for t in (text, audio_text, text_mask,
                                                                             audio_text_mask))
        iso = torch.zeros(video.shape[0], dtype=torch.bool) if isolate_rows is None else isolate_rows.cpu()
        out_v, out_a = torch.empty_like(video), torch.empty_like(audio)
        for flag in (False, True):  # diffusers isolates a whole call: split the rows
            idx = (iso == flag).nonzero().flatten()
            if len(idx) == 0:
                continue
            pick = lambda x: x[idx]  # noqa: E731
            mask = None
            if stg_rows is not None:
                mask = (~stg_rows.cpu()[idx]).float().view(-1, 1, 1)  # 0 where STG applies
            v, a = self.model(
                hidden_states=pick(video), audio_hidden_states=pick(audio), encoder_hidden_states=pick(text),
                audio_encoder_hidden_states=pick(audio_text), timestep=pick(timestep),
                audio_timestep=pick(audio_timestep), sigma=pick(sigma), audio_sigma=pick(audio_sigma),
                encoder_attention_mask=pick(text_mask).long(), audio_encoder_attention_mask=pick(audio_text_mask).long(),
                num_frames=rope.frames, height=rope.height, width=rope.width, fps=rope.fps,
                audio_num_frames=rope.audio_tokens, isolate_modalities=flag,
                spatio_temporal_guidance_blocks=list(stg_blocks) if stg_rows is not None else None,
                perturbation_mask=mask, use_cross_timestep=self.use_cross_timestep, return_dict=False,
            )
            out_v[idx], out_a[idx] = v, a
        return out_v, out_a


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["2.3", "2.0"])
def setup(request, tmp_path_factory):
    version = request.param
    folder = make_tiny_ltx2(tmp_path_factory.mktemp(f"ltx2-{version}") / "m", version=version)
    cross = version == "2.3"
    ref = LTX2Pipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    ours = load_components(folder, "cpu", torch.float32, transformer=DiffusersLTX2(ref.transformer, cross), arch=ARCH)
    image = tmp_path_factory.mktemp("img") / "first.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (I2V["height"], I2V["width"], 3), dtype=np.uint8)).save(image)
    return SimpleNamespace(version=version, folder=folder, ref=ref, ours=ours, cross=cross, image=image)


def _diffusers_kwargs(g: LTX2Guidance, cross: bool, size: dict | None = None) -> dict:
    z = size or dict(height=H, width=W, num_frames=FRAMES, fps=FPS, steps=STEPS)
    return dict(
        prompt=PROMPT, negative_prompt=NEGATIVE, height=z["height"], width=z["width"], num_frames=z["num_frames"],
        frame_rate=z["fps"], num_inference_steps=z["steps"], max_sequence_length=16, output_type="np", return_dict=False,
        generator=torch.Generator().manual_seed(7), use_cross_timestep=cross,
        guidance_scale=g.video.cfg, stg_scale=g.video.stg, modality_scale=g.video.modality,
        guidance_rescale=g.video.rescale, audio_guidance_scale=g.audio.cfg, audio_stg_scale=g.audio.stg,
        audio_modality_scale=g.audio.modality, audio_guidance_rescale=g.audio.rescale,
        spatio_temporal_guidance_blocks=list(g.stg_blocks) or None,
    )


def _request(g: LTX2Guidance, **kw) -> LTX2Request:
    base = dict(
        prompt=PROMPT, negative_prompt=NEGATIVE, height=H, width=W, num_frames=FRAMES, fps=FPS, steps=STEPS,
        seed=7, max_sequence_length=16, guidance=g,
    )
    return LTX2Request(**(base | kw))


def _compare(ours, video, audio):
    assert ours.frames.shape == video[0].shape
    assert ours.audio.shape == tuple(audio[0].shape)
    dv = np.abs(ours.frames - video[0]).max()
    da = np.abs(ours.audio - audio[0].float().numpy()).max()
    print(f"max |diff| video {dv:.2e} audio {da:.2e}")
    assert dv < ATOL and da < ATOL, (dv, da)
    return dv, da


_CACHE: dict = {}


def _reference(s, g, image=False, crf=0):
    key = (s.version, id(g), image, crf)
    if key not in _CACHE:
        kw = _diffusers_kwargs(g, s.cross, I2V if image else None)
        if image:
            i2v = LTX2ImageToVideoPipeline.from_pipe(s.ref)
            i2v.set_progress_bar_config(disable=True)
            _CACHE[key] = i2v(image=Image.open(s.image), image_crf=crf, **kw)
        else:
            _CACHE[key] = s.ref(**kw)
    return _CACHE[key]


# --- tests ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("g", [CFG_ONLY, FULL], ids=["cfg", "full"])
def test_text_to_video_matches_diffusers(setup, g):
    video, audio = _reference(setup, g)
    ours = generate(setup.ours, _request(g), progress=False)
    _compare(ours, video, audio)
    assert ours.sample_rate == (48000 if setup.version == "2.3" else 24000)
    # Not trivially equal: the audio and video carry signal.
    assert ours.frames.std() > 0.01 and ours.audio.std() > 1e-3


def test_sequential_branches_match_batched(setup):
    model = setup.ours.transformer
    model.calls.clear()
    branches = 4 if setup.version == "2.3" else 3  # LTX-2.0 weights cannot be perturbed: no STG forward
    ours = generate(setup.ours, _request(FULL, branches="sequential"), progress=False)
    assert model.calls == [1] * branches * STEPS
    _compare(ours, *_reference(setup, FULL))
    model.calls.clear()
    generate(setup.ours, _request(FULL), progress=False)
    assert model.calls == [branches] * STEPS  # batched: the branches as rows of one call per step


@pytest.mark.parametrize("g, crf", [(CFG_ONLY, 0), (CFG_ONLY, 33), (FULL, 0)], ids=["cfg", "cfg-crf33", "full"])
def test_image_to_video_matches_diffusers(setup, g, crf):
    video, audio = _reference(setup, g, image=True, crf=crf)
    ours = generate(setup.ours, _request(g, image=str(setup.image), image_crf=crf, **I2V), progress=False)
    _compare(ours, video, audio)
    if g is CFG_ONLY and crf == 0:
        # The first latent frame is the image's own latent, never stepped; the re-compression changes it.
        t2v = generate(setup.ours, _request(g, **I2V), progress=False)
        assert np.abs(ours.latents[:, 0] - t2v.latents[:, 0]).max() > 1e-3
        assert np.abs(_reference(setup, g, image=True, crf=33)[0][0] - video[0]).max() > 1e-2


def test_every_branch_and_term_matters(setup):
    """Dropping any one term changes the result beyond the parity tolerance, so the tests above see it."""
    if setup.version != "2.3":
        pytest.skip("one version is enough: the 2.0 transformer ignores STG (perturbed_attn=False)")
    base = generate(setup.ours, _request(FULL), progress=False)
    v, a = FULL.video, FULL.audio
    variants = {
        "video cfg": LTX2Guidance(ModalityGuidance(1.0, v.stg, v.modality, v.rescale), a, FULL.stg_blocks),
        "audio cfg": LTX2Guidance(v, ModalityGuidance(1.0, a.stg, a.modality, a.rescale), FULL.stg_blocks),
        "video stg": LTX2Guidance(ModalityGuidance(v.cfg, 0.0, v.modality, v.rescale), a, FULL.stg_blocks),
        "audio stg": LTX2Guidance(v, ModalityGuidance(a.cfg, 0.0, a.modality, a.rescale), FULL.stg_blocks),
        "video modality": LTX2Guidance(ModalityGuidance(v.cfg, v.stg, 1.0, v.rescale), a, FULL.stg_blocks),
        "audio modality": LTX2Guidance(v, ModalityGuidance(a.cfg, a.stg, 1.0, a.rescale), FULL.stg_blocks),
        "video rescale": LTX2Guidance(ModalityGuidance(v.cfg, v.stg, v.modality, 0.0), a, FULL.stg_blocks),
        "audio rescale": LTX2Guidance(v, ModalityGuidance(a.cfg, a.stg, a.modality, 0.0), FULL.stg_blocks),
    }
    for name, g in variants.items():
        other = generate(setup.ours, _request(g), progress=False)
        which = "video" if name.startswith("video") else "audio"
        changed = np.abs(other.latents - base.latents).max() if which == "video" else np.abs(
            other.audio_latents - base.audio_latents).max()
        assert changed > 10 * ATOL, name


def test_result_writes_mp4_wav_npz(setup, tmp_path):
    if setup.version != "2.3":
        pytest.skip("one version is enough")
    r = generate(setup.ours, _request(CFG_ONLY), progress=False)
    kw = dict(fps=FPS, latents=r.latents, audio=r.audio, audio_sample_rate=r.sample_rate, audio_latents=r.audio_latents)
    for name in ("out.mp4", "out.wav", "out.npz"):
        assert write_video(tmp_path / name, r.frames, **kw) == [tmp_path / name]
    with np.load(tmp_path / "out.npz") as data:
        assert data["audio_latents"].shape == r.audio_latents.shape and int(data["audio_sample_rate"]) == 48000


def test_text_encoder_leaves_the_device_and_request_is_validated(setup):
    assert next(setup.ours.text_encoder.parameters()).device.type == "cpu"
    with pytest.raises(ValueError, match="8k\\+1"):
        _request(CFG_ONLY, num_frames=10)
    with pytest.raises(ValueError, match="is not a positive multiple of 32; try 32"):
        LTX2Request(prompt="x", height=40)
    with pytest.raises(ValueError, match="branches"):
        _request(CFG_ONLY, branches="fast")
    with pytest.raises(ValueError, match="stg-blocks"):
        generate(setup.ours, _request(LTX2Guidance(FULL.video, FULL.audio, stg_blocks=(5,))), progress=False)


def test_encode_prompts_loads_gemma_where_it_encodes_and_never_moves_it(setup, monkeypatch):
    """encode_prompts reads Gemma straight onto its device and frees it there (a 12B encoder loaded on the host,
    copied over and copied back costs two 24 GB copies); encode_text returns an encoder to where it was."""
    import transformers

    from usp_infer.ltx2 import pipeline

    loads, moves = [], []
    real = transformers.Gemma3ForConditionalGeneration.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        loads.append(kwargs.get("device_map"))
        model = real(cls, *args, **kwargs)
        to = model.to
        model.to = lambda *a, **k: (moves.append(torch.device(a[0])), to(*a, **k))[1]
        return model

    monkeypatch.setattr(transformers.Gemma3ForConditionalGeneration, "from_pretrained", classmethod(spy))
    req = _request(CFG_ONLY)
    cache = pipeline.encode_prompts(setup.folder, torch.device("cpu"), torch.float32, [req])
    assert loads == ["cpu"] and set(moves) <= {torch.device("cpu")}
    assert set(cache) == {(PROMPT, req.max_sequence_length), (NEGATIVE, req.max_sequence_length)}

    class Away(torch.nn.Module):  # an encoder that lives elsewhere (a GPU, where a test has none): it goes back
        device = torch.device("meta")

        def to(self, device):
            moves.append(torch.device(device))
            return self

    moves.clear()
    c = SimpleNamespace(text_encoder=Away(), text_cache={}, device=torch.device("cpu"), tokenizer=None, connectors=None)
    monkeypatch.setattr(pipeline, "gemma_hidden_states", lambda *a: (_ for _ in ()).throw(RuntimeError("stop")))
    with pytest.raises(RuntimeError, match="stop"):
        pipeline.encode_text(c, {"cond": "x"}, 8)
    assert moves == [torch.device("cpu"), torch.device("meta")]


def test_branches_skip_no_op_terms():
    assert CFG_ONLY.branches() == ("cond", "uncond")
    assert FULL.branches() == ("cond", "uncond", "perturbed", "isolated")
    off = ModalityGuidance()
    assert LTX2Guidance(off, off, stg_blocks=(1,)).branches() == ("cond",)
    assert LTX2Guidance(off, ModalityGuidance(stg=1.0), stg_blocks=()).branches() == ("cond",)
    assert LTX2Guidance(off, ModalityGuidance(modality=2.0)).branches() == ("cond", "isolated")


@pytest.mark.parametrize("image", [False, True], ids=["t2v", "i2v"])
def test_with_our_transformer_matches_diffusers(setup, image):
    ours = load_components(setup.folder, "cpu", torch.float32)  # usp_infer.ltx2.load_transformer
    assert type(ours.transformer).__module__ == "usp_infer.ltx2.model"
    kw = dict(image=str(setup.image), image_crf=0, **I2V) if image else {}
    _compare(generate(ours, _request(CFG_ONLY, **kw), progress=False), *_reference(setup, CFG_ONLY, image=image))
    result = generate(ours, _request(FULL, **kw), progress=False)
    # LTX-2.0 weights (perturbed_attn=False) cannot be perturbed: diffusers' STG pass returns the cond
    # prediction, and ours skips that forward; the two agree.
    _compare(result, *_reference(setup, FULL, image=image))


def test_image_latent_normalised_as_diffusers_for_any_scaling_factor(setup, tmp_path):
    """Every LTX-2 VAE has scaling_factor 1, which hides how it enters: diffusers normalises the image latent
    without it and denormalises the decode with it. A VAE with another factor must still match."""
    if setup.version != "2.3":
        pytest.skip("one version is enough: the VAE is the same class")
    folder = tmp_path / "scaled"
    shutil.copytree(setup.folder, folder)
    config = folder / "vae" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "scaling_factor": 0.7}))
    ref = LTX2Pipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    ours = load_components(folder, "cpu", torch.float32, transformer=DiffusersLTX2(ref.transformer, True), arch=ARCH)
    i2v = LTX2ImageToVideoPipeline.from_pipe(ref)
    i2v.set_progress_bar_config(disable=True)
    video, audio = i2v(image=Image.open(setup.image), image_crf=0, **_diffusers_kwargs(CFG_ONLY, True, I2V))
    _compare(generate(ours, _request(CFG_ONLY, image=str(setup.image), image_crf=0, **I2V), progress=False), video, audio)
