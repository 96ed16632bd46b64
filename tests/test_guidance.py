"""Guidance terms against hand-computed values, schedules, and presets."""

import pytest
import torch
from usp_infer.errors import UsageError

from usp_infer.guidance import PRESETS, GuidanceConfig, Guider, StepScales
from usp_infer.ltx_video.request import request_from_flags as build_request


def scales(cfg=1.0, stg=0.0, rescale=0.0, cfg_star=False, blocks=(0,)):
    return StepScales(cfg, stg, rescale, cfg_star, blocks)


def preds(seed=0, names=("cond", "uncond", "perturbed")):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(2, 5, 3, generator=g, dtype=torch.float64) for n in names}


def test_branches_follow_the_enabled_terms():
    assert scales().branches == ("cond",)
    assert scales(cfg=3.0).branches == ("uncond", "cond")
    assert scales(cfg=3.0, stg=1.0).branches == ("uncond", "cond", "perturbed")
    assert scales(stg=1.0, blocks=()).branches == ("cond",)  # STG with no blocks perturbs nothing


def test_cfg_matches_the_textbook_formula():
    p = preds()
    out = Guider(count=15).combine(p, scales(cfg=3.0))
    torch.testing.assert_close(out, p["uncond"] + 3.0 * (p["cond"] - p["uncond"]), rtol=1e-12, atol=1e-12)


def test_cfg_off_returns_cond_unchanged():
    p = preds()
    assert Guider(count=15).combine({"cond": p["cond"]}, scales()) is p["cond"]


def test_stg_zero_is_exactly_cfg_only():
    p = preds()
    cfg_only = Guider(count=15).combine({k: p[k] for k in ("cond", "uncond")}, scales(cfg=4.0, stg=0.0))
    with_stg0 = Guider(count=15).combine(p, scales(cfg=4.0, stg=0.0))
    assert torch.equal(cfg_only, with_stg0)


def test_stg_adds_scaled_difference():
    p = preds()
    out = Guider(count=15).combine(p, scales(cfg=3.0, stg=2.0))
    c, u, q = p["cond"], p["uncond"], p["perturbed"]
    torch.testing.assert_close(out, c + 2.0 * (c - u) + 2.0 * (c - q), rtol=1e-12, atol=1e-12)


def test_rescale_hand_computed():
    p = preds()
    out = Guider(count=15).combine(p, scales(cfg=3.0, stg=1.0, rescale=0.7))
    c, u, q = p["cond"], p["uncond"], p["perturbed"]
    raw = c + 2.0 * (c - u) + (c - q)
    factor = c.reshape(2, -1).std(dim=1) / raw.reshape(2, -1).std(dim=1)  # torch.std: unbiased, per sample
    expected = raw * (0.7 * factor + 0.3).view(2, 1, 1)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    # full rescale makes the guided std equal the conditional std, per sample
    full = Guider(count=15).combine(p, scales(cfg=3.0, stg=1.0, rescale=1.0))
    torch.testing.assert_close(full.reshape(2, -1).std(dim=1), c.reshape(2, -1).std(dim=1))


def test_cfg_star_scales_uncond_by_projection():
    p = preds(names=("cond", "uncond"))
    out = Guider(count=15).combine(p, scales(cfg=5.0, cfg_star=True))
    c, u = p["cond"], p["uncond"]
    alpha = (c * u).sum(dim=(1, 2)) / ((u * u).sum(dim=(1, 2)) + 1e-8)
    u2 = alpha.view(2, 1, 1) * u
    torch.testing.assert_close(out, c + 4.0 * (c - u2), rtol=1e-12, atol=1e-12)


def test_schedule_selection_follows_ltx_thresholds():
    g = GuidanceConfig(**{k: v for k, v in PRESETS["ltx-video-13b-0.9.8"].items() if k != "steps"})
    # LTX-Video: the first threshold <= sigma wins; below every threshold, the last interval.
    assert g.at(1.0).cfg == 1.0 and g.at(1.0).stg_blocks == ()
    assert g.at(0.998).cfg == 1.0 and g.at(0.998).stg_blocks == (11, 25, 35, 39)
    assert g.at(0.995).cfg == 6.0 and g.at(0.995).stg_blocks == (22, 35, 39)
    assert g.at(0.99).cfg == 8.0
    assert g.at(0.98).cfg == 6.0 and g.at(0.98).stg == 4.0
    assert g.at(0.95).cfg == 1.0 and g.at(0.95).stg == 2.0
    assert g.at(0.3).stg == 1.0 and g.at(0.3).rescale == 1.0
    assert g.at(0.3).branches == ("cond", "perturbed")
    # every field of an interval, and the preset's STG mode (LTX-Video's 0.9.8 configs: attention values)
    assert g.at(0.99) == StepScales(8.0, 4.0, 0.5, True, (28,))
    assert g.at(0.995) == StepScales(6.0, 4.0, 0.5, True, (22, 35, 39))
    assert PRESETS["ltx-video-13b-0.9.8"]["stg_mode"] == "values" and PRESETS["ltx-video-13b-0.9.8"]["steps"] == 30


def test_single_values_apply_at_every_step():
    g = GuidanceConfig(cfg=(2.5,), stg=(1.0,), rescale=(0.7,), stg_blocks=((3,),))
    assert g.at(1.0) == g.at(0.01) == StepScales(2.5, 1.0, 0.7, False, (3,))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(cfg=(float("nan"),)), "--guidance-scale nan"),
        (dict(stg=(-1.0,)), "--stg-scale -1.0"),
        (dict(rescale=(float("inf"),)), "--guidance-rescale inf"),
        (dict(cfg=(1.0, 2.0)), "has 2 values but --guidance-timesteps has 0"),
        (dict(stg_mode="bogus"), "--stg-mode 'bogus'"),
        (dict(cfg=(1.0, 2.0), timesteps=(0.5, 0.9)), "descending"),
    ],
)
def test_bad_guidance_is_rejected_with_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        GuidanceConfig(**kwargs)


def test_preset_then_flags_override():
    r = build_request({"prompt": "x", "preset": "ltx-video-2b"})
    assert r.steps == 40 and r.guidance.cfg == (3.0,) and r.guidance.stg == (1.0,) and r.guidance.rescale == (0.7,)
    assert r.guidance.stg_blocks == ((19,),)
    r = build_request({"prompt": "x", "preset": "ltx-video-2b", "stg_scale": "0", "steps": 7, "stg_blocks": "1,2"})
    assert r.steps == 7 and r.guidance.stg == (0.0,) and r.guidance.cfg == (3.0,) and r.guidance.stg_blocks == ((1, 2),)
    r = build_request({"prompt": "x", "preset": "ltx-video-13b-0.9.8"})
    assert r.steps == 30 and r.guidance.cfg_star and len(r.guidance.timesteps) == 7
    with pytest.raises(UsageError, match="--preset 'nope' is unknown"):
        build_request({"prompt": "x", "preset": "nope"})


def test_an_empty_schedule_clears_the_presets_and_steps_has_its_diffusers_name():
    """--guidance-timesteps "" (or a batch line's "") drops a preset's schedule, for single values in its place;
    a batch line's num_inference_steps (diffusers' name) is --steps."""
    r = build_request({"prompt": "x", "preset": "ltx-video-13b-0.9.8", "guidance_timesteps": "", "guidance_scale": "3",
                       "stg_scale": "1", "guidance_rescale": "0.7", "stg_blocks": "19"})
    assert r.guidance.timesteps == () and r.guidance.at(1.0).cfg == 3.0 and r.steps == 30
    assert build_request({"prompt": "x", "num_inference_steps": 7}).steps == 7
    assert build_request({"prompt": "x", "preset": "ltx-video-13b-0.9.8", "cfg_star": False}).guidance.cfg_star is False


def test_a_lines_image_path_expands_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert build_request({"prompt": "x", "image": "~/first.png"}).image == str(tmp_path / "first.png")


def test_stg_blocks_take_an_empty_interval_and_refuse_a_negative_block():
    """The 13B preset's sets written as a flag (its first interval perturbs nothing), and what is refused."""
    from usp_infer.request import parse_blocks

    assert parse_blocks(";11,25,35,39;28") == ((), (11, 25, 35, 39), (28,))
    assert parse_blocks("11, 25,") == ((11, 25),)
    r = build_request({"prompt": "x", "stg_scale": "0,1", "guidance_timesteps": "1.0,0.5", "stg_blocks": ";1"})
    assert r.guidance.stg_blocks == ((), (1,)) and r.guidance.at(1.0).branches == ("uncond", "cond")
    with pytest.raises(UsageError, match="--stg-blocks '11,-1' has a negative block index"):
        parse_blocks("11,-1")
    with pytest.raises(UsageError, match="--stg-blocks '11,x' must be block indices"):
        parse_blocks("11,x")


def test_ltx2_branches_run_for_a_term_either_modality_turns_on():
    """LTX-2: a branch runs when the video's or the audio's scale makes its term count; STG needs blocks."""
    from usp_infer.ltx2.request import LTX2Guidance, ModalityGuidance

    off = ModalityGuidance()
    assert LTX2Guidance(off, off, (1,)).branches() == ("cond",)
    assert LTX2Guidance(ModalityGuidance(cfg=3.0), off, (1,)).branches() == ("cond", "uncond")
    assert LTX2Guidance(off, ModalityGuidance(cfg=3.0), (1,)).branches() == ("cond", "uncond")
    assert LTX2Guidance(off, ModalityGuidance(stg=1.0), (1,)).branches() == ("cond", "perturbed")
    assert LTX2Guidance(ModalityGuidance(stg=1.0), off, ()).branches() == ("cond",)  # no block to perturb
    assert LTX2Guidance(off, ModalityGuidance(modality=2.0), (1,)).branches() == ("cond", "isolated")
    assert LTX2Guidance(ModalityGuidance(modality=2.0), off, (1,)).branches() == ("cond", "isolated")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_ltx2_guidance_refuses_what_is_not_a_finite_scale(value):
    from usp_infer.ltx2.request import ModalityGuidance

    for name in ("cfg", "stg", "modality", "rescale"):
        with pytest.raises(ValueError, match=f"guidance {name} {value} is invalid"):
            ModalityGuidance(**{name: value})


def test_rescale_with_cfg_only_follows_diffusers():
    """Decision: rescale applies whenever --guidance-rescale is not 0, with or without STG, as diffusers' LTX
    pipelines apply guidance_rescale (LTX-Video's own pipeline rescales only inside its STG branch; a
    preset that wants that gives rescale 0 where STG is 0). Reference: diffusers' rescale_noise_cfg and the
    formula of Lin et al. 2023 (sec. 3.4) written out here, per sample, unbiased std as torch.std."""
    from diffusers.pipelines.ltx.pipeline_ltx import rescale_noise_cfg

    p = preds(seed=3, names=("cond", "uncond"))
    c, u = p["cond"], p["uncond"]
    for r in (0.3, 0.7, 1.0):
        out = Guider(count=15).combine(p, scales(cfg=4.0, rescale=r))
        guided = u + 4.0 * (c - u)
        std = lambda x: x.std(dim=(1, 2), keepdim=True)  # noqa: E731
        by_formula = r * guided * std(c) / std(guided) + (1 - r) * guided
        torch.testing.assert_close(out, by_formula, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(out, rescale_noise_cfg(guided, c, guidance_rescale=r), rtol=1e-12, atol=1e-12)
    # and it matters: a rescale skipped without STG would give the plain CFG result
    assert (Guider(count=15).combine(p, scales(cfg=4.0, rescale=0.7)) - (u + 4.0 * (c - u))).abs().max() > 1e-2
