"""The command line: generate, batch, info, make-tiny, quantize, decode, bench.

Every flag is parsed into frozen config objects here, at the edge; the library below never reads argv
or the environment. Usage errors exit 2, runtime failures 1, Ctrl-C 130, each with one line on stderr
(a traceback only with --debug). Only the main rank prints progress and writes files.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from .batch import Item, read_batch
from .config import QUANTIZE_METHODS, ParallelConfig, Session, pick_device
from .errors import UsageError, one_line
from .guidance import PRESETS
from .request import build_for
from .bench_cli import bench_command
from .runner import check_weights, fail, run_session


def _models_dir() -> Path:
    """The tiny models: package data in an installed copy (usp_infer/models/), the checkout's models/ otherwise."""
    here = Path(__file__).resolve().parent
    return here / "models" if (here / "models").is_dir() else here.parent / "models"


DEFAULT_MODEL = _models_dir() / "ltx-tiny"


def model_path(given: Path | str) -> Path:
    """A model folder as given, or, where no such folder exists, the bundled tiny model of that name
    (`--model ltx2-tiny` from any directory: the package carries models/*-tiny)."""
    path = Path(given).expanduser()
    bundled = _models_dir() / str(given)
    if not path.exists() and path.name == str(given) and bundled.is_dir():
        return bundled
    return path


def _help(summary: str, *examples: str) -> str:
    """A command's help text. Click rewraps paragraphs; a paragraph opened by a \\b line stays as written."""
    return summary + "\n\nExamples:\n\n" + "\n\n".join("\b\n" + example for example in examples)


app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    no_args_is_help=True,
    help=_help(
        "Generate LTX-style videos on one or many GPUs, the sequence sharded with USP "
        "(Ulysses all-to-all + ring attention). Run a command with --help for its options.",
        "  # one small video on CPU with the embedded tiny model\n"
        "  usp-infer generate --prompt 'a red fox in snow' --height 64 --width 96 \\\n"
        "      --num-frames 9 --steps 4 --output fox.mp4",
        "  # the same on 4 GPUs (Ulysses 4)\n"
        "  torchrun --nproc_per_node 4 -m usp_infer generate --model models/ltx-video \\\n"
        "      --prompt 'a red fox in snow' --output fox.mp4",
        "  # many prompts, model loaded once; rerun with --resume after an interruption\n"
        "  usp-infer batch prompts.jsonl --output-dir outputs --resume",
        "  # what a checkpoint is, and the layouts that fit 4 GPUs\n"
        "  usp-infer info models/ltx-tiny --gpus 4",
    ),
)



def _print_version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"usp-infer {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    pass


# Options generate and batch share, each declared once and listed by name in both signatures. Request
# options default to None = "not given", so a preset (and, in batch, a line's own value) can fill them.
_opt = typer.Option
NegativePrompt = Annotated[Optional[str], _opt(help="What to steer away from (CFG's unconditional branch).")]
Height = Annotated[Optional[int], _opt(help="Pixels, a multiple of 32 [default: 480; LTX-2: 512].")]
Width = Annotated[Optional[int], _opt(help="Pixels, a multiple of 32 [default: 704; LTX-2: 768].")]
NumFrames = Annotated[Optional[int], _opt(help="Frames, of the form 8k+1 [default: 121].")]
Fps = Annotated[Optional[float], _opt(help="Frame rate of the mp4 and of the RoPE time scale [default: 25; LTX-2: 24].")]
Steps = Annotated[Optional[int], _opt("--steps", "--num-inference-steps", help="Denoising steps [default: 40, or the preset's or recipe's].")]
Seed = Annotated[Optional[int], _opt(help="Random seed; the same seed gives the same video on any layout [default: 0].")]
GuidanceScale = Annotated[Optional[str], _opt(help="CFG scale, or a per-interval list '1,1,6,8' [default: 3; LTX-2: the model's recipe].")]
StgScale = Annotated[Optional[str], _opt(help="Spatio-temporal guidance scale (or list) [default: 0 = off].")]
StgBlocks = Annotated[Optional[str], _opt(help="Blocks STG perturbs: '19', '11,25', or per interval '11,25;22;28' [default: 19; LTX-2: the model's recipe].")]
StgMode = Annotated[Optional[str], _opt(help="values | skip | residual | block [default: values].")]
GuidanceRescale = Annotated[Optional[str], _opt(help="Rescale r in [0,1] (or list) [default: 0 = off].")]
CfgStar = Annotated[Optional[bool], _opt("--cfg-star/--no-cfg-star", help="CFG-star: rescale the uncond prediction.")]
GuidanceTimesteps = Annotated[Optional[str], _opt(help="Descending sigma thresholds for per-interval scale lists.")]
Preset = Annotated[Optional[str], _opt(help=f"Named defaults: {', '.join(PRESETS)}; LTX-2: ltx-2, ltx-2.3, ltx-2-distilled, ltx-2.3-distilled.")]
ImageOpt = Annotated[Optional[str], _opt("--image", help="PNG/JPEG conditioning the first frame (image-to-video).")]
ImageStrength = Annotated[Optional[float], _opt(help="How firmly the image holds, in [0,1] [default: 1].")]
MaxSequenceLength = Annotated[Optional[int], _opt(help="Text tokens (T5, Gemma) [default: 128; LTX-2: 1024].")]
DecodeTimestep = Annotated[Optional[float], _opt(help="VAE decode timestep [default: 0.05].")]
DecodeNoiseScale = Annotated[Optional[float], _opt(help="VAE decode noise scale [default: 0.025].")]
Branches = Annotated[Optional[str], _opt(help="batched (one forward) | sequential (less memory) [default: batched].")]
# LTX-2 only: per-modality guidance (the plain flags above are the video's), image re-compression, audio decode.
ModalityScale = Annotated[Optional[str], _opt(help="LTX-2: modality-isolation guidance scale for the video [default: the model's recipe].")]
AudioGuidanceScale = Annotated[Optional[str], _opt(help="LTX-2: CFG scale for the audio.")]
AudioStgScale = Annotated[Optional[str], _opt(help="LTX-2: STG scale for the audio.")]
AudioModalityScale = Annotated[Optional[str], _opt(help="LTX-2: modality-isolation scale for the audio.")]
AudioGuidanceRescale = Annotated[Optional[str], _opt(help="LTX-2: rescale r for the audio.")]
ImageCrf = Annotated[Optional[int], _opt(help="LTX-2: H.264 CRF the image is re-compressed with before encoding, 0..51; 0 = off [default: 33].")]
NoAudio = Annotated[Optional[bool], _opt("--no-audio", help="LTX-2: do not decode the audio track; the mp4 is silent.")]
# LTX-2 conditioning: frames anywhere, continuing a clip, a given sound.
ConditionOpt = Annotated[Optional[list[str]], _opt("--condition", metavar="PATH@FRAME[:STRENGTH]", help="LTX-2: PATH@FRAME[:STRENGTH], repeatable: an "
                         "image or a clip held at pixel frame FRAME (-1 = the last), STRENGTH in [0,1] [default: 1].")]
AudioInput = Annotated[Optional[str], _opt("--audio", metavar="PATH", help="LTX-2: audio-to-video: a sound file (or a video's track) "
                       "the video follows; the output carries it.")]
Extend = Annotated[Optional[str], _opt("--extend", metavar="CLIP", help="LTX-2: continue this clip: the output is the clip, then "
                   "the new frames.")]
ExtendFrames = Annotated[Optional[int], _opt(help="LTX-2: frames of the --extend clip that open the new segment, "
                         "8k+1 [default: 17].")]
# LTX-2 recipes (ltx2/recipes.py): sigma lists, two stages with the latent upsampler, LoRAs.
Sigmas = Annotated[Optional[str], _opt(help="LTX-2: run this sigma list as given, e.g. 1,0.99375,...,0.421875 (the final 0 implied); sets the steps.")]
TwoStage = Annotated[Optional[bool], _opt("--two-stage", help="LTX-2: stage 1 at half --height/--width, the x2 latent upsampler, a short stage 2 at full size.")]
Upsampler = Annotated[Optional[str], _opt(help="LTX-2 --two-stage: the LTX2LatentUpsamplerModel folder [default: MODEL/latent_upsampler].")]
Stage2Sigmas = Annotated[Optional[str], _opt(help="LTX-2 --two-stage: stage 2's sigmas; it re-noises to the first [default: 0.909375,0.725,0.421875].")]
Lora = Annotated[Optional[list[str]], _opt("--lora", metavar="PATH[:STRENGTH]", help="LTX-2: PATH[:STRENGTH] of a LoRA (Lightricks or diffusers keys), fused for both stages; repeatable.")]
Stage2Lora = Annotated[Optional[list[str]], _opt("--stage2-lora", metavar="PATH[:STRENGTH]", help="LTX-2 --two-stage: PATH[:STRENGTH] of a LoRA for stage 2 only (the distilled LoRA); repeatable.")]
Model = Annotated[Path, _opt(help="Diffusers-format LTX folder, or a bundled tiny model by name (ltx-tiny, "
                             "ltx2-tiny) from any directory; default: ltx-tiny.")]
UlyssesDegree = Annotated[Optional[int], _opt(help="Ulysses (all-to-all) degree [default: world / (cfg x ring)].")]
RingDegree = Annotated[Optional[int], _opt(help="Ring-attention degree [default: 1].")]
CfgParallel = Annotated[Optional[int], _opt("--cfg-parallel", "--cfg-degree", help="Spread guidance branches over this many rank groups [default: 1].")]
LayoutOpt = Annotated[str, _opt("--layout", help="auto: the (cfg, ring, ulysses) layout the cost model predicts fastest "
                                "under torchrun (rank 0 prints it) | CxRxU, e.g. 2x1x2. Degree flags, when given, win.")]
A2AModeOpt = Annotated[str, _opt("--a2a-mode", help="direct (all_to_all_single into a preallocated buffer) | functional.")]
DistTimeout = Annotated[float, _opt(help="Seconds a collective may wait before the run fails.")]
Compile = Annotated[bool, _opt("--compile", help="torch.compile the transformer blocks: faster steps after a "
                               "one-time compilation in the first step (worth it for long runs and batches).")]
CudaGraphs = Annotated[bool, _opt("--cuda-graphs", help="Replay the transformer's block loop as a CUDA graph "
                                  "(one launch a step instead of thousands: for hosts that cannot keep the GPU busy). "
                                  "One GPU or cfg-parallel; not where the sequence is split (Ulysses, ring); stages of "
                                  "fewer than 10 steps run plain.")]
Device = Annotated[str, _opt(help="auto | cpu | cuda.")]
Quantize = Annotated[str, _opt("--quantize", help="none | fp8: the transformer blocks' linear layers in float8 "
                               "e4m3 (about half the weight memory and faster steps; CUDA needs compute capability "
                               "8.9+). A folder written by `usp-infer quantize` runs in fp8 without it.")]
VaeTiling = Annotated[bool, _opt("--vae-tiling", help="Decode in tiles (less memory). Chosen by itself when the "
                                 "estimated full decode would not fit in free memory.")]
Dtype = Annotated[Optional[str], _opt(help="float32 | bfloat16 | float16 [default: bfloat16 on CUDA, float32 on CPU].")]
Overwrite = Annotated[bool, _opt(help="Replace existing outputs.")]
Quiet = Annotated[bool, _opt(help="No progress bar or messages (errors still go to stderr).")]
JsonSummary = Annotated[bool, _opt("--json", help="Print a JSON summary (outputs, sidecars, failures) to stdout; nothing else goes there.")]
Debug = Annotated[bool, _opt(help="Show full tracebacks.")]

SESSION_NAMES = ("model", "layout", "ulysses_degree", "ring_degree", "cfg_parallel", "a2a_mode", "dist_timeout",
                 "compile", "cuda_graphs", "quantize", "vae_tiling", "device", "dtype", "overwrite", "quiet", "json_summary", "debug")


def _warn_empty_prompts(items: list[Item], s: Session) -> None:
    """An empty prompt is legal (the video follows no text), but rarely meant: say so, once per item."""
    from .parallel.dist import env_rank

    for item in items:
        if not item.request.prompt.strip() and not s.quiet and env_rank() == 0:
            where = f"{item.where}: " if item.where else ""
            typer.echo(f"warning: {where}the prompt is empty; the video will follow no text", err=True)


def _session_from(flags: dict, **extra) -> Session:
    """Pop the session flags out of `flags` (a command's locals) and validate them."""
    f = {name: flags.pop(name) for name in SESSION_NAMES}
    if f["device"] not in ("auto", "cpu", "cuda"):
        fail(2, f"--device {f['device']!r} is unknown; use auto, cpu or cuda")
    if f["dtype"] is not None and f["dtype"] not in ("float32", "bfloat16", "float16"):
        fail(2, f"--dtype {f['dtype']!r} is unknown; use float32, bfloat16 or float16")
    if f["quantize"] not in QUANTIZE_METHODS:
        fail(2, f"--quantize {f['quantize']!r} is unknown; use {' or '.join(QUANTIZE_METHODS)}")
    degrees = (f["cfg_parallel"], f["ring_degree"], f["ulysses_degree"])
    auto = f["layout"] == "auto" and all(d is None for d in degrees)
    if f["layout"] != "auto":
        try:
            named = tuple(int(n) for n in f["layout"].lower().split("x"))
        except ValueError:
            named = ()
        if len(named) != 3:
            fail(2, f"--layout {f['layout']!r} is neither auto nor CxRxU (cfg x ring x ulysses, e.g. 2x1x2)")
        if any(d is not None for d in degrees):
            fail(2, f"--layout {f['layout']} and degree flags both name the layout; pass one of them")
        degrees = named
    try:
        parallel = ParallelConfig(
            cfg=1 if degrees[0] is None else degrees[0],
            ring=1 if degrees[1] is None else degrees[1],
            ulysses=1 if degrees[2] is None else degrees[2],
            a2a_mode=f["a2a_mode"], timeout_s=f["dist_timeout"], auto=auto,
        )
    except ValueError as e:
        fail(2, str(e))
    return Session(
        model=model_path(f["model"]), device=f["device"], dtype=f["dtype"], parallel=parallel, overwrite=f["overwrite"],
        quiet=f["quiet"], json_summary=f["json_summary"], debug=f["debug"], compile=f["compile"],
        cuda_graphs=f["cuda_graphs"], vae_tiling=f["vae_tiling"], quantize=f["quantize"], **extra,
    )


def _request_builder(s: Session):
    """Flags -> a request of the model folder's family (families.py); UsageError for a bad folder or flag."""
    from .families import resolve

    try:
        family, configs = resolve(s.model)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return lambda options: build_for(options, family, configs, s.model)


@app.command(
    help=_help(
        "Generate one video. Exit codes: 0 done, 1 runtime failure, 2 bad input (nothing written), 130 interrupted.",
        "  # text to video, tiny model on CPU\n"
        "  usp-infer generate --prompt 'a red fox' --height 64 --width 96 --num-frames 9 \\\n"
        "      --steps 4 --output fox.mp4",
        "  # image to video with LTX-Video 2B's guidance preset\n"
        "  usp-infer generate --prompt 'waves' --image beach.png --preset ltx-video-2b \\\n"
        "      --model models/ltx-video -o waves.mp4",
        "  # 4 processes, Ulysses 2 x ring 2, frames and latents as .npz\n"
        "  torchrun --nproc_per_node 4 -m usp_infer generate --prompt 'a red fox' \\\n"
        "      --ulysses-degree 2 --ring-degree 2 --a2a-mode functional -o fox.npz",
    ),
)
def generate(
    prompt: Annotated[str, _opt(help="What the video shows.")],
    output: Annotated[Path, _opt("--output", "-o", help=".mp4, .npz, a .png pattern, or a directory of PNG frames.")] = Path("output.mp4"),
    negative_prompt: NegativePrompt = None,
    height: Height = None,
    width: Width = None,
    num_frames: NumFrames = None,
    fps: Fps = None,
    steps: Steps = None,
    seed: Seed = None,
    guidance_scale: GuidanceScale = None,
    stg_scale: StgScale = None,
    stg_blocks: StgBlocks = None,
    stg_mode: StgMode = None,
    guidance_rescale: GuidanceRescale = None,
    cfg_star: CfgStar = None,
    guidance_timesteps: GuidanceTimesteps = None,
    preset: Preset = None,
    image: ImageOpt = None,
    image_strength: ImageStrength = None,
    max_sequence_length: MaxSequenceLength = None,
    decode_timestep: DecodeTimestep = None,
    decode_noise_scale: DecodeNoiseScale = None,
    branches: Branches = None,
    modality_scale: ModalityScale = None,
    audio_guidance_scale: AudioGuidanceScale = None,
    audio_stg_scale: AudioStgScale = None,
    audio_modality_scale: AudioModalityScale = None,
    audio_guidance_rescale: AudioGuidanceRescale = None,
    image_crf: ImageCrf = None,
    no_audio: NoAudio = None,
    audio_input: AudioInput = None,
    condition: ConditionOpt = None,
    extend: Extend = None,
    extend_frames: ExtendFrames = None,
    sigmas: Sigmas = None,
    two_stage: TwoStage = None,
    upsampler: Upsampler = None,
    stage2_sigmas: Stage2Sigmas = None,
    lora: Lora = None,
    stage2_lora: Stage2Lora = None,
    model: Model = DEFAULT_MODEL,
    ulysses_degree: UlyssesDegree = None,
    ring_degree: RingDegree = None,
    cfg_parallel: CfgParallel = None,
    layout: LayoutOpt = "auto",
    a2a_mode: A2AModeOpt = "direct",
    dist_timeout: DistTimeout = 600.0,
    compile: Compile = False,
    cuda_graphs: CudaGraphs = False,
    quantize: Quantize = "none",
    vae_tiling: VaeTiling = False,
    device: Device = "auto",
    dtype: Dtype = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    json_summary: JsonSummary = False,
    debug: Debug = False,
) -> None:
    flags = {k: v for k, v in locals().items() if k not in ("prompt", "output")}
    s = _session_from(flags)
    try:
        request = _request_builder(s)({"prompt": prompt, **flags})
    except UsageError as e:
        fail(2, str(e))
    items = [Item(0, request, output.expanduser())]
    _warn_empty_prompts(items, s)
    run_session(items, s)


@app.command(
    help=_help(
        "Generate many videos from a JSON Lines file, loading the model once.\n\n"
        "Each line is an object with \"prompt\" and optionally \"negative_prompt\", \"image\", \"seed\", \"output\" "
        "and any generate option (snake_case, e.g. \"guidance_scale\", \"steps\"); flags give the shared values. "
        "An item without \"output\" goes to OUTPUT_DIR/<index>-<prompt slug>-s<seed>.mp4; relative paths "
        "(\"image\", \"output\", conditions' \"path\") are taken from the current directory. LTX-2 lines may "
        "hold \"conditions\": [{\"path\": ..., \"frame\": ..., \"strength\": ...}], \"extend\", \"extend_frames\" and "
        "\"audio\" (a sound file; false: no audio). "
        "At the end a line says how many items ran, were skipped and failed.",
        "  # prompts.jsonl:\n"
        '  {"prompt": "a red fox in snow", "seed": 1}\n'
        '  {"prompt": "waves at dusk", "image": "beach.png", "steps": 8, "output": "waves.mp4"}',
        "  usp-infer batch prompts.jsonl --output-dir outputs --height 64 --width 96 \\\n"
        "      --num-frames 9 --steps 4",
        "  # after an interruption (even kill -9): finish the rest, keep what is done\n"
        "  usp-infer batch prompts.jsonl --output-dir outputs --height 64 --width 96 \\\n"
        "      --num-frames 9 --steps 4 --resume --keep-going",
    ),
)
def batch(
    file: Annotated[Path, typer.Argument(help="JSON Lines file, one generation per line.")],
    output_dir: Annotated[Path, _opt(help="Where items without an 'output' go.")] = Path("outputs"),
    resume: Annotated[bool, _opt(help="Skip items whose output and sidecar already exist (made with the same settings); with --overwrite, redo the rest.")] = False,
    keep_going: Annotated[bool, _opt(help="Continue past a failed item; exit 1 at the end if any failed.")] = False,
    negative_prompt: NegativePrompt = None,
    height: Height = None,
    width: Width = None,
    num_frames: NumFrames = None,
    fps: Fps = None,
    steps: Steps = None,
    seed: Seed = None,
    guidance_scale: GuidanceScale = None,
    stg_scale: StgScale = None,
    stg_blocks: StgBlocks = None,
    stg_mode: StgMode = None,
    guidance_rescale: GuidanceRescale = None,
    cfg_star: CfgStar = None,
    guidance_timesteps: GuidanceTimesteps = None,
    preset: Preset = None,
    image: ImageOpt = None,
    image_strength: ImageStrength = None,
    max_sequence_length: MaxSequenceLength = None,
    decode_timestep: DecodeTimestep = None,
    decode_noise_scale: DecodeNoiseScale = None,
    branches: Branches = None,
    modality_scale: ModalityScale = None,
    audio_guidance_scale: AudioGuidanceScale = None,
    audio_stg_scale: AudioStgScale = None,
    audio_modality_scale: AudioModalityScale = None,
    audio_guidance_rescale: AudioGuidanceRescale = None,
    image_crf: ImageCrf = None,
    no_audio: NoAudio = None,
    audio_input: AudioInput = None,
    condition: ConditionOpt = None,
    extend: Extend = None,
    extend_frames: ExtendFrames = None,
    sigmas: Sigmas = None,
    two_stage: TwoStage = None,
    upsampler: Upsampler = None,
    stage2_sigmas: Stage2Sigmas = None,
    lora: Lora = None,
    stage2_lora: Stage2Lora = None,
    model: Model = DEFAULT_MODEL,
    ulysses_degree: UlyssesDegree = None,
    ring_degree: RingDegree = None,
    cfg_parallel: CfgParallel = None,
    layout: LayoutOpt = "auto",
    a2a_mode: A2AModeOpt = "direct",
    dist_timeout: DistTimeout = 600.0,
    compile: Compile = False,
    cuda_graphs: CudaGraphs = False,
    quantize: Quantize = "none",
    vae_tiling: VaeTiling = False,
    device: Device = "auto",
    dtype: Dtype = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    json_summary: JsonSummary = False,
    debug: Debug = False,
) -> None:
    flags = {k: v for k, v in locals().items() if k not in ("file", "output_dir", "resume", "keep_going")}
    s = _session_from(flags, resume=resume, keep_going=keep_going, batch=True)
    try:
        items = read_batch(file.expanduser(), flags, output_dir.expanduser(), _request_builder(s))
    except UsageError as e:
        fail(2, str(e))
    _warn_empty_prompts(items, s)
    run_session(items, s)


@app.command("make-tiny", help=_help(
    "Write a deterministic tiny random-weight pipeline folder (diffusers layout, real classes).",
    "  usp-infer make-tiny /tmp/ltx-tiny --seed 1",
    "  # the LTX-2.3-style audio+video model (gates, text modulation, perturbed attention)\n"
    "  usp-infer make-tiny --family ltx2 /tmp/ltx2-tiny",
))
def make_tiny(
    directory: Annotated[Path, typer.Argument(help="Folder to create.")],
    seed: Annotated[int, _opt(help="Weight seed.")] = 0,
    family: Annotated[str, _opt(help="ltx-video | ltx2 (LTX-2.3 style) | ltx2.0 (LTX-2.0 style).")] = "ltx-video",
) -> None:
    directory = directory.expanduser()
    makers = {"ltx-video": ("ltx_video.tiny", "make_tiny", {}), "ltx2": ("ltx2.tiny", "make_tiny_ltx2", {"version": "2.3"}),
              "ltx2.0": ("ltx2.tiny", "make_tiny_ltx2", {"version": "2.0"})}
    if family not in makers:
        fail(2, f"--family {family!r} is unknown; use one of {', '.join(makers)}")
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        fail(2, f"{directory} exists and is not an empty directory; remove it or pick another path")
    import importlib

    module, name, kwargs = makers[family]
    try:
        getattr(importlib.import_module(f"usp_infer.{module}"), name)(directory, seed=seed, **kwargs)
    except OSError as e:
        fail(1, f"cannot write {directory}: {e.strerror or e}")
    typer.echo(f"wrote {directory}", err=True)


@app.command(help=_help(
    "Write a copy of a model folder whose transformer block linears are float8 e4m3 with one scale per output "
    "channel: generate then reads about half the transformer's bytes and runs as with --quantize fp8 (the same "
    "weights, bit for bit). The other components are hard-linked (copied across filesystems).\n\n"
    "--calibrate FILE also stores a static input scale per layer, measured on the generations of FILE (a batch "
    "file: prompts, sizes, recipe, images), run here in one process with the weights already in float8: later "
    "steps skip each input's row reduction (faster, bench/NOTES.md). Calibrate with the recipe and kind of input "
    "you will generate; a layer those generations never reach keeps per-row scales.",
    "  usp-infer quantize models/ltx-2.3 models/ltx-2.3-fp8",
    "  usp-infer generate --model models/ltx-2.3-fp8 --prompt 'a red fox' -o fox.mp4",
    "  # static input scales from two short generations of the distilled recipe\n"
    "  usp-infer quantize models/ltx-2.3 models/ltx-2.3-fp8-static --calibrate calib.jsonl",
))
def quantize(
    model: Annotated[Path, typer.Argument(help="Diffusers-format LTX folder, or a bundled tiny model by name.")],
    output: Annotated[Path, typer.Argument(help="Folder to create (absent, or an empty directory).")],
    calibrate: Annotated[Optional[Path], _opt(help="A batch file (JSON Lines, as `batch` reads) whose generations "
                                                   "set static input scales.")] = None,
    dtype: Annotated[str, _opt(help="The dtype generate will run in: weights are rounded to it first (and "
                                    "calibration runs in it).")] = "bfloat16",
    device: Annotated[str, _opt(help="auto | cpu | cuda: where weights are quantized and calibration runs.")] = "auto",
    quiet: Quiet = False,
) -> None:
    from .families import resolve

    model, output = model_path(model), output.expanduser()
    try:
        family, _ = resolve(model)
    except ValueError as e:
        fail(2, str(e).replace("--model ", "MODEL ", 1))  # the folder is quantize's first argument, not a flag
    if dtype not in ("float32", "bfloat16", "float16"):
        fail(2, f"--dtype {dtype!r} is unknown; use float32, bfloat16 or float16")
    if device not in ("auto", "cpu", "cuda"):
        fail(2, f"--device {device!r} is unknown; use auto, cpu or cuda")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        fail(2, f"{output} exists and is not an empty directory; remove it or pick another path")
    if json.loads((model / "transformer" / "config.json").read_text()).get("_quantization"):
        fail(2, f"{model} is already quantized; it runs in fp8 as it is")
    import torch

    from .quant import check_device, write_quantized

    where = torch.device(pick_device(device))
    requests = _calibration_requests(calibrate, model) if calibrate is not None else []
    if requests and (why := check_device(where, getattr(torch, dtype))):
        fail(2, why)
    try:
        check_weights(model)
    except RuntimeError as e:
        fail(1, str(e))
    scales, calibration = None, None
    if requests:
        from .calibrate import input_scales
        from .media import file_sha256
        from .quant import HEADROOM

        say = (lambda message: None) if quiet else (lambda message: typer.echo(message, err=True))
        try:
            scales = input_scales(model, requests, family, where, getattr(torch, dtype), say, progress=not quiet)
        except (OSError, ValueError, RuntimeError) as e:
            fail(1, f"calibration failed, nothing written: {one_line(e)}")
        calibration = {"calibrated_on": f"{len(requests)} generation(s) of {calibrate.name}",
                       "calibration_sha256": file_sha256(calibrate), "headroom": HEADROOM}
    try:
        layers = write_quantized(model, output, getattr(torch, dtype), where, scales, calibration)
    except OSError as e:
        fail(1, f"cannot write {output}: {e.strerror or e}")
    static = f", {len(scales)} with static input scales" if scales else ""
    if not quiet:
        typer.echo(f"wrote {output} ({layers} linear layers in float8 e4m3{static})", err=True)


def _calibration_requests(path: Path, model: Path) -> list:
    """The batch file's generations as requests, each checked as `batch` checks it (exit 2 naming the line)."""
    import tempfile

    from .batch import plan_items

    s = Session(model=model, device="cpu", dtype=None, parallel=ParallelConfig())
    try:
        with tempfile.TemporaryDirectory() as nowhere:  # nothing is written: a line's "output" does not count
            items = read_batch(path.expanduser(), {}, Path(nowhere), _request_builder(s))
            plan_items([replace(item, output=Path(nowhere) / f"{item.index}.mp4") for item in items], s)
    except UsageError as e:
        fail(2, f"--calibrate {path}: {e}")
    return [item.request for item in items]


@app.command(help=_help(
    "Decode the latents a run kept when its VAE decode failed (OUTPUT.latents.npz) into the outputs generate "
    "would have written: the video and its sidecar. Only the VAE loads.",
    "  usp-infer decode fox.mp4.latents.npz -o fox.mp4 --vae-tiling",
))
def decode(
    latents: Annotated[Path, typer.Argument(help="A .latents.npz that generate or batch kept.")],
    output: Annotated[Optional[Path], _opt("--output", "-o", help="Where to write [default: the run's own output].")] = None,
    model: Annotated[Optional[Path], _opt(help="The model folder [default: the one the run used; its configs must match].")] = None,
    vae_tiling: VaeTiling = False,
    device: Device = "auto",
    dtype: Annotated[Optional[str], _opt(help="float32 | bfloat16 | float16 [default: the run's].")] = None,
    overwrite: Overwrite = False,
    quiet: Quiet = False,
    debug: Debug = False,
) -> None:
    from .latents import run_decode

    if device not in ("auto", "cpu", "cuda"):
        fail(2, f"--device {device!r} is unknown; use auto, cpu or cuda")
    if dtype is not None and dtype not in ("float32", "bfloat16", "float16"):
        fail(2, f"--dtype {dtype!r} is unknown; use float32, bfloat16 or float16")
    try:
        run_decode(latents.expanduser(), None if output is None else output.expanduser(),
                   None if model is None else model_path(model), vae_tiling, device, dtype, overwrite, quiet, debug)
    except UsageError as e:
        fail(2, str(e))
    except Exception as e:  # noqa: BLE001 - the edge: one line, the traceback only with --debug
        if debug:
            raise
        fail(1, f"decoding {latents}: {one_line(e)}")


def layout_cost(cfg: int, ring: int, ulysses: int, branches: int, busiest: float | None = None) -> str:
    """What one rank does in a step of a layout, with every guidance branch on, against one GPU doing it all.
    `busiest`: the busiest cfg rank's share of one GPU's block rows (costmodel.block_rows), where rows share
    blocks (the perturbed row and cond) and branch counts alone would mislead."""
    per_rank = -(-branches // cfg)  # the busiest cfg rank's branches
    share = (per_rank / branches if busiest is None else busiest) / (ring * ulysses)
    parts = [f"{per_rank} of {branches} branches" + (" (uneven: a cfg group idles part of a step)" if branches % cfg else ""),
             f"1/{ring * ulysses} of the video tokens" if ring * ulysses > 1 else "all the video tokens"]
    talk = [name for name, degree in (("all-to-all in each attention", ulysses), ("K/V passed round a ring", ring),
                                      ("a gather of predictions each step", cfg)) if degree > 1]
    return f"~{share:.2g} of one GPU's step per rank: " + ", ".join(parts) + ("; " + ", ".join(talk) if talk else "")


def _count_parameters(folder: Path) -> int:
    """Parameters from the safetensors headers alone: nothing is loaded."""
    from safetensors import safe_open

    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                total += math.prod(f.get_slice(key).get_shape())
    return total


def _weight_memory(folder: Path) -> tuple[int, int]:
    """(bf16, fp8) bytes of a transformer's weights on one rank (every rank holds them all), from the headers."""
    from safetensors import safe_open

    from .quant import weight_memory

    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                tensors[key] = (f.get_slice(key).get_dtype(), tuple(f.get_slice(key).get_shape()))
    return weight_memory(tensors)


@app.command(help=_help(
    "Describe a checkpoint: configs, parameter counts, valid sizes, and the layouts that fit N GPUs.",
    "  usp-infer info",
    "  usp-infer info models/ltx-video --gpus 8 --json",
))
def info(
    model: Path = typer.Argument(DEFAULT_MODEL, help="Diffusers-format LTX folder [default: the embedded tiny model]."),
    gpus: int = _opt(1, help="Number of processes to list (cfg, ring, ulysses) layouts for."),
    height: Height = None,
    width: Width = None,
    num_frames: NumFrames = None,
    json_summary: bool = _opt(False, "--json", help="Print JSON instead of text."),
    lora: Annotated[Optional[list[str]], _opt("--lora", metavar="PATH[:STRENGTH]", help=(
        "LTX-2: a LoRA to check against this model and list as a run would apply it; repeatable."))] = None,
    stage2_lora: Annotated[Optional[list[str]], _opt("--stage2-lora", metavar="PATH[:STRENGTH]", help=(
        "LTX-2: the same for a stage-2 LoRA of --two-stage; repeatable."))] = None,
) -> None:
    from .families import resolve
    from .parallel import costmodel

    if gpus < 1:
        fail(2, f"--gpus {gpus} must be at least 1")
    try:
        model = model_path(model)
        family, configs = resolve(model)
    except ValueError as e:
        fail(2, str(e))
    front = family.requests()
    t = configs["transformer"]
    try:
        check_weights(model)
    except RuntimeError as e:
        fail(1, str(e))
    components = [name for name in configs if (model / name).is_dir() and any((model / name).glob("*.safetensors"))]
    params = {name: _count_parameters(model / name) for name in components}
    bf16, fp8 = _weight_memory(model / "transformer")
    shape_keys = ("num_layers", "num_attention_heads", "attention_head_dim", "audio_num_attention_heads",
                  "audio_attention_head_dim", "in_channels", "caption_channels")
    summary = {
        "model": str(model),
        "family": family.name,
        "needs": family.summary,
        "presets": list(family.presets),
        "transformer": {k: t[k] for k in shape_keys if k in t},
        "parameters": params,
        "transformer_weights_per_rank_gib": {"bfloat16": bf16 / 2**30, "fp8": fp8 / 2**30,
                                             "quantized": bool(t.get("_quantization"))},
        "frames": "8k+1 (e.g. 9, 17, 25, 49, 97, 121, 161, 257)",
        "height_width": "multiples of 32 (width x height e.g. 704x480, 768x512, 1216x704)",
        "tokens": "((frames-1)/8+1) * (height/32) * (width/32)" + (", plus ~25 audio tokens a second" if family.audio else ""),
        "configs": configs,
    }
    try:  # the default request at this size: its branches and tokens are what the layouts are predicted for
        request = front.build_request({"prompt": "info", "height": height, "width": width, "num_frames": num_frames}, configs)
    except (UsageError, ValueError) as e:
        fail(2, str(e))
    work = front.workload(request, configs)
    weights = params.get("transformer", 0) * 2  # bf16 on a GPU
    error = costmodel.load_costs()["validation_max_error"]["value"]
    summary["predictions"] = (f"{request.width}x{request.height}x{request.num_frames}, {len(work.branches)} branches "
                              f"batched, {work.video.tokens} video tokens: predicted on H200s by the cost model "
                              f"(within {100 * error:.0f}% on the recorded multi-GPU runs), not measured")
    summary["layouts"] = [{"cfg": p.layout[0], "ring": p.layout[1], "ulysses": p.layout[2],
                           "predicted_ms_per_step": round(p.ms, 1),
                           "predicted_gib_per_rank": round(costmodel.memory_gib(work, p.layout, weights), 1),
                           "cost": layout_cost(*p.layout, len(work.branches),
                                               max(costmodel.block_rows(work, p.layout[0])) / sum(costmodel.block_rows(work, 1)))}
                          for p in costmodel.ranked(gpus, work, max_cfg=front.MAX_BRANCHES)]
    if lora or stage2_lora:  # the LoRAs a run with these flags would apply, checked against the weights
        describe = getattr(front, "describe_loras", None)
        if describe is None:
            fail(2, f"--lora is a flag of ltx-2 models, but {model} is an {family.name} model")
        try:
            summary["loras"] = describe(configs, lora or [], stage2_lora or [])
        except ValueError as e:
            fail(2, str(e))
    if json_summary:
        typer.echo(json.dumps(summary, indent=2))
        return
    typer.echo(f"model        {model}")
    typer.echo(f"family       {family.name}: {family.summary}; presets {', '.join(family.presets)}")
    typer.echo("transformer  " + ", ".join(f"{k} {v}" for k, v in summary["transformer"].items()))
    typer.echo("parameters   " + ", ".join(f"{k} {n / 1e6:.2f}M" for k, n in params.items()))
    stored = ""
    if held := t.get("_quantization"):
        inputs = held.get("activations", "per row, dynamic")
        inputs = inputs["scales"] if isinstance(inputs, dict) else inputs
        stored = f" (this folder holds the fp8 weights; input scales {inputs})"
    size = lambda n: f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"  # noqa: E731
    typer.echo(f"weights      transformer per rank: {size(bf16)} bfloat16, {size(fp8)} with --quantize fp8 "
               f"({fp8 / bf16:.0%}){stored}")
    typer.echo(f"frames       {summary['frames']}")
    typer.echo(f"height/width {summary['height_width']}")
    typer.echo(f"tokens       {summary['tokens']}")
    for entry in summary.get("loras", []):
        typer.echo(f"lora         {entry['path']} x{entry['strength']:g} ({entry['stage']}): {entry['modules']} "
                   f"modules, rank {'/'.join(map(str, entry['rank']))}")
    typer.echo(f"layouts for {gpus} process(es), fastest first ({summary['predictions']}):")
    for x in summary["layouts"]:
        typer.echo(f"  --cfg-parallel {x['cfg']} --ring-degree {x['ring']} --ulysses-degree {x['ulysses']}: "
                   f"{x['predicted_ms_per_step']:,.1f} ms/step, {x['predicted_gib_per_rank']:,.1f} GiB per rank (predicted); "
                   f"{x['cost']}")


BENCH_HELP = (
    "Time denoising steps of a full-size LTX transformer (random bf16 weights) on 1..N GPUs.\n\n"
    "\b\nExamples:\n"
    "  usp-infer bench --shape ltx-video-13b --height 512 --width 768 --num-frames 121\n"
    "  torchrun --nproc_per_node 4 -m usp_infer bench --layouts all --a2a-mode both --json-out r.json"
)


# Its flags live in a torch-free module and its body imports bench (and torch) only when it runs, so
# `usp-infer bench --help` and every other command start without torch.
app.command("bench", help=BENCH_HELP)(bench_command)


def main() -> None:
    """The console script: click's own usage errors ("Error: No such option") in the one-line form every other
    error has (`error: ...`, exit 2)."""
    try:
        code = app(standalone_mode=False)
    except typer.Abort:  # Ctrl-C outside a run (a run says so itself and exits 130)
        code = 130
    except Exception as e:  # click's exceptions (typer vendors its own click): they know their message and code
        if not callable(getattr(e, "format_message", None)):
            raise
        if type(e).__name__ == "NoArgsIsHelpError":  # `usp-infer` alone: the help, as click shows it
            e.show()
            raise SystemExit(e.exit_code) from None
        context = getattr(e, "ctx", None)
        hint = f"; see {context.command_path} --help" if context is not None else ""
        typer.echo(f"error: {one_line(e.format_message())}{hint}", err=True)
        code = getattr(e, "exit_code", 2)
    raise SystemExit(code if isinstance(code, int) else 0)
