"""What each key of a batch line takes, checked on every line before anything loads (no torch).

A flag reaches the request typed by the command line; a JSON line can hold anything, and a value of the
wrong kind would pass the request's checks (a float of steps compares fine) and fail late, inside torch.
Every key a line may hold (request.ITEM_KEYS) has a kind here; a test holds the two sets equal.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _numbers(v: object) -> bool:  # one value, a list, or the flag's text form "1,1,6,8"
    return _number(v) or isinstance(v, str) or isinstance(v, list) and all(_number(x) for x in v)


def _whole(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class Kind:
    accepts: Callable[[object], bool]
    takes: str  # what the message says the key takes


WHOLE = Kind(_whole, "a whole number")
NUMBER = Kind(_number, "a number")
NUMBERS = Kind(_numbers, "a number, a list of numbers or a string like \"1,1,6\"")
BLOCKS = Kind(lambda v: _whole(v) or isinstance(v, str) or isinstance(v, list) and all(_whole(x) for x in v),
              "a block index, a list of them or a string like \"11,25\"")
TEXT = Kind(lambda v: isinstance(v, str), "a string")
SWITCH = Kind(lambda v: isinstance(v, bool), "true or false")
TEXTS = Kind(lambda v: isinstance(v, str) or isinstance(v, list) and all(isinstance(x, str) for x in v),
             "a string or a list of strings")
CONDITIONS = Kind(lambda v: isinstance(v, list) and all(isinstance(x, (dict, str)) for x in v),
                  "a list of {\"path\": ..., \"frame\": ..., \"strength\": ...} objects")

KINDS: dict[str, Kind] = {
    **dict.fromkeys(("height", "width", "num_frames", "steps", "num_inference_steps", "seed", "max_sequence_length",
                     "image_crf", "extend_frames"), WHOLE),
    **dict.fromkeys(("fps", "image_strength", "decode_timestep", "decode_noise_scale"), NUMBER),
    **dict.fromkeys(("guidance_scale", "stg_scale", "guidance_rescale", "guidance_timesteps", "modality_scale",
                     "audio_guidance_scale", "audio_stg_scale", "audio_modality_scale", "audio_guidance_rescale",
                     "sigmas", "stage2_sigmas"), NUMBERS),
    "stg_blocks": BLOCKS,
    **dict.fromkeys(("prompt", "negative_prompt", "image", "preset", "branches", "stg_mode", "output", "audio_input",
                     "extend", "upsampler"), TEXT),
    **dict.fromkeys(("cfg_star", "no_audio", "two_stage"), SWITCH),
    **dict.fromkeys(("lora", "stage2_lora", "condition"), TEXTS),
    "conditions": CONDITIONS,
    # LTX-2: a sound file to follow (audio-to-video), or false for a silent mp4
    "audio": Kind(lambda v: isinstance(v, (bool, str)), "a sound file's path, or true or false"),
}


def wrong_kinds(entry: dict) -> list[str]:
    """One message per key whose value is of the wrong kind: the key, the value, and what it takes. null is
    "not given", as an absent key (the request takes its default)."""
    return [f"\"{key}\": {json.dumps(value)} is not {KINDS[key].takes}" for key, value in entry.items()
            if key in KINDS and value is not None and not KINDS[key].accepts(value)]
