"""The command line with an LTX-2 folder: the family is the folder's, the outputs carry sound, and it
equals diffusers' LTX2Pipeline; the other family's flags and impossible audio requests fail in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from diffusers import LTX2Pipeline
from model_folders import differences
from test_cli import cli, error_line, snapshot

ROOT = Path(__file__).resolve().parents[1]
LTX2 = ROOT / "models" / "ltx2-tiny"
LTXV = ROOT / "models" / "ltx-tiny"
PROMPT, NEGATIVE = "a dog barking at the sea", "blurry, silent"
# 64x64 pixels, 9 frames at 24 fps: 2 latent frames of 2x2 tokens and 9 audio tokens; 2 steps.
FAST = ["--height", "64", "--width", "64", "--num-frames", "9", "--steps", "2", "--max-sequence-length", "16"]
# Every term, video and audio apart (the tiny model has 2 blocks: STG on its last).
GUIDED = ["--guidance-scale", "3", "--stg-scale", "1", "--modality-scale", "2.5", "--guidance-rescale", "0.7",
          "--audio-guidance-scale", "5", "--audio-stg-scale", "0.5", "--audio-modality-scale", "2",
          "--audio-guidance-rescale", "0.5", "--stg-blocks", "1"]
# Same fp32 math as diffusers with the same draws: differences are op-order rounding (~1e-6 here).
ATOL = 1e-4


def test_generate_npz_equals_ltx2_pipeline(tmp_path):
    out = tmp_path / "x.npz"
    result = cli("generate", "--model", LTX2, "--prompt", PROMPT, "--negative-prompt", NEGATIVE, *FAST, *GUIDED,
                 "--seed", "3", "-o", out, "--quiet")
    assert result.exit_code == 0, result.output
    ours = np.load(out)
    pipe = LTX2Pipeline.from_pretrained(LTX2)
    pipe.set_progress_bar_config(disable=True)
    video, audio = pipe(
        prompt=PROMPT, negative_prompt=NEGATIVE, height=64, width=64, num_frames=9, frame_rate=24.0,
        num_inference_steps=2, max_sequence_length=16, guidance_scale=3.0, stg_scale=1.0, modality_scale=2.5,
        guidance_rescale=0.7, audio_guidance_scale=5.0, audio_stg_scale=0.5, audio_modality_scale=2.0,
        audio_guidance_rescale=0.5, spatio_temporal_guidance_blocks=[1], use_cross_timestep=True,
        generator=torch.Generator().manual_seed(3), output_type="np", return_dict=False,
    )
    np.testing.assert_allclose(ours["frames"], video[0], rtol=0, atol=ATOL)
    np.testing.assert_allclose(ours["audio"], np.asarray(audio[0], dtype=np.float32), rtol=0, atol=ATOL)
    assert int(ours["audio_sample_rate"]) == pipe.vocoder.config.output_sampling_rate
    assert {"latents", "audio_latents"} <= set(ours.files)
    side = json.loads((tmp_path / "x.npz.json").read_text())
    assert side["model"]["family"] == "ltx-2"
    assert side["request"]["guidance"]["audio"] == {"cfg": 5.0, "stg": 0.5, "modality": 2.0, "rescale": 0.5}


def test_defaults_are_the_weights_recipe_and_outputs_have_sound(tmp_path):
    mp4, wav = tmp_path / "a.mp4", tmp_path / "a.wav"
    assert cli("generate", "--model", LTX2, "--prompt", PROMPT, *FAST, "-o", mp4, "--quiet").exit_code == 0
    side = json.loads((tmp_path / "a.mp4.json").read_text())
    # LTX-2.3-style weights: diffusers' 2.3 recipe (the tiny model's STG block is its last, 1)
    assert side["request"]["guidance"] == {"video": {"cfg": 3.0, "stg": 1.0, "modality": 3.0, "rescale": 0.7},
                                           "audio": {"cfg": 7.0, "stg": 1.0, "modality": 3.0, "rescale": 0.7},
                                           "stg_blocks": [1]}
    with av.open(str(mp4)) as container:
        video = container.streams.video[0]
        audio = container.streams.audio[0]
        assert (video.codec_context.name, video.width, video.height) == ("h264", 64, 64)
        assert audio.codec_context.name == "aac" and audio.channels == 2
        rate = audio.rate
        frames = sum(1 for _ in container.decode(video=0))
    assert frames == 9
    assert cli("generate", "--model", LTX2, "--prompt", PROMPT, *FAST, "-o", wav, "--quiet").exit_code == 0
    with av.open(str(wav)) as container:
        assert container.streams.audio[0].rate == rate
    silent = tmp_path / "silent.mp4"
    assert cli("generate", "--model", LTX2, "--prompt", PROMPT, *FAST, "--no-audio", "-o", silent,
               "--quiet").exit_code == 0
    with av.open(str(silent)) as container:
        assert [s.type for s in container.streams] == ["video"]


def test_batch_runs_the_ltx2_family(tmp_path):
    lines = tmp_path / "p.jsonl"
    lines.write_text(json.dumps({"prompt": "waves", "seed": 1, "audio_guidance_scale": 4}) + "\n"
                     + json.dumps({"prompt": "rain", "output": str(tmp_path / "rain.wav")}) + "\n")
    result = cli("batch", lines, "--model", LTX2, *FAST, "--output-dir", tmp_path / "out", "--quiet")
    assert result.exit_code == 0, result.output
    first = next((tmp_path / "out").glob("*.mp4.json"))
    assert json.loads(first.read_text())["request"]["guidance"]["audio"]["cfg"] == 4.0
    assert (tmp_path / "rain.wav").is_file()


def test_info_names_the_family():
    out = json.loads(cli("info", LTX2, "--gpus", "4", "--json").stdout)
    assert out["family"] == "ltx-2" and "Gemma" in out["needs"]
    assert (4, 1, 1) in {(x["cfg"], x["ring"], x["ulysses"]) for x in out["layouts"]}  # four branches: cfg 4 fits
    # Each rank's share counts rows through blocks: one GPU carries 4 - 1/2 (the perturbed row skips block 0 of 2),
    # a cfg rank one branch (1/3.5), cfg 2's busiest (uncond, isolated) 2 of them over Ulysses 2; Ulysses 4: 1/4.
    cost = {(x["cfg"], x["ring"], x["ulysses"]): x["cost"] for x in out["layouts"]}
    assert cost[4, 1, 1].startswith("~0.29 of one GPU's step per rank: 1 of 4 branches")
    assert cost[2, 1, 2].startswith("~0.29 of one GPU's step per rank: 2 of 4 branches")
    assert cost[1, 1, 4].startswith("~0.25 of one GPU's step per rank: 4 of 4 branches")
    assert json.loads(cli("info", LTXV, "--json").stdout)["family"] == "ltx-video"


@pytest.mark.parametrize("args, message", [
    ([LTXV, "--modality-scale", "2"], "--modality-scale is a flag of ltx-2 models, but "),
    ([LTXV, "--no-audio"], "--no-audio is a flag of ltx-2 models"),
    ([LTXV, "--image-crf", "0"], "--image-crf is a flag of ltx-2 models"),
    ([LTX2, "--cfg-star"], "--cfg-star is a flag of ltx-video models, but "),
    ([LTX2, "--decode-timestep", "0.05"], "--decode-timestep is a flag of ltx-video models"),
    ([LTX2, "--image-crf", "60"], "--image-crf 60 must be in 0..51"),
    ([LTX2, "--fps", "60", "--num-frames", "1"], "gives no audio token"),
    ([LTX2, "--guidance-scale", "1,2"], "--guidance-scale takes one value for LTX-2 models"),
    ([LTX2, "--stg-blocks", "5"], "--stg-blocks 5 is out of range: the model has 2 blocks"),
    ([LTX2, "--stg-blocks", "2"], "--stg-blocks 2 is out of range: the model has 2 blocks (0..1)"),
    ([LTX2, "--audio-stg-scale", "nan"], "--audio-stg-scale nan is invalid; use a finite value >= 0"),
    ([LTX2, "--modality-scale", "-1"], "--modality-scale -1.0 is invalid; use a finite value >= 0"),
    ([LTX2, "--image-strength", "0.5"], "--image-strength is a flag of ltx-video models"),
    ([LTXV, "--audio", "{tmp}/voice.wav"], "--audio is a flag of ltx-2 models"),
    ([LTX2, "--preset", "ltx-video-2b"], "--preset 'ltx-video-2b' is not an LTX-2 preset"),
    ([LTXV, "-o", "{tmp}/a.wav"], "ltx-video models make no audio"),
    ([LTX2, "--no-audio", "-o", "{tmp}/a.wav"], "is audio only, but --no-audio skips the audio"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, message):
    model, *rest = args
    rest = [str(a).format(tmp=tmp_path) for a in rest]
    before = snapshot(tmp_path)
    result = cli("generate", "--model", model, "--prompt", PROMPT, "-o", tmp_path / "x.mp4", *rest)
    assert result.exit_code == 2 and message in error_line(result.stderr)
    assert snapshot(tmp_path) == before


def test_batch_lines_with_the_other_familys_keys_name_its_flags(tmp_path):
    """A line's key is named as the flag a user would drop: "conditions" is --condition, "audio" --no-audio
    (false) or --audio (a sound file)."""
    lines = tmp_path / "p.jsonl"
    lines.write_text(json.dumps({"prompt": "x", "conditions": [{"path": "a.png"}]}) + "\n"
                     + json.dumps({"prompt": "y", "audio": False}) + "\n"
                     + json.dumps({"prompt": "z", "audio": "voice.wav"}) + "\n")
    before = snapshot(tmp_path)
    result = cli("batch", lines, "--model", LTXV, "--output-dir", tmp_path / "out")
    assert result.exit_code == 2
    line = error_line(result.stderr)
    assert f"line 1 of {lines}: --condition is a flag of ltx-2 models, but {LTXV} is an ltx-video model" in line
    assert f"line 2 of {lines}: --no-audio is a flag of ltx-2 models" in line
    assert f"line 3 of {lines}: --audio is a flag of ltx-2 models" in line
    assert snapshot(tmp_path) == before


def test_make_tiny_ltx2_writes_the_committed_model(tmp_path):
    """Tensors bit for bit, configs and tokenizer as JSON: a new transformers or diffusers release, which stamps
    its version into the configs, does not fail it; a changed weight or config value does (test below)."""
    assert cli("make-tiny", "--family", "ltx2", tmp_path / "t").exit_code == 0
    assert differences(tmp_path / "t", LTX2) == []


def test_committed_model_check_sees_a_changed_weight_or_config(tmp_path):
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "copy"
    shutil.copytree(LTX2, copy)
    stamped = copy / "text_encoder" / "config.json"
    stamped.write_text(stamped.read_text().replace('"transformers_version": "', '"transformers_version": "9'))
    assert differences(copy, LTX2) == []  # a version stamp is not part of the model
    weights = copy / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] += 2 ** -20  # one value, one ulp-ish step
    save_file(tensors, weights, metadata={"format": "pt"})
    assert differences(copy, LTX2) == [f"vae/diffusion_pytorch_model.safetensors:{key}"]
    shutil.copy(LTX2 / "vae" / "diffusion_pytorch_model.safetensors", weights)
    config = copy / "vae" / "config.json"
    config.write_text(config.read_text().replace('"patch_size": 4', '"patch_size": 2'))
    assert differences(copy, LTX2) == ["vae/config.json.patch_size: 4 -> 2"]


def test_one_step_makes_a_video_with_sound(tmp_path):
    """One step: the terminal stretch is undefined for the single sigma 1 (diffusers gives NaN); ours skips it."""
    out = tmp_path / "one.npz"
    assert cli("generate", "--model", LTX2, "--prompt", PROMPT, *FAST[:6], "--steps", "1", "-o", out,
               "--quiet").exit_code == 0
    data = np.load(out)
    assert np.isfinite(data["frames"]).all() and np.isfinite(data["audio"]).all()


def test_recipe_follows_the_weights_version():
    """LTX-2.3-style weights (cross_attn_mod) take the 2.3 recipe, LTX-2.0-style ones the 2.0 recipe."""
    from usp_infer.ltx2.request import build_request, version_preset

    configs = {"transformer": {"num_layers": 48, "cross_attn_mod": True},
               "audio_vae": {"sample_rate": 16000, "mel_hop_length": 160}}
    assert version_preset(configs) == "ltx-2.3"
    assert (build_request({"prompt": "x"}, configs).steps, build_request({"prompt": "x"}, configs).guidance.stg_blocks) == (30, (28,))
    configs["transformer"]["cross_attn_mod"] = False
    assert version_preset(configs) == "ltx-2"
    assert (build_request({"prompt": "x"}, configs).steps, build_request({"prompt": "x"}, configs).guidance.stg_blocks) == (40, (29,))


def test_request_edges_and_the_steps_alias():
    """--image-crf takes 0..51 both ends included; a batch line's num_inference_steps is --steps."""
    from usp_infer.ltx2.request import LTX2Request, build_request, read_model_configs

    assert LTX2Request(prompt="x", image_crf=51).image_crf == 51 and LTX2Request(prompt="x", image_crf=0).image_crf == 0
    with pytest.raises(ValueError, match="--image-crf 52 must be in 0..51"):
        LTX2Request(prompt="x", image_crf=52)
    configs = read_model_configs(LTX2)
    assert build_request({"prompt": "x", "num_inference_steps": 3}, configs).steps == 3


def _folder_with(tmp_path: Path, component: str, file: str, change) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(LTX2, folder)
    path = folder / component / file
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return folder


def test_folder_checks_name_what_does_not_fit(tmp_path):
    """read_model_configs refuses a folder whose parts disagree, before any weights load."""
    from usp_infer.ltx2.request import read_model_configs

    folder = _folder_with(tmp_path, "vae", "config.json", lambda c: c.update(latent_channels=64))
    with pytest.raises(ValueError, match="configs disagree .*: vae latent_channels 64 vs transformer in_channels"):
        read_model_configs(folder)
    shutil.rmtree(folder)
    folder = _folder_with(tmp_path, ".", "model_index.json", lambda c: c.update(vocoder=["diffusers", "HifiGAN"]))
    with pytest.raises(ValueError, match="vocoder class 'HifiGAN' is not an LTX-2 vocoder"):
        read_model_configs(folder)


def test_family_comes_from_every_pipeline_class_it_runs(tmp_path):
    """model_index.json's _class_name picks the family, for the image-to-video pipelines' folders too; a file that
    is JSON but not an object is one line."""
    from usp_infer.families import family_of

    for found, family in (("LTXPipeline", "ltx-video"), ("LTXImageToVideoPipeline", "ltx-video"),
                          ("LTXConditionPipeline", "ltx-video"), ("LTX2Pipeline", "ltx-2"),
                          ("LTX2ImageToVideoPipeline", "ltx-2")):
        (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": found}))
        assert family_of(tmp_path).name == family, found
    (tmp_path / "model_index.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="model_index.json is not a JSON object"):
        family_of(tmp_path)


def test_bundled_tiny_models_are_named_from_anywhere(tmp_path, monkeypatch):
    """`--model ltx2-tiny` (and `info ltx2-tiny`) from a folder with no models/ in it: the package's copy; a
    folder of that name where the user is wins; a name that is neither says what exists."""
    monkeypatch.chdir(tmp_path)
    shown = cli("info", "ltx2-tiny", "--json")
    assert shown.exit_code == 0 and json.loads(shown.stdout)["family"] == "ltx-2"
    assert json.loads(shown.stdout)["model"] == str(LTX2)
    shutil.copytree(LTXV, tmp_path / "ltx2-tiny")  # the user's own folder, which happens to share the name
    assert json.loads(cli("info", "ltx2-tiny", "--json").stdout)["family"] == "ltx-video"
    missing = cli("generate", "--prompt", "x", "--model", "ltx3-tiny")
    assert missing.exit_code == 2 and "a bundled tiny model: ltx-tiny, ltx2-tiny" in error_line(missing.stderr)
