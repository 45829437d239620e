"""Worked example: a Hugging Face audio + text model served by mosel, with no glue but the marks.

Two Hugging Face classifiers built from small configs, fused late (their logits summed): a
``Wav2Vec2ForSequenceClassification`` over raw 16 kHz waveforms and a
``BertForSequenceClassification`` over a caption. Their inputs are what Hugging Face's own
pre-processors give, passed as they come:

* ``"audio"``: the feature extractor's ``BatchFeature`` (``input_values`` float32, normalised per
  clip, and ``attention_mask``), clips of different lengths zero-padded to the batch's longest;
* ``"text"``: the tokenizer's ``BatchEncoding`` (``input_ids``, ``token_type_ids``,
  ``attention_mask``, int64), padded to the batch's longest caption.

Both modalities change cost with their length, so both declare a size, buckets and how to pad
(``mosel.Padding``): each job is priced at its own lengths, padded up to its buckets' edges so
that jobs of one bucket merge into one batch and kernels are reused, and profiling measures each
bucket from the validation rows however they are batched.

Nothing is downloaded from a hub: the models are built from configs, the WordPiece tokenizer is
trained here on the example's own captions, the ``Wav2Vec2FeatureExtractor`` is built from its
arguments. The speech is synthesised here: each spoken digit is said by Debian's ``espeak-ng``
(as AV-Digits does, ``examples/av_digits/data.py``) in many voices, at its natural length, with
random silence around it and background noise; test voices are never heard in training. The
captions ("the caller said something odd about the extension") name the digit, hint at two
neighbouring digits, or say nothing, so that audio and text together beat either alone.

It shows, top to bottom: the marks, the data, training with ``mosel.train_with_modality_dropout``,
``mosel.profile``, serving with ``model.infer`` straight from the pre-processors' outputs,
checking served rows with ``mosel.run_configuration``, and serving over HTTP with RAW inputs
(caption strings, waveforms as lists of numbers) pre-processed server-side by ``mosel.http``'s
pre-processing hook.

Needs ``espeak-ng`` (``apt-get install -y espeak-ng``); without it the example says so and stops.
Run: python examples/hf_audio_text.py            (a few minutes on a CPU; clips cached in .cache/)
     python examples/hf_audio_text.py --small    (fewer voices and epochs: what the tests run)
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing below may reach a hub

import argparse
import concurrent.futures
import random
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from torch import Tensor, nn
from transformers import (
    BatchEncoding,
    BatchFeature,
    BertConfig,
    BertForSequenceClassification,
    BertTokenizerFast,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2ForSequenceClassification,
)

import mosel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from av_digits.data import TEST_VOICES, TRAIN_VOICES, WORDS, espeak

CLASSES = 10
SAMPLE_RATE = 16_000
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # [PAD] first: its id is 0
AUDIO_BUCKETS = (8_000, 12_000, 16_000, 24_000)  # samples: 0.5, 0.75, 1 and 1.5 s
TEXT_BUCKETS = (8, 16, 32)  # tokens, [CLS] and [SEP] included
CACHE = Path(__file__).resolve().parents[1] / ".cache" / "hf_audio_text"


# --- 1. The model: two Hugging Face classifiers, three marks ---------------------------------------


@mosel.multimodal
class SpokenDigit(nn.Module):
    """Wav2Vec2 and BERT sequence classifiers; the logits of the towers computed are summed."""

    def __init__(self, audio: Wav2Vec2Config, text: BertConfig) -> None:
        super().__init__()
        self.audio_tower = Wav2Vec2ForSequenceClassification(audio)
        self.text_tower = BertForSequenceClassification(text)

    @mosel.modality(
        "audio",
        size=lambda audio: audio["input_values"].shape[1],
        buckets=AUDIO_BUCKETS,
        pad=mosel.Padding(dim=1, value=0.0, mask="attention_mask"),  # the extractor pads with 0.0
    )
    def encode_audio(self, audio: BatchFeature) -> Tensor:
        return self.audio_tower(**audio).logits

    @mosel.modality(
        "text",
        size=lambda text: text["input_ids"].shape[1],
        buckets=TEXT_BUCKETS,
        pad=mosel.Padding(dim=1, value=0, mask="attention_mask"),  # [PAD] is id 0
    )
    def encode_text(self, text: BatchEncoding) -> Tensor:
        return self.text_tower(**text).logits

    @mosel.fusion
    def fuse(self, features: Mapping[str, Tensor]) -> Tensor:
        return torch.stack(list(features.values())).sum(0)


def build_model(vocab_size: int) -> SpokenDigit:
    """Small Wav2Vec2 and BERT from configs (no weights downloaded).

    Wav2Vec2's convolutions are normalised per frame (``feat_extract_norm="layer"``) and it
    takes an attention mask, so padding never changes a clip's logits: the precondition of
    ``mosel.Padding``. Five convolutions instead of seven keep it cheap on a CPU (320x down).
    """
    audio = Wav2Vec2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        conv_dim=(16, 32, 32, 32, 32), conv_kernel=(10, 8, 4, 4, 4), conv_stride=(5, 4, 4, 2, 2),
        feat_extract_norm="layer", do_stable_layer_norm=True, num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4, apply_spec_augment=False, classifier_proj_size=64,
        num_labels=CLASSES,
    )  # fmt: skip
    text = BertConfig(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=64, num_labels=CLASSES,
    )  # fmt: skip
    torch.manual_seed(0)
    return SpokenDigit(audio, text)


# --- 2. The data: digits spoken by espeak-ng, captions with ambiguous class words -------------------

# HINTS[c] is said of digits c and c + 1: a caption holding it leaves two classes open.
HINTS = ("low", "small", "early", "odd", "middle", "round", "late", "big", "high", "last")
FILLERS = (
    "the", "caller", "said", "a", "number", "on", "line", "was", "unclear", "please", "press",
    "option", "for", "menu", "extension", "dial", "voice", "message", "left", "at", "about",
    "account", "digit", "again", "quiet", "noisy", "phone", "call", "heard", "something",
)  # fmt: skip


def caption(label: int, rng: random.Random) -> str:
    """A caption of 2-22 words: fillers, and (usually) one word about the digit."""
    words = [rng.choice(FILLERS) for _ in range(rng.randint(2, 22))]
    roll = rng.random()
    if roll < 0.3:
        words.insert(rng.randrange(len(words) + 1), WORDS[label])
    elif roll < 0.75:
        hint = HINTS[label] if rng.random() < 0.5 else HINTS[(label - 1) % CLASSES]
        words.insert(rng.randrange(len(words) + 1), hint)
    return " ".join(words)


def speak(voices: Sequence[str], seed: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Every digit said once by each voice (random speed and pitch), at its natural length; cached."""
    path = CACHE / f"clips-v1-{seed}-{len(voices)}.npz"
    if not path.exists():
        rng = random.Random(seed)
        jobs = [(WORDS[d], v, rng.randint(120, 210), rng.randint(25, 75)) for v in voices for d in range(10)]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            clips = [np.trim_zeros(clip, "b") for clip in pool.map(lambda job: espeak(*job), jobs)]
        CACHE.mkdir(parents=True, exist_ok=True)
        lengths = np.array([len(c) for c in clips])
        np.savez(path.with_suffix(".tmp.npz"), samples=np.concatenate(clips), lengths=lengths)
        path.with_suffix(".tmp.npz").replace(path)
    saved = np.load(path, allow_pickle=False)
    clips = np.split(saved["samples"], np.cumsum(saved["lengths"])[:-1])
    return clips, np.tile(np.arange(10), len(voices))


@dataclass(frozen=True)
class Split:
    """Raw rows: clean clips (float32 at 16 kHz, lengths vary), captions, labels."""

    clips: list[np.ndarray]
    captions: list[str]
    labels: Tensor  # (N,) int64

    def waveforms(self, rows: Sequence[int], seed: int) -> list[np.ndarray]:
        """The rows' waveforms: up to 0.25 s of silence on each side, background noise at 6 dB SNR."""
        rng = np.random.default_rng(seed)
        out = []
        for i in rows:
            clip = self.clips[i]
            silence = rng.integers(0, SAMPLE_RATE // 4, 2)
            wave = np.concatenate([np.zeros(silence[0]), clip, np.zeros(silence[1])])
            power = float(np.mean(clip**2)) + 1e-8
            out.append((wave + np.sqrt(power / 10**0.6) * rng.standard_normal(len(wave))).astype(np.float32))
        return out

    def __len__(self) -> int:
        return len(self.captions)


def make_splits(voices: tuple[int, int, int], seed: int = 0) -> tuple[Split, Split, Split]:
    """Train, validation and test splits; the validation and test voices are never heard in training."""
    rng = random.Random(seed)
    heard = rng.sample(TRAIN_VOICES, voices[0])
    unheard = rng.sample(TEST_VOICES, voices[1] + voices[2])

    def split(chosen: Sequence[str], part: int) -> Split:
        clips, labels = speak(chosen, seed + part)
        return Split(clips, [caption(int(y), rng) for y in labels], torch.from_numpy(labels))

    return split(heard, 0), split(unheard[: voices[1]], 1), split(unheard[voices[1] :], 2)


def train_tokenizer(captions: Sequence[str]) -> BertTokenizerFast:
    """A WordPiece tokenizer trained on the captions, wrapped as a Hugging Face tokenizer."""
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.train_from_iterator(captions, trainers.WordPieceTrainer(vocab_size=200, special_tokens=SPECIAL))
    cls, sep = wordpiece.token_to_id("[CLS]"), wordpiece.token_to_id("[SEP]")
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tokenizer = BertTokenizerFast(tokenizer_object=wordpiece, model_max_length=64)
    assert tokenizer.pad_token_id == 0, "the text mark pads with 0"
    return tokenizer


@dataclass(frozen=True)
class Preprocess:
    """Raw rows -> the model's inputs, as Hugging Face's pre-processors give them.

    The same function serves training, profiling, ``infer`` and the HTTP hook: ``inputs`` is
    ``{"audio": [waveform, ...], "text": [caption, ...]}`` (16 kHz samples as lists of numbers
    or arrays, any lengths), either key optional.
    """

    tokenizer: BertTokenizerFast
    extractor: Wav2Vec2FeatureExtractor

    def __call__(self, inputs: Mapping[str, Any]) -> dict[str, BatchEncoding | BatchFeature]:
        out: dict[str, BatchEncoding | BatchFeature] = {}
        if "audio" in inputs:
            out["audio"] = self.audio(inputs["audio"])
        if "text" in inputs:
            out["text"] = self.text(inputs["text"])
        return out

    def audio(self, waves: Sequence[Any]) -> BatchFeature:
        """16 kHz waveforms (lists of numbers or arrays, any lengths) -> the feature extractor's output."""
        clips = [np.asarray(wave, dtype=np.float32) for wave in waves]
        return self.extractor(clips, sampling_rate=SAMPLE_RATE, padding=True, return_tensors="pt")

    def text(self, captions: Sequence[str]) -> BatchEncoding:
        """Caption strings -> the tokenizer's output, padded to the longest."""
        return self.tokenizer(list(captions), padding=True, return_tensors="pt")

    def hooks(self) -> dict[str, Any]:
        """``mosel.http``'s pre-processing hook: each JSON field's raw value -> its model inputs."""
        return {"audio": self.audio, "text": self.text}


def feature_extractor() -> Wav2Vec2FeatureExtractor:
    return Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0, do_normalize=True,
        return_attention_mask=True,
    )  # fmt: skip


def raw(split: Split, rows: Sequence[int], seed: int = 0) -> dict[str, Any]:
    """The rows as a client sends them: waveforms and caption strings."""
    return {"audio": split.waveforms(rows, seed), "text": [split.captions[i] for i in rows]}


def batches(
    split: Split, preprocess: Preprocess, size: int, seed: int = 0
) -> Iterator[tuple[dict[str, Any], Tensor]]:
    """Shuffled ``(inputs, labels)`` batches, each padded to its own longest clip and caption."""
    order = list(range(len(split)))
    random.Random(seed).shuffle(order)
    for start in range(0, len(order), size):
        rows = order[start : start + size]
        yield preprocess(raw(split, rows, seed + start)), split.labels[rows]


# --- 3. Train with modality dropout, profile on this machine ---------------------------------------


@dataclass(frozen=True)
class Built:
    model: SpokenDigit
    profile: mosel.Profile
    preprocess: Preprocess
    test: Split


def build(small: bool = False) -> Built:
    """Data, tokenizer, model; trained with modality dropout and profiled here."""
    train, validation, test = make_splits((20, 8, 8) if small else (64, 16, 16))
    preprocess = Preprocess(train_tokenizer(train.captions), feature_extractor())
    model = build_model(len(preprocess.tokenizer))
    mosel.train_with_modality_dropout(
        model,
        lambda: batches(train, preprocess, 16, seed=random.randrange(1 << 30)),  # new noise every epoch
        epochs=3 if small else 14,
        lr=1e-3,
    )
    profile = mosel.profile(
        model,
        batches(validation, preprocess, 40),
        max_batch_size=8,
        batch_sizes=[1, 2, 4, 8],
        repeats=5 if small else 7,
        cost_checks=6 if small else 12,
        progress=False,
    )
    return Built(model, profile, preprocess, test)


# --- 4. Serve in-process: straight from the pre-processors' outputs --------------------------------


def serve_checked(built: Built, rows: Sequence[int], **slo: Any) -> mosel.Result:
    """Serve ``rows`` of the test split with ``infer``; check every row against its configuration."""
    inputs = built.preprocess(raw(built.test, rows))
    result = built.model.infer(inputs, **slo)  # type: ignore[operator]
    for config in set(result.modalities):
        by_hand = mosel.run_configuration(built.model, inputs, config)  # every row, in this configuration
        rows_in = [i for i, c in enumerate(result.modalities) if c == config]
        # Served rows were padded to their buckets' edges: the same up to a float's last bits.
        assert torch.allclose(result.output[rows_in], by_hand[rows_in], atol=1e-4), config
    return result


# --- 5. Serve over HTTP: raw waveforms and captions, pre-processed server-side ----------------------


def create_app(built: Built) -> Any:
    """``mosel.http``'s app; its hook turns each raw JSON field into the model's inputs.

    ``{"audio": [waveform, ...], "text": [caption, ...]}`` comes in (waveforms as lists of
    numbers, or compactly as ``{"$b64": ..., "dtype": "float32", "shape": [n]}``); the feature
    extractor normalises them server-side, off the event loop, so that no client can skip it.
    """
    import mosel.http

    return mosel.http.create_app(built.model, preprocess=built.preprocess.hooks())


def tour(built: Built) -> None:
    """What the model measured, served in-process and over HTTP (the example's printout)."""
    model, profile, test = built.model, built.profile, built.test
    for config, accuracy in profile.accuracy.items():
        print(
            f"   {profile.key(config):<10} accuracy {accuracy:.3f} +/- {profile.accuracy_stderr(config):.3f}"
        )
    for name, sized in profile.sized.items():
        for bucket, table in sorted(sized.tables.items()):
            print(
                f"   {name:<5} bucket {bucket:>5}: {table.at(1) / 1000:5.2f} ms at b=1, "
                f"{table.at(8) / 1000:5.2f} ms at b=8"
            )

    print("\n2. serving with infer(), inputs straight from the feature extractor and the tokenizer ...")
    inputs = built.preprocess(raw(test, range(8)))
    audio, text = inputs["audio"], inputs["text"]
    print(f"   inputs: audio {type(audio).__name__} {tuple(audio['input_values'].shape)}, "
          f"text {type(text).__name__} {tuple(text['input_ids'].shape)}")  # fmt: skip
    full = model.infer(inputs)  # type: ignore[operator]
    print(f"   no SLO: every modality; modalities {sorted(full.modalities[0])}")
    frontier = profile.plan.frontier(frozenset(profile.modalities), 8)
    fastest, best = frontier.strategies[0].predicted_latency_ms, frontier.best.predicted_latency_ms
    for deadline_ms in (round(3 * best, 2), round((fastest + best) / 2, 2)):
        result = serve_checked(built, range(8), deadline_ms=deadline_ms, best_effort=True)
        correct = int((result.output.argmax(-1) == test.labels[:8]).sum())
        used = sorted({profile.key(c) for c in result.modalities})
        print(
            f"   deadline {deadline_ms} ms: {used}, expected accuracy {result.expected_accuracy:.3f}, "
            f"{correct}/8 correct; every row equals run_configuration"
        )

    print("\n3. the same model behind mosel.http: raw waveforms and captions, pre-processed server-side ...")
    from fastapi.testclient import TestClient

    two = raw(test, range(2))
    body = {"inputs": {"audio": [w.tolist() for w in two["audio"]], "text": two["text"]}}
    with TestClient(create_app(built)) as client:
        response = client.post("/predict", json=body, headers={"X-Deadline-Ms": "500"})
        answer = response.json()
        print(f"   POST /predict -> {response.status_code} prediction {answer.get('prediction')}, "
              f"modalities {answer.get('modalities')}")  # fmt: skip
        bad = client.post("/predict", json={"inputs": {"audio": ["hello"], "text": two["text"][:1]}})
        print(f"   a waveform that is not numbers -> {bad.status_code} {bad.json()}")


def main(small: bool = False) -> None:
    if shutil.which("espeak-ng") is None:
        print("hf_audio_text needs espeak-ng to speak its digits: apt-get install -y espeak-ng")
        return
    torch.set_num_threads(1)  # a model this small gains nothing from more; on a busy host they cost dearly
    started = time.perf_counter()
    print("1. speaking digits, training Wav2Vec2 + BERT with modality dropout, then profiling ...")
    built = build(small)
    print(f"   built, trained and profiled in {time.perf_counter() - started:.0f} s")
    tour(built)
    mosel.close(built.model)
    print(f"\nhf_audio_text finished in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="fewer voices and epochs (the tests' run)")
    main(parser.parse_args().small)
