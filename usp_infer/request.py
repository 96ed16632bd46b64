"""Flags and batch-line keys -> one validated request of the model's family: the parsers every family's
request module uses, and `build_for`, which hands the flags to the folder's family."""

from __future__ import annotations

from .errors import UsageError
from .families import ALL_FLAGS, FAMILIES, Family

# --- option parsing -----------------------------------------------------------------------------


def parse_floats(flag: str, text: str | float | int | list) -> tuple[float, ...]:
    """'3' or '1,1,6,8' (or a JSON number/list from a batch line) -> (floats)."""
    items = text if isinstance(text, list) else str(text).split(",")
    try:
        return tuple(float(x) for x in items)
    except ValueError:
        raise UsageError(f"{flag} {text!r} is not a number or a comma-separated list of numbers") from None


def parse_blocks(text: str | int | list) -> tuple[tuple[int, ...], ...]:
    """'19' or '11,25,35' (one set) or '11,25;22,35;28' (one set per guidance interval)."""
    if isinstance(text, int):
        return ((text,),)
    if isinstance(text, list):
        return (tuple(int(b) for b in text),)
    try:
        sets = tuple(tuple(int(b) for b in part.split(",") if b.strip()) for part in str(text).split(";"))
    except ValueError:
        raise UsageError(f"--stg-blocks {text!r} must be block indices like 19 or 11,25 or 11,25;22,35") from None
    if any(b < 0 for blocks in sets for b in blocks):
        raise UsageError(f"--stg-blocks {text!r} has a negative block index")
    return sets


ITEM_KEYS = ALL_FLAGS | {"output"}  # what a batch line may hold


def build_for(options: dict, family: Family, configs: dict, model: object) -> object:
    """Flags -> the request of `family`'s pipeline; a flag only another family takes is refused by name."""
    given = {k for k, v in options.items() if v is not None}
    foreign = family.foreign_flag(given)
    if foreign is not None:
        # a batch line's "audio" is a sound file (--audio) or false (--no-audio)
        audio = "--audio" if isinstance(options.get("audio"), str) else "--no-audio"
        named = {"audio": audio, "no_audio": "--no-audio", "audio_input": "--audio", "conditions": "--condition"}
        flag = named.get(foreign, "--" + foreign.replace("_", "-"))
        owner = next(f.name for f in FAMILIES if foreign in f.flags)
        raise UsageError(f"{flag} is a flag of {owner} models, but {model} is an {family.name} model; "
                         f"drop the flag or pass an {owner} folder")
    return family.requests().build_request(options, configs)
