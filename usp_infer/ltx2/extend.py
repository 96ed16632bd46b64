"""--extend: continue a clip. The new segment is generated with the clip's last K frames as a clip condition
at frame 0 (held clean); the output is the clip's own frames, then the segment's frames after those K.

Sound: the clip's track (resampled to the model's rate, fitted to the clip's length) followed by the audio
generated for the segment from K / fps seconds on, so the track runs without a gap for the whole video. The
generated audio is not held to the clip's inside the overlap (the transformer takes one audio timestep per
sample), so the join is where the new sound takes over. A clip without sound gives a silent output.
"""

from __future__ import annotations

import numpy as np


def clip_info(path: str) -> dict:
    """Frames, size and rate of a clip, read without decoding it whole (PyAV, no torch): for the checks."""
    import av

    try:
        with av.open(str(path)) as container:
            stream = next((s for s in container.streams if s.type == "video"), None)
            if stream is None:
                raise ValueError(f"--extend {path} has no video stream; pass an mp4 clip")
            frames = stream.frames or sum(1 for _ in container.decode(stream))
            return {"frames": frames, "height": stream.codec_context.height, "width": stream.codec_context.width,
                    "fps": float(stream.average_rate or stream.guessed_rate or 0),
                    "audio": any(s.type == "audio" for s in container.streams)}
    except FileNotFoundError:
        raise ValueError(f"--extend {path} does not exist; pass an existing mp4 clip") from None
    except av.FFmpegError as err:
        raise ValueError(f"--extend {path} cannot be read as a video ({err}); pass an mp4 clip") from None


def join(req, frames: np.ndarray, waveform: np.ndarray | None, rate: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The clip's frames (copied as decoded) + the segment's frames K.. ; the clip's sound + the new sound."""
    from .audio_input import resample, stereo
    from ..media import read_audio, read_video

    import torch

    clip, fps = read_video(req.extend)
    k = req.extend_frames
    # the clip's decoded pixels as they are (frames in uint8), or as floats the writers round back to them
    video = np.concatenate([clip if frames.dtype == np.uint8 else clip.astype(np.float32) / 255.0, frames[k:]])
    if waveform is None:
        return video, None
    try:
        sound, clip_rate = read_audio(req.extend)
    except ValueError:  # no audio track: the output is silent, as the clip was
        return video, None
    sound = resample(torch.from_numpy(stereo(sound)), clip_rate, rate).numpy()
    clip_samples = round(len(clip) / req.fps * rate)
    sound = np.pad(sound[:, :clip_samples], ((0, 0), (0, max(0, clip_samples - sound.shape[1]))))
    new = stereo(waveform)[:, round(k / req.fps * rate):]
    return video, np.concatenate([sound, new], axis=1)
