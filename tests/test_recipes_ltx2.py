"""LTX-2 recipes against diffusers (fp32, CPU, tiny folders from the writer): the distilled preset, LoRAs in both
key formats, two stages with the latent upsampler and a stage-2 LoRA, each with an image; bad input.

The references are diffusers' own calls: `LTX2Pipeline(sigmas=...)` with the scheduler that runs a list as given
(`use_dynamic_shifting=False, shift_terminal=None`), `load_lora_weights` + `set_adapters`, and the two-stage chain
`LTX2Pipeline(output_type="latent") -> LTX2LatentUpsamplePipeline -> LTX2Pipeline(latents=, audio_latents=,
noise_scale=, sigmas=)` with one generator. Same fp32 math and draws: differences are op-order rounding (~1e-6).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, LTX2ImageToVideoPipeline, LTX2Pipeline
from diffusers.pipelines.ltx2 import LTX2LatentUpsamplePipeline
from diffusers.pipelines.ltx2.latent_upsampler import LTX2LatentUpsamplerModel
from diffusers.pipelines.ltx2.utils import DISTILLED_SIGMA_VALUES, STAGE_2_DISTILLED_SIGMA_VALUES
from PIL import Image
from test_cli import cli, error_line, snapshot
from typer.testing import CliRunner

from usp_infer.cli import app
from usp_infer.ltx2 import lora, recipes
from usp_infer.ltx2.tiny import build_upsampler, make_tiny_ltx2, write_lora

ATOL = 1e-4  # fp32, the same draws: what is left is the order of float operations
PROMPT, NEGATIVE = "a dog barking at the sea", "blurry, silent"
COMMON = ["--num-frames", "9", "--max-sequence-length", "16", "--seed", "3", "--quiet"]
# Every stage-1 term on, video and audio apart (the tiny model has 2 blocks: STG on its last).
GUIDED = ["--guidance-scale", "3", "--stg-scale", "1", "--modality-scale", "2.5", "--guidance-rescale", "0.7",
          "--audio-guidance-scale", "5", "--audio-stg-scale", "0.5", "--audio-modality-scale", "2",
          "--audio-guidance-rescale", "0.5", "--stg-blocks", "1"]
GUIDED_KW = dict(guidance_scale=3.0, stg_scale=1.0, modality_scale=2.5, guidance_rescale=0.7, audio_guidance_scale=5.0,
                 audio_stg_scale=0.5, audio_modality_scale=2.0, audio_guidance_rescale=0.5,
                 spatio_temporal_guidance_blocks=[1])
OFF_KW = dict(guidance_scale=1.0, stg_scale=0.0, modality_scale=1.0, guidance_rescale=0.0, audio_guidance_scale=1.0,
              audio_stg_scale=0.0, audio_modality_scale=1.0, audio_guidance_rescale=0.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    model = make_tiny_ltx2(root / "model")
    files = {fmt: write_lora(root / f"{fmt}.safetensors", model / "transformer", fmt, seed=1)
             for fmt in ("lightricks", "diffusers", "kohya")}
    files["stage2"] = write_lora(root / "stage2.safetensors", model / "transformer", "lightricks", seed=2)
    other = root / "other_upsampler"
    build_upsampler(seed=9).save_pretrained(other)
    for size in (64, 128):
        Image.fromarray(np.random.default_rng(size).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            root / f"image{size}.png")
    return root, model, files


def _ours(tmp: Path, model: Path, *args) -> np.lib.npyio.NpzFile:
    out = tmp / f"o{len(list(tmp.glob('o*.npz')))}.npz"
    result = cli("generate", "--model", model, "--prompt", PROMPT, "--negative-prompt", NEGATIVE, *COMMON, *args,
                 "-o", out)
    assert result.exit_code == 0, result.output
    return np.load(out)


def _pipe(model: Path, image: bool = False, scheduler_as_given: bool = False):
    pipe = (LTX2ImageToVideoPipeline if image else LTX2Pipeline).from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    if scheduler_as_given:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, use_dynamic_shifting=False,
                                                                     shift_terminal=None)
    return pipe


def _call(pipe, size: int, generator, image=None, **kw):
    extra = {} if image is None else {"image": Image.open(image)}
    return pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=size, width=size, num_frames=9, frame_rate=24.0,
                max_sequence_length=16, use_cross_timestep=True, generator=generator, return_dict=False,
                **extra, **kw)


def _close(ours, video, audio) -> None:
    np.testing.assert_allclose(ours["frames"], video[0], rtol=0, atol=ATOL)
    np.testing.assert_allclose(ours["audio"], np.asarray(audio[0], dtype=np.float32), rtol=0, atol=ATOL)


def _moved(a, b) -> bool:
    return float(np.abs(a["frames"] - b["frames"]).max()) > 1e-3


@pytest.mark.parametrize("image", [False, True], ids=["t2v", "i2v"])
def test_distilled_preset_equals_ltx2_pipeline_with_distilled_sigmas(tiny, tmp_path, image):
    root, model, _ = tiny
    img = root / "image64.png" if image else None
    ours = _ours(tmp_path, model, "--height", "64", "--width", "64", "--preset", "ltx-2.3-distilled",
                 *(["--image", img] if image else []))
    video, audio = _call(_pipe(model, image, scheduler_as_given=True), 64, torch.Generator().manual_seed(3), img,
                         sigmas=DISTILLED_SIGMA_VALUES, num_inference_steps=8, output_type="np", **OFF_KW)
    _close(ours, video, audio)
    side = json.loads((tmp_path / "o0.npz.json").read_text())
    assert side["request"]["steps"] == 8 and side["request"]["recipe"]["sigmas"] == list(DISTILLED_SIGMA_VALUES)
    assert np.allclose(side["recipe"]["stage1"]["sigmas"], DISTILLED_SIGMA_VALUES)


@pytest.mark.parametrize("fmt", ["lightricks", "diffusers"])
def test_lora_at_0_8_equals_load_lora_weights_and_set_adapters(tiny, tmp_path, fmt):
    _, model, files = tiny
    ours = _ours(tmp_path, model, "--height", "64", "--width", "64", "--steps", "2", *GUIDED,
                 "--lora", f"{files[fmt]}:0.8")
    pipe = _pipe(model)
    pipe.load_lora_weights(str(files[fmt]), adapter_name="style")
    pipe.set_adapters(["style"], [0.8])
    video, audio = _call(pipe, 64, torch.Generator().manual_seed(3), num_inference_steps=2, output_type="np",
                         **GUIDED_KW)
    _close(ours, video, audio)
    side = json.loads((tmp_path / "o0.npz.json").read_text())
    (record,) = side["recipe"]["stage1"]["loras"]
    assert record["strength"] == 0.8 and len(record["sha256"]) == 64
    weaker = _ours(tmp_path, model, "--height", "64", "--width", "64", "--steps", "2", *GUIDED,
                   "--lora", f"{files[fmt]}:0.4")
    assert _moved(weaker, ours)


def test_kohya_alpha_scales_like_lora_a_b(tiny, tmp_path):
    """lora_down/lora_up + alpha (diffusers refuses alpha keys for LTX-2): delta = alpha / rank * up @ down, so
    alpha = rank/2 at strength 1 equals the same factors as lora_A/lora_B at strength 0.5."""
    _, model, files = tiny
    half = write_lora(tmp_path / "half.safetensors", model / "transformer", "kohya", seed=1, alpha=1.0)  # rank 2
    a = _ours(tmp_path, model, "--height", "64", "--width", "64", "--preset", "ltx-2.3-distilled", "--lora", half)
    b = _ours(tmp_path, model, "--height", "64", "--width", "64", "--preset", "ltx-2.3-distilled",
              "--lora", f"{files['lightricks']}:0.5")
    np.testing.assert_allclose(a["frames"], b["frames"], rtol=0, atol=1e-5)


def test_lora_names_follow_diffusers_conversion(tiny):
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_ltx2_lora_to_diffusers

    _, _, files = tiny
    keys = lora.read_header(files["lightricks"])
    theirs = _convert_non_diffusers_ltx2_lora_to_diffusers(dict.fromkeys(keys, 0))
    ours = {name: f for name, f in lora.modules(keys, "x").items()}
    assert {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] + ".weight" for k in theirs} == set(ours)
    assert any(k.startswith("diffusion_model.patchify_proj") for k in keys)  # the renames are exercised
    assert any(k.startswith("diffusion_model.adaln_single") for k in keys)


def _chain(model: Path, upsampler: Path, image=None, stage2_lora=None, stage1_lora=None,
           stage2_sigmas=STAGE_2_DISTILLED_SIGMA_VALUES):
    """diffusers' two-stage chain with one generator (its docs' recipe, stage 2 with every term off)."""
    generator = torch.Generator().manual_seed(3)
    pipe = _pipe(model, image is not None)
    adapters = []
    if stage1_lora is not None:
        pipe.load_lora_weights(str(stage1_lora[0]), adapter_name="both")
        adapters.append(("both", stage1_lora[1]))
        pipe.set_adapters(*map(list, zip(*adapters)))
    video, audio = _call(pipe, 64, generator, image, num_inference_steps=2, output_type="latent", **GUIDED_KW)
    up = LTX2LatentUpsamplePipeline(vae=pipe.vae, latent_upsampler=LTX2LatentUpsamplerModel.from_pretrained(upsampler))
    up.set_progress_bar_config(disable=True)
    video = up(latents=video, output_type="latent", return_dict=False)[0]
    if stage2_lora is not None:
        pipe.load_lora_weights(str(stage2_lora[0]), adapter_name="stage2")
        adapters.append(("stage2", stage2_lora[1]))
        pipe.set_adapters(*map(list, zip(*adapters)))
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, use_dynamic_shifting=False,
                                                                 shift_terminal=None)
    return _call(pipe, 128, generator, image, latents=video, audio_latents=audio,
                 noise_scale=stage2_sigmas[0], sigmas=list(stage2_sigmas), num_inference_steps=len(stage2_sigmas),
                 output_type="np", **OFF_KW)


@pytest.mark.parametrize("stage2_lora", [False, True], ids=["plain", "stage2-lora"])
@pytest.mark.parametrize("image", [False, True], ids=["t2v", "i2v"])
def test_two_stage_equals_the_diffusers_chain(tiny, tmp_path, image, stage2_lora):
    root, model, files = tiny
    img = root / "image64.png" if image else None
    args = ["--height", "128", "--width", "128", "--steps", "2", *GUIDED, "--two-stage"]
    args += ["--image", img] if image else []
    args += ["--stage2-lora", f"{files['stage2']}:0.7"] if stage2_lora else []
    ours = _ours(tmp_path, model, *args)
    video, audio = _chain(model, model / "latent_upsampler", img, (files["stage2"], 0.7) if stage2_lora else None)
    _close(ours, video, audio)
    side = json.loads((tmp_path / "o0.npz.json").read_text())
    assert side["recipe"]["stage2"]["sigmas"] == pytest.approx(STAGE_2_DISTILLED_SIGMA_VALUES)
    assert len(side["recipe"]["stage2"]["loras"]) == int(stage2_lora)
    assert {"stage1_s", "upsample_s", "stage2_s", "video_decode_s", "audio_decode_s"} <= set(side["timings"])


def test_two_stage_with_both_loras_equals_the_chain(tiny, tmp_path):
    """Both LoRAs, a stage-2 schedule of our own (two steps, not the preset's three), and a VAE whose
    scaling_factor is not 1 (every LTX-2 VAE's is, which would hide where the upsampler's de/normalisation
    takes it): still the chain."""
    _, tiny_model, files = tiny
    model = tmp_path / "scaled"
    shutil.copytree(tiny_model, model)
    config = model / "vae" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "scaling_factor": 0.7}))
    sigmas = (0.85, 0.4)
    ours = _ours(tmp_path, model, "--height", "128", "--width", "128", "--steps", "2", *GUIDED, "--two-stage",
                 "--lora", f"{files['diffusers']}:0.6", "--stage2-lora", f"{files['stage2']}:0.7",
                 "--stage2-sigmas", ",".join(map(str, sigmas)))
    video, audio = _chain(model, model / "latent_upsampler", None, (files["stage2"], 0.7), (files["diffusers"], 0.6),
                          stage2_sigmas=sigmas)
    _close(ours, video, audio)
    side = json.loads((tmp_path / "o0.npz.json").read_text())
    assert side["recipe"]["stage2"]["sigmas"] == pytest.approx(sigmas)


def test_two_stage_moves_with_the_stage2_lora_and_the_upsampler(tiny, tmp_path):
    root, model, files = tiny
    base = ["--height", "128", "--width", "128", "--preset", "ltx-2.3-distilled", "--two-stage"]
    plain = _ours(tmp_path, model, *base)
    assert _moved(_ours(tmp_path, model, *base, "--stage2-lora", files["stage2"]), plain)
    assert _moved(_ours(tmp_path, model, *base, "--upsampler", root / "other_upsampler"), plain)


@pytest.mark.parametrize("quantize", ["none", "fp8"])
def test_a_stage2_lora_does_not_leak_into_the_next_item(tiny, tmp_path, quantize):
    """In one batch (the model loaded once) a stage-2 LoRA is fused after stage 1 and taken out before the next
    item: the next item equals a fresh run (float8 weights get their base codes back; the LoRA's layers left in
    the model dtype are within rounding)."""
    _, model, files = tiny
    lines = tmp_path / "b.jsonl"
    lines.write_text(json.dumps({"prompt": PROMPT, "two_stage": True, "stage2_lora": str(files["stage2"]),
                                 "lora": f"{files['lightricks']}:0.5", "output": str(tmp_path / "a.npz")}) + "\n"
                     + json.dumps({"prompt": PROMPT, "output": str(tmp_path / "b.npz")}) + "\n")
    flags = ["--height", "128", "--width", "128", "--preset", "ltx-2.3-distilled", "--quantize", quantize]
    result = cli("batch", lines, "--model", model, *flags, *COMMON)
    assert result.exit_code == 0, result.output
    fresh = _ours(tmp_path, model, *flags)
    np.testing.assert_allclose(np.load(tmp_path / "b.npz")["frames"], fresh["frames"], rtol=0, atol=1e-6)
    side = json.loads((tmp_path / "a.npz.json").read_text())
    assert side["quantization"]["method"] == quantize
    assert [r["strength"] for r in side["recipe"]["stage2"]["loras"]] == [0.5, 1.0]


def test_explicit_schedule_equals_the_scheduler_as_given(tiny):
    from usp_infer.schedule import explicit_schedule

    _, model, _ = tiny
    config = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    for sigmas in (DISTILLED_SIGMA_VALUES, STAGE_2_DISTILLED_SIGMA_VALUES, [0.8, 0.3]):
        for shift in (1.0, 2.5):
            ref = FlowMatchEulerDiscreteScheduler.from_config({**config, "shift": shift}, use_dynamic_shifting=False,
                                                              shift_terminal=None)
            ref.set_timesteps(sigmas=sigmas, device="cpu")
            timesteps, ours = explicit_schedule({**config, "shift": shift}, sigmas)
            assert torch.equal(ours, ref.sigmas) and torch.equal(timesteps, ref.timesteps)


def _other_model_lora(tmp: Path) -> Path:
    ltxv = Path(__file__).resolve().parents[1] / "models" / "ltx-tiny" / "transformer"
    return write_lora(tmp / "ltxv.safetensors", ltxv, "diffusers")


def _broken_loras(tmp: Path, good: Path, args: list) -> dict:
    """The good LoRA with one module's B (or A) factor left out, or one non-square module's factors of a
    consistent rank but for the transposed weight (B in x r, A r x out)."""
    from safetensors.torch import load_file, save_file

    tensors, made = load_file(good), {}
    first = sorted(k for k in tensors if k.endswith(".lora_B.weight"))[0]
    wide = next(k for k in sorted(tensors) if k.endswith(".lora_B.weight")
                and tensors[k].shape[0] != tensors[k.replace(".lora_B.", ".lora_A.")].shape[1])
    out_dim, rank = tensors[wide].shape
    in_dim = tensors[wide.replace(".lora_B.", ".lora_A.")].shape[1]
    for name, change in (("no_b", lambda t: t.pop(first)),
                         ("no_a", lambda t: t.pop(first.replace(".lora_B.", ".lora_A."))),
                         ("transposed", lambda t: t.update({wide: torch.ones(in_dim, rank),
                                                            wide.replace(".lora_B.", ".lora_A."): torch.ones(rank, out_dim)}))):
        if "{%s}" % name in args:
            copy = dict(tensors)
            change(copy)
            save_file(copy, str(tmp / f"{name}.safetensors"))
            made[name] = tmp / f"{name}.safetensors"
    return made


def _broken_upsamplers(tmp: Path, model: Path, args: list) -> dict:
    """Copies of the model's latent upsampler whose config says another channel count, scale, or axis."""
    made = {}
    for name, change in (("up_channels", {"in_channels": 64}), ("up_scale", {"rational_spatial_scale": 1.5}),
                         ("up_temporal", {"spatial_upsample": False, "temporal_upsample": True})):
        if "{%s}" % name in args:
            shutil.copytree(model / "latent_upsampler", tmp / name)
            config = json.loads((tmp / name / "config.json").read_text())
            (tmp / name / "config.json").write_text(json.dumps({**config, "use_rational_resampler": True, **change}))
            made[name] = tmp / name
    return made


@pytest.mark.parametrize("args, message", [
    (["--two-stage", "--model", "{nofolder}"], "has no latent_upsampler/ folder; pass --upsampler"),
    (["--two-stage", "--height", "96"], "--height 96 is not a multiple of 64, which --two-stage needs"),
    (["--two-stage", "--upsampler", "{tmp}"], "has no config.json"),
    (["--lora", "{ltxv}"], "is it a LoRA for another model?"),
    (["--lora", "{tmp}/missing.safetensors"], "does not exist"),
    (["--lora", "{model}/model_index.json"], "is not a safetensors file"),
    (["--sigmas", "1,0.5,0.7"], "--sigmas must be strictly decreasing, but 0.7 follows 0.5"),
    (["--sigmas", "1,0.5,0.5"], "--sigmas must be strictly decreasing, but 0.5 follows 0.5"),
    (["--sigmas", "1.5,0.5"], "--sigmas has 1.5, outside (0, 1]"),
    (["--sigmas", "1,0"], "--sigmas has 0, outside (0, 1]"),
    (["--sigmas", "1,abc"], "is not a comma-separated list of numbers"),
    (["--sigmas", "1,0.5", "--steps", "3"], "--steps 3 disagrees with the sigma schedule's 2 steps"),
    (["--preset", "ltx-2.3-distilled", "--steps", "4"], "--steps 4 disagrees with the sigma schedule's 8 steps"),
    (["--stage2-lora", "{stage2}"], "--stage2-lora only apply with --two-stage"),
    (["--two-stage", "--stage2-lora", "{ltxv}"], "is it a LoRA for another model?"),
    (["--lora", "{no_b}"], "has no B (lora_B/lora_up) factor"),
    (["--lora", "{no_a}"], "has no A (lora_A/lora_down) factor"),
    (["--lora", "{transposed}"], "but its LoRA factors are B"),
    (["--two-stage", "--upsampler", "{up_channels}"], "upsamples 64-channel latents, but the transformer's are"),
    (["--two-stage", "--upsampler", "{up_scale}"], "is not a x2 spatial latent upsampler"),
    (["--two-stage", "--upsampler", "{up_temporal}"], "is not a x2 spatial latent upsampler"),
    (["--two-stage", "--stage2-sigmas", "0.9,0.95"], "--stage2-sigmas must be strictly decreasing"),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny, tmp_path, args, message):
    root, model, files = tiny
    nofolder = tmp_path / "nofolder"
    if "{nofolder}" in args:
        shutil.copytree(model, nofolder)
        shutil.rmtree(nofolder / "latent_upsampler")
    ltxv = _other_model_lora(root) if "{ltxv}" in args else None
    values = dict(tmp=tmp_path, nofolder=nofolder, ltxv=ltxv, model=model, stage2=files["stage2"],
                  **_broken_loras(tmp_path, files["lightricks"], args), **_broken_upsamplers(tmp_path, model, args))
    rest = [str(a).format(**values) for a in args]
    if "--model" not in rest:
        rest += ["--model", str(model)]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    before = snapshot(out_dir)
    result = cli("generate", "--prompt", PROMPT, "--height", "64", "--width", "64", *rest, "-o", out_dir / "x.mp4")
    assert result.exit_code == 2 and message in error_line(result.stderr), result.stderr
    assert snapshot(out_dir) == before


def test_lora_specs_from_flags_and_batch_lines(monkeypatch, tmp_path):
    """PATH, PATH:STRENGTH and a batch line's {"path", "strength"}; '~' is the home folder; a ':' that is part of
    the path stays there."""
    monkeypatch.setenv("HOME", str(tmp_path))
    spec = recipes.LoraSpec
    assert recipes.parse_lora("--lora", {"path": "~/a.safetensors", "strength": 0.3}) == spec(str(tmp_path / "a.safetensors"), 0.3)
    assert recipes.parse_lora("--lora", {"path": "a.safetensors"}) == spec("a.safetensors", 1.0)
    assert recipes.parse_lora("--lora", "~/b.safetensors:0.25") == spec(str(tmp_path / "b.safetensors"), 0.25)
    assert recipes.parse_lora("--lora", "dir:b.safetensors") == spec("dir:b.safetensors", 1.0)
    with pytest.raises(ValueError, match="names no file"):
        recipes.parse_lora("--lora", {"strength": 0.5})
    with pytest.raises(ValueError, match="the strength must be a finite number"):
        recipes.parse_lora("--lora", "b.safetensors:nan")


def test_recipe_presets_are_plain_data():
    assert recipes.DISTILLED_SIGMAS == tuple(DISTILLED_SIGMA_VALUES)
    assert recipes.STAGE2_SIGMAS == tuple(STAGE_2_DISTILLED_SIGMA_VALUES)


def test_info_lists_the_loras_a_run_would_apply(tiny):
    root, model, files = tiny
    out = json.loads(cli("info", model, "--lora", f"{files['lightricks']}:0.8", "--stage2-lora", files["stage2"],
                         "--json").stdout)
    assert [(e["strength"], e["stage"], e["rank"]) for e in out["loras"]] == [(0.8, "both stages", [2]),
                                                                               (1.0, "stage 2", [2])]
    assert out["loras"][0]["modules"] == len(lora.check(files["lightricks"], lora.weight_table(model / "transformer")))
    assert "latent_upsampler" in out["parameters"]
    text = cli("info", model, "--lora", f"{files['lightricks']}:0.8").stdout
    assert f"lora         {files['lightricks']} x0.8 (both stages): " in text
    bad = cli("info", model, "--lora", root / "nothing.safetensors")
    assert bad.exit_code == 2 and "does not exist" in error_line(bad.stderr)


def test_bench_times_whole_recipes_by_phase(tmp_path):
    """`usp-infer bench --recipe` on the CPU at the tiny shape: every phase of a two-stage run is there."""
    out = tmp_path / "r.json"
    result = cli("bench", "--shape", "ltx2-tiny", "--recipe", "distilled,two-stage", "--height", "64", "--width",
                 "64", "--num-frames", "9", "--device", "cpu", "--dtype", "float32", "--json-out", out)
    assert result.exit_code == 0, result.output
    one, two = json.loads(out.read_text())
    assert (one["recipe"], two["recipe"]) == ("distilled", "two-stage")
    assert (two["gpu_count"], two["torch"]) == (0, torch.__version__) and "command" in two
    assert one["request"]["branches"] == ["cond"] and one["request"]["steps"] == 8
    assert two["request"]["branches"] == ["cond", "uncond", "perturbed", "isolated"] and two["request"]["stage2_loras"] == 1
    assert {"stage1_s", "stage2_lora_fuse_s", "upsample_s", "stage2_s", "video_decode_s", "audio_decode_s",
            "write_s", "total_s", "write_smooth_s", "total_smooth_s"} <= set(two["phases_s"])
    ph = two["phases_s"]
    assert ph["total_smooth_s"] == pytest.approx(ph["total_s"] - ph["write_s"] + ph["write_smooth_s"])
    assert "upsample_s" not in one["phases_s"]
    assert "stage 2" in result.stdout and "mp4 write" in result.stdout
    bad = cli("bench", "--shape", "ltx2-tiny", "--recipe", "two-stage", "--height", "96", "--device", "cpu")
    assert bad.exit_code == 2 and "not a multiple of 64" in bad.stderr


def test_bench_recipe_run_cut_short_keeps_what_it_measured(tmp_path, monkeypatch):
    """Each record is saved (and its column printed) as it finishes: a run that fails or is killed in its second
    recipe leaves the first recipe's record in --json-out."""
    from usp_infer.ltx2 import bench_e2e

    real, calls = bench_e2e.run, []

    def run(*args):  # each recipe runs twice (untimed, then timed): the third call is the second recipe's
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return real(*args)

    monkeypatch.setattr(bench_e2e, "run", run)
    out = tmp_path / "r.json"
    args = ["bench", "--shape", "ltx2-tiny", "--recipe", "distilled,one-stage", "--height", "64", "--width", "64",
            "--num-frames", "9", "--device", "cpu", "--dtype", "float32", "--json-out", str(out)]
    result = CliRunner().invoke(app, args)  # not test_cli's cli: that one fails on the exception raised here
    assert result.exit_code != 0 and str(result.exception) == "killed"
    (kept,) = json.loads(out.read_text())
    assert kept["recipe"] == "distilled" and kept["gpu_count"] == 0 and "command" in kept
    assert "distilled 64x64x9" in result.stdout


def test_bench_recipe_components_compress_as_the_released_vae():
    """The benchmark's video VAE has the released geometry: 32x spatial, 8x temporal in its ratios and in what it
    really decodes (the class defaults say 64x/16x: a stage 2 timed with an eighth of its tokens), and a record's
    token counts follow from it (a 1536x1024x121 two-stage-distilled run: 6,144 then 24,576 tokens)."""
    from diffusers import AutoencoderKLLTX2Video

    from usp_infer.ltx2 import bench_e2e, model as arch

    cfg = arch.SHAPES["ltx-2.3-22b"]
    with torch.device("meta"):
        vae = bench_e2e._modules("ltx-2.3-22b", cfg)[0]
    assert (vae.spatial_compression_ratio, vae.temporal_compression_ratio) == (32, 8)
    narrow = dict(bench_e2e.RELEASED_VIDEO_VAE, block_out_channels=(8, 16, 32, 64),
                  decoder_block_out_channels=(8, 16, 32), layers_per_block=(1,) * 5, decoder_layers_per_block=(1,) * 4)
    with torch.no_grad():
        frames = AutoencoderKLLTX2Video(**narrow).eval().decode(torch.randn(1, 128, 2, 2, 3)).sample
    assert frames.shape == (1, 3, 9, 64, 96)
    req = bench_e2e.request("two-stage-distilled", cfg, 1024, 1536, 121)
    assert bench_e2e.tokens(vae, req) == {"stage1": 6144, "stage2": 24576}


def test_bench_recipe_quantized_runs_float8_blocks(tmp_path):
    """--recipe with --quantize fp8,fp8-static: model-dtype records then fp8 ones, then ones with calibrated static
    input scales, in one launch (the stage-2 LoRA fused into the float8 weights: its fuse timed); the fp8 run
    really goes through FP8Linear."""
    from usp_infer import quant

    out = tmp_path / "r.json"
    result = cli("bench", "--shape", "ltx2-tiny", "--recipe", "two-stage-distilled,two-stage",
                 "--quantize", "fp8-static,fp8", "--height", "64", "--width", "64", "--num-frames", "9",
                 "--device", "cpu", "--dtype", "float32",
                 "--json-out", out)
    assert result.exit_code == 0, result.output
    records = json.loads(out.read_text())
    assert [(r["recipe"], r["quantize"]) for r in records] == [
        ("two-stage-distilled", "none"), ("two-stage", "none"), ("two-stage-distilled", "fp8"), ("two-stage", "fp8"),
        ("two-stage-distilled", "fp8-static"), ("two-stage", "fp8-static")]
    assert [r["quantization"].get("activations") for r in records] == [None] * 2 + ["per row"] * 2 + ["static"] * 2
    assert records[3]["phases_s"]["stage2_lora_fuse_s"] > 0 and records[3]["request"]["stage2_loras"] == 1
    calls = []
    real = quant.FP8Linear.forward
    quant.FP8Linear.forward = lambda self, x: calls.append(1) or real(self, x)
    try:
        cli("bench", "--shape", "ltx2-tiny", "--recipe", "distilled", "--height", "64", "--width", "64",
            "--num-frames", "9", "--device", "cpu", "--dtype", "float32")
        assert not calls
        cli("bench", "--shape", "ltx2-tiny", "--recipe", "distilled", "--quantize", "fp8", "--height", "64",
            "--width", "64", "--num-frames", "9", "--device", "cpu", "--dtype", "float32")
        assert calls
    finally:
        quant.FP8Linear.forward = real


def _fp8_transformer(model: Path, dtype: torch.dtype = torch.float32):
    from usp_infer import quant
    from usp_infer.ltx2.model import load_transformer

    return quant.quantize_(load_transformer(model / "transformer", "cpu", dtype))


def _expected_fp8(base: dict, files: list, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize(dequantize(base) + sum of strength * alpha / rank * B @ A), from the files' own tensors: what
    Lightricks' loader does to its fp8 checkpoints (per output channel here), written apart from lora.py."""
    from safetensors.torch import load_file

    from usp_infer.quant import quantize_tensor

    w = base[name].float() * base[name.removesuffix("weight") + "weight_scale"][:, None]
    for path, strength in files:
        tensors = load_file(path)
        key = "diffusion_model." + name.removesuffix(".weight")  # the test files' modules keep their names
        if key + ".lora_A.weight" in tensors:  # no alpha key: alpha = rank, scale 1
            a, b, scale = tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"], 1.0
        else:
            a, b = tensors[key + ".lora_down.weight"], tensors[key + ".lora_up.weight"]
            scale = float(tensors[key + ".alpha"]) / a.shape[0]
        w = w + (b * (strength * scale)) @ a
    return quantize_tensor(w)


def test_a_lora_fuses_into_float8_weights_from_their_base_codes(tiny, tmp_path):
    """Fusing into e4m3 weights: each touched weight = quantize(dequantize(base) + deltas) with its new scales,
    from the base codes whatever was fused before (the set alone decides: fusing on top of the fused codes, or
    keeping the old scales, fails); untouched layers keep their bits; taking every LoRA out gives the base back
    and frees the copy. One of the LoRAs has alpha 1 at rank 2: its delta is halved."""
    _, model, files = tiny
    transformer = _fp8_transformer(model)
    base = {k: v.clone() for k, v in transformer.state_dict().items()}
    fuser = lora.Fuser(transformer)
    assert fuser.dtype == torch.float32
    assert lora.Fuser(_fp8_transformer(model, torch.bfloat16)).dtype == torch.bfloat16  # not the scales' fp32
    half = write_lora(tmp_path / "half.safetensors", model / "transformer", "kohya", seed=4, alpha=1.0)
    both = [(files["lightricks"], 0.8), (files["stage2"], 1.0), (half, 0.9)]
    fuser.use([recipes.LoraSpec(str(p), s) for p, s in both])
    state = transformer.state_dict()
    touched = set().union(*(lora.load(f).deltas for f, _ in both))
    fp8 = {n for n in touched if state[n].dtype == torch.float8_e4m3fn}
    assert fp8 and len(fuser.base) == len(fp8)
    for name in sorted(fp8):
        codes, scales = _expected_fp8(base, both, name)
        assert torch.equal(state[name].view(torch.uint8), codes.view(torch.uint8)), name
        assert torch.equal(state[name.removesuffix("weight") + "weight_scale"], scales), name
    assert any(not torch.equal(state[n].view(torch.uint8), base[n].view(torch.uint8)) for n in fp8)
    for name, tensor in state.items():
        if name not in touched and not name.endswith("weight_scale"):
            assert torch.equal(tensor.view(torch.uint8), base[name].view(torch.uint8)), name
    fuser.use([recipes.LoraSpec(str(files["stage2"]), 1.0)])  # the first LoRA leaves: stage2 alone, from the base
    state = transformer.state_dict()
    for name in sorted(fp8):
        codes, scales = _expected_fp8(base, [(files["stage2"], 1.0)], name)
        assert torch.equal(state[name].view(torch.uint8), codes.view(torch.uint8)), name
        assert torch.equal(state[name.removesuffix("weight") + "weight_scale"], scales), name
    fuser.use([])
    for name, tensor in transformer.state_dict().items():
        if name in touched and name not in fp8:  # model-dtype weights: the delta subtracted again, to rounding
            torch.testing.assert_close(tensor, base[name], rtol=0, atol=1e-6)
        else:
            assert torch.equal(tensor.view(torch.uint8), base[name].view(torch.uint8)), name
    assert fuser.base == {}


def test_a_lora_fuses_into_bf16_weights_rounded_once_and_leaves_again(tiny):
    """Model-dtype weights: w + strength * alpha / rank * B A in one in-place GEMM, within an ulp of the delta and
    one of the sum (the CPU's bf16 GEMM may round the product before adding; cuBLAS adds in fp32); taking the LoRA
    out again comes back within those; untouched weights keep their bits; a dropped strength or delta fails."""
    from safetensors.torch import load_file

    from usp_infer.ltx2.model import load_transformer

    _, model, files = tiny
    transformer = load_transformer(model / "transformer", "cpu", torch.bfloat16)
    base = {k: v.clone() for k, v in transformer.state_dict().items()}
    fuser = lora.Fuser(transformer)
    fuser.use([recipes.LoraSpec(str(files["lightricks"]), 0.8)])
    tensors, state = load_file(files["lightricks"]), transformer.state_dict()
    touched, bounds = set(lora.load(files["lightricks"]).deltas), {}
    for name in [n for n in touched if n.startswith("transformer_blocks.")]:  # their file keys are their names
        key = "diffusion_model." + name.removesuffix(".weight")
        # the factors in the model dtype (as Lightricks fuses), the rest exact: no alpha key, alpha / rank = 1
        a, b = (tensors[key + f".lora_{x}.weight"].bfloat16().float() for x in "AB")
        delta = 0.8 * (b @ a)
        exact = base[name].float() + delta
        ulp = (exact.abs() + delta.abs()) * 2**-7 + 2**-126  # bf16 keeps 8 significant bits
        assert ((state[name].float() - exact).abs() <= ulp).all(), name
        assert not torch.equal(state[name], base[name]), name
        bounds[name] = 2 * ulp  # the way back rounds as often again
    fuser.use([])
    for name, tensor in transformer.state_dict().items():
        if name in bounds:
            assert ((tensor.float() - base[name].float()).abs() <= bounds[name]).all(), name
        elif name not in touched:
            assert torch.equal(tensor, base[name]), name


def test_fp8_with_a_lora_is_the_model_dtype_lora_within_the_fp8_bound(tiny, tmp_path):
    """generate --quantize fp8 --lora: as close to the fp32 LoRA run as fp8 is to fp32 (the tiny model's bound,
    tests/test_quant.py), and nearer to it than fp8 without the LoRA is (a LoRA silently dropped in fp8 fails)."""
    _, model, files = tiny
    args = ["--height", "64", "--width", "64", "--steps", "2", *GUIDED]
    with_lora = ["--lora", f"{files['lightricks']}:0.8"]
    fp32 = _ours(tmp_path, model, *args, *with_lora)
    fp8 = _ours(tmp_path, model, *args, *with_lora, "--quantize", "fp8")
    fp8_plain = _ours(tmp_path, model, *args, "--quantize", "fp8")
    rel = lambda a, b: float(np.linalg.norm(a["frames"] - b["frames"]) / np.linalg.norm(b["frames"]))  # noqa: E731
    assert 0 < rel(fp8, fp32) < 0.05
    assert rel(fp8, fp32) < rel(fp8_plain, fp32) / 2
    # a folder written by `usp-infer quantize` takes the LoRA as --quantize fp8 does: the same codes, the same video
    stored = tmp_path / "fp8-folder"
    assert cli("quantize", model, stored, "--dtype", "float32").exit_code == 0
    np.testing.assert_array_equal(_ours(tmp_path, stored, *args, *with_lora)["frames"], fp8["frames"])
