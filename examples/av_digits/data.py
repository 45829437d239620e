"""Building AV-Digits: real handwritten digits, spoken digits from espeak-ng, and a short "video".

* image: scikit-learn's bundled handwritten digits (1,797 real 8x8 images, 43 writers);
* audio: the digit's word spoken by Debian's espeak-ng across accents, voice variants, speeds and
  pitches, resampled to 16 kHz, cropped or padded to one second;
* video: eight 16x16 frames of the digit, each with its own noise (the costly modality).

Every sample pairs an image with a random clip of the same label. Noise on every modality makes
fusion beat any single one. The split is speaker-independent: test clips come from accents and
voice variants never heard in training. Everything is deterministic from the seed and cached as
a plain ``.npz`` (no pickle) in a folder that is not committed.
"""

from __future__ import annotations

import concurrent.futures
import io
import random
import shutil
import subprocess
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TRAIN_VARIANTS = (
    "m1", "m2", "m3", "m5", "m6", "f1", "f2", "f3", "f5", "Alex", "Andy", "Annie", "Gene", "Jacky", "Lee",
    "Mike", "Storm", "adam", "belinda", "boris", "david", "ed", "grandma", "klatt", "klatt2", "linda",
    "max", "paul", "quincy", "rob", "steph", "zac",
)  # fmt: skip
TEST_VARIANTS = ("m4", "m7", "f4", "Alicia", "benjamin", "grandpa", "klatt3", "travis")
TRAIN_VOICES = tuple(
    f"{accent}+{variant}"
    for accent in ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029")
    for variant in TRAIN_VARIANTS
)
# Speaker-independent test: voice variants never heard in training.
TEST_VOICES = tuple(
    f"{accent}+{variant}"
    for accent in ("en-us", "en-gb", "en-gb-scotland", "en-us-nyc")
    for variant in TEST_VARIANTS
)
SAMPLE_RATE = 16_000
FRAMES = 8
FRAME_SIZE = 16
VERSION = 3
DEFAULT_CACHE = Path(__file__).resolve().parents[2] / ".cache" / "av_digits"


class MissingToolError(RuntimeError):
    """A program or package the data builder needs is not installed."""


@dataclass(frozen=True)
class Split:
    """One split: inputs per modality (first dimension = sample) and labels."""

    image: torch.Tensor  # (N, 1, 8, 8)
    audio: torch.Tensor  # (N, 16000)
    video: torch.Tensor  # (N, 8, 1, 16, 16)
    labels: torch.Tensor  # (N,)

    def inputs(self, rows: slice | torch.Tensor = slice(None)) -> dict[str, torch.Tensor]:
        """The model's inputs for some rows."""
        return {"image": self.image[rows], "audio": self.audio[rows], "video": self.video[rows]}

    def batches(self, size: int) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        """``(inputs, labels)`` batches in order, the form ``mosel.profile`` reads."""
        return [
            (self.inputs(slice(i, i + size)), self.labels[i : i + size])
            for i in range(0, len(self.labels), size)
        ]

    def __len__(self) -> int:
        return len(self.labels)


def espeak(word: str, voice: str, speed: int, pitch: int) -> np.ndarray:
    """One clip from espeak-ng, as float32 at 16 kHz (one second, zero-padded or cropped)."""
    from scipy.signal import resample_poly

    done = subprocess.run(
        ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "--stdout", word],
        capture_output=True,
        check=True,
    )
    with wave.open(io.BytesIO(done.stdout)) as w:
        rate = w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0
    audio = resample_poly(pcm, SAMPLE_RATE, rate).astype(np.float32) if rate != SAMPLE_RATE else pcm
    out = np.zeros(SAMPLE_RATE, dtype=np.float32)
    out[: min(len(audio), SAMPLE_RATE)] = audio[:SAMPLE_RATE]
    return out


def _clips(voices: tuple[str, ...], repeats: int, rng: random.Random) -> tuple[np.ndarray, np.ndarray]:
    jobs = [
        (word, voice, rng.randint(120, 210), rng.randint(25, 75), label)
        for voice in voices
        for label, word in enumerate(WORDS)
        for _ in range(repeats)
    ]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        audio = list(pool.map(lambda j: espeak(*j[:4]), jobs))
    return np.stack(audio), np.array([j[4] for j in jobs], dtype=np.int64)


def build(cache: Path = DEFAULT_CACHE, seed: int = 0, repeats: int = 1) -> Path:
    """Synthesise the clip pools and pairings once; returns the cached ``.npz`` path."""
    path = cache / f"v{VERSION}-seed{seed}.npz"
    if path.exists():
        return path
    if shutil.which("espeak-ng") is None:
        raise MissingToolError("AV-Digits needs espeak-ng: apt-get install -y espeak-ng")
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise MissingToolError("AV-Digits needs scikit-learn: pip install 'mosel[examples]'") from exc
    rng = random.Random(seed)
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    labels = digits.target.astype(np.int64)
    order = list(range(len(labels)))
    rng.shuffle(order)
    cut = int(0.7 * len(order))
    train_idx, test_idx = np.array(sorted(order[:cut])), np.array(sorted(order[cut:]))
    train_audio, train_audio_labels = _clips(TRAIN_VOICES, repeats, rng)
    test_audio, test_audio_labels = _clips(TEST_VOICES, repeats, rng)

    def pair(image_labels: np.ndarray, clip_labels: np.ndarray) -> np.ndarray:
        by_label = {d: np.flatnonzero(clip_labels == d) for d in range(10)}
        return np.array([rng.choice(list(by_label[int(y)])) for y in image_labels], dtype=np.int64)

    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(
        tmp,
        images=images,
        labels=labels,
        train_idx=train_idx,
        test_idx=test_idx,
        train_audio=train_audio.astype(np.float16),
        test_audio=test_audio.astype(np.float16),
        train_pair=pair(labels[train_idx], train_audio_labels),
        test_pair=pair(labels[test_idx], test_audio_labels),
    )
    tmp.replace(path)
    return path


def _video(images: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    """Eight 16x16 frames of each digit (upsampled), each with its own noise."""
    frames = np.repeat(np.repeat(images, 2, axis=1), 2, axis=2)[:, None, None]  # (n, 1, 1, 16, 16)
    out = np.broadcast_to(frames, (len(images), FRAMES, 1, FRAME_SIZE, FRAME_SIZE)).astype(np.float32)
    return out + noise * rng.standard_normal(out.shape).astype(np.float32)


def load(
    split: str,
    *,
    cache: Path = DEFAULT_CACHE,
    seed: int = 0,
    image_noise: float = 0.6,
    audio_snr_db: float = -4.0,
    video_noise: float = 1.5,
    realisation: int = 0,
    images: np.ndarray | None = None,
) -> Split:
    """The ``"train"`` or ``"test"`` split with its (seeded) noise applied.

    ``realisation`` > 0 draws the noise afresh and pairs each image with another clip of its
    label from the split's pool (the images and the voices stay the split's): more rows for
    validation (profiling escalation wants a few thousand) without new speakers or writers.
    ``images``: only these positions of the split (e.g. one half of the test images).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    data = np.load(build(cache, seed), allow_pickle=False)
    idx = data[f"{split}_idx"]
    chosen = np.arange(len(idx)) if images is None else np.asarray(images)
    rng = np.random.default_rng([seed, 0 if split == "train" else 1] + ([realisation] if realisation else []))
    pairs = data[f"{split}_pair"]
    pool = data[f"{split}_audio"]
    if realisation:  # clips are generated voice by voice, word by word: a clip's label is its index mod 10
        by_label = {d: np.flatnonzero(np.arange(len(pool)) % len(WORDS) == d) for d in range(len(WORDS))}
        pairs = np.array([rng.choice(by_label[int(y)]) for y in data["labels"][idx]])
    idx, pairs = idx[chosen], pairs[chosen]
    images = data["images"][idx]
    noisy_images = images + image_noise * rng.standard_normal(images.shape).astype(np.float32)
    clips = pool.astype(np.float32)[pairs]
    power = np.mean(clips**2, axis=1, keepdims=True) + 1e-8
    clips = clips + np.sqrt(power / 10 ** (audio_snr_db / 10)) * rng.standard_normal(clips.shape).astype(
        np.float32
    )
    return Split(
        image=torch.from_numpy(noisy_images[:, None]),
        audio=torch.from_numpy(clips),
        video=torch.from_numpy(_video(images, rng, video_noise)),
        labels=torch.from_numpy(data["labels"][idx]),
    )
