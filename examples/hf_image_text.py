"""Worked example: a Hugging Face image + text model served by mosel, with no glue but the marks.

The model is ``transformers.VisionTextDualEncoderModel`` (a ViT image tower and a BERT text
tower, CLIP-style) built from small configs, subclassed to add a classifier head and mosel's
three marks. Its inputs are what Hugging Face's own pre-processors give, passed as they come:

* ``"text"``: the tokenizer's ``BatchEncoding`` (``input_ids``, ``token_type_ids``,
  ``attention_mask``, int64, padded to the batch's longest caption);
* ``"image"``: the image processor's ``BatchFeature`` (``pixel_values``, float32).

Nothing is downloaded from a hub: the models are built from configs, the WordPiece tokenizer is
trained here (with the ``tokenizers`` library) on the example's own captions and wrapped as a
``BertTokenizerFast``, and the ``ViTImageProcessorPil`` is built from explicit arguments.

The data are synthetic, seeded and real-looking: scikit-learn's handwritten digits (real 8x8
scans, noised and partly occluded) paired with captions such as "a faint scan of a handwritten
loopy digit on paper", whose class words are ambiguous between neighbouring digits or missing,
so that image and text together beat either alone.

It shows, top to bottom: the marks (the caption's length declared as a size with padding, so
each job is priced at its own length and jobs of one length bucket merge), the data, training
with ``mosel.train_with_modality_dropout``, ``mosel.profile``, serving with ``model.infer``
straight from the tokenizer's and the image processor's outputs, checking served rows with
``mosel.run_configuration``, and serving over HTTP with RAW inputs (caption strings, images as
nested lists of numbers) pre-processed server-side by ``mosel.http``'s pre-processing hook.

Run: python examples/hf_image_text.py            (about a minute or two on a CPU)
     python examples/hf_image_text.py --small    (fewer rows and epochs: what the tests run)
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing below may reach a hub

import argparse
import random
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from torch import Tensor, nn
from transformers import (
    BatchEncoding,
    BatchFeature,
    BertConfig,
    BertTokenizerFast,
    VisionTextDualEncoderConfig,
    VisionTextDualEncoderModel,
    ViTConfig,
    ViTImageProcessorPil,
)

import mosel

CLASSES = 10
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # [PAD] first: its id is 0
TEXT_BUCKETS = (8, 16, 32)  # caption lengths in tokens, [CLS] and [SEP] included


# --- 1. The model: Hugging Face's dual encoder, three marks and a classifier head -------------------


@mosel.multimodal
class DigitDualEncoder(VisionTextDualEncoderModel):
    """ViT + BERT from ``VisionTextDualEncoderModel``; one linear head per tower, logits summed.

    The text branch is the parent's own ``get_text_features`` (BERT, its [CLS] pooler, the
    projection); the image branch projects ViT's mean patch state (a ViT trained from scratch
    on a thousand images learns far faster from it than from its [CLS] token). The fusion sums
    the heads of the towers computed, so any non-empty subset of modalities is a valid input.
    """

    def __init__(self, config: VisionTextDualEncoderConfig) -> None:
        super().__init__(config)
        self.heads = nn.ModuleDict({m: nn.Linear(config.projection_dim, CLASSES) for m in ("image", "text")})

    @mosel.modality("image")
    def encode_image(self, image: BatchFeature) -> Tensor:
        patches = self.vision_model(pixel_values=image["pixel_values"]).last_hidden_state
        return self.visual_projection(patches.mean(1))  # the mean patch learns faster than [CLS] from scratch

    @mosel.modality(
        "text",
        size=lambda text: text["input_ids"].shape[1],
        buckets=TEXT_BUCKETS,
        pad=mosel.Padding(dim=1, value=0, mask="attention_mask"),  # [PAD] is id 0; masked out
    )
    def encode_text(self, text: BatchEncoding) -> Tensor:
        return self.get_text_features(**text).pooler_output

    @mosel.fusion
    def fuse(self, features: Mapping[str, Tensor]) -> Tensor:
        return torch.stack([self.heads[m](f) for m, f in features.items()]).sum(0)


def build_model(vocab_size: int) -> DigitDualEncoder:
    """Small ViT and BERT towers from configs (no weights downloaded)."""
    vision = ViTConfig(
        image_size=32, patch_size=8, num_channels=1, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=128,
    )  # fmt: skip
    text = BertConfig(
        vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    return DigitDualEncoder(
        VisionTextDualEncoderConfig.from_vision_text_configs(vision, text, projection_dim=64)
    )


# --- 2. The data: real handwritten digits, captions with ambiguous class words ----------------------

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# SHAPES[c] describes digits c and c + 1: a caption holding it leaves two classes open.
SHAPES = ("round", "thin", "curly", "pointy", "tall", "wavy", "loopy", "slanted", "stacked", "tailed")
FILLERS = (
    "a", "the", "scan", "of", "handwritten", "digit", "number", "written", "quickly", "by", "hand",
    "on", "paper", "faint", "ink", "small", "grid", "picture", "looks", "like", "maybe", "blurry",
    "photo", "sample", "from", "form", "box", "pencil", "smudged", "corner",
)  # fmt: skip


def caption(label: int, rng: random.Random) -> str:
    """A caption of 2-22 words: fillers, and (usually) one word about the digit."""
    words = [rng.choice(FILLERS) for _ in range(rng.randint(2, 22))]
    roll = rng.random()
    if roll < 0.3:  # the digit's name
        words.insert(rng.randrange(len(words) + 1), NAMES[label])
    elif roll < 0.75:  # a shape word: this digit or a neighbour
        shape = SHAPES[label] if rng.random() < 0.5 else SHAPES[(label - 1) % CLASSES]
        words.insert(rng.randrange(len(words) + 1), shape)
    return " ".join(words)  # else: nothing about the digit at all


@dataclass(frozen=True)
class Split:
    """Raw rows: 8x8 grayscale images (0-255), caption strings, labels."""

    images: np.ndarray  # (N, 8, 8) uint8
    captions: list[str]
    labels: Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.captions)


def make_splits(sizes: tuple[int, int, int], seed: int = 0) -> tuple[Split, Split, Split]:
    """Seeded train, validation and test splits of scikit-learn's 1,797 digits (distinct scans)."""
    digits = load_digits()
    rng = random.Random(seed)
    noise = np.random.default_rng(seed)
    order = list(range(len(digits.target)))
    rng.shuffle(order)

    def split(index: Sequence[int]) -> Split:
        images = digits.images[list(index)] * 16.0 + noise.normal(0.0, 50.0, (len(index), 8, 8))
        for image in images:  # a blot over a random 4x4 corner of some images
            if rng.random() < 0.3:
                r, c = rng.choice((0, 4)), rng.choice((0, 4))
                image[r : r + 4, c : c + 4] = rng.uniform(0, 255)
        labels = [int(digits.target[i]) for i in index]
        return Split(
            np.clip(images, 0, 255).astype(np.uint8),
            [caption(y, rng) for y in labels],
            torch.tensor(labels, dtype=torch.int64),
        )

    train, validation = sizes[0], sizes[0] + sizes[1]
    return (
        split(order[:train]),
        split(order[train:validation]),
        split(order[validation : validation + sizes[2]]),
    )


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


def image_processor() -> ViTImageProcessorPil:
    """8x8 grayscale scans -> 32x32 ``pixel_values`` in [-1, 1]."""
    return ViTImageProcessorPil(
        do_resize=True, size={"height": 32, "width": 32}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=[0.5], image_std=[0.5],
    )  # fmt: skip


@dataclass(frozen=True)
class Preprocess:
    """Raw rows -> the model's inputs, as Hugging Face's pre-processors give them.

    The same function serves training, profiling, ``infer`` and the HTTP hook: ``inputs`` is
    ``{"text": [caption, ...], "image": [8x8 nested lists or arrays, ...]}``, either key optional.
    """

    tokenizer: BertTokenizerFast
    processor: ViTImageProcessorPil

    def __call__(self, inputs: Mapping[str, Any]) -> dict[str, BatchEncoding | BatchFeature]:
        out: dict[str, BatchEncoding | BatchFeature] = {}
        if "text" in inputs:
            out["text"] = self.text(inputs["text"])
        if "image" in inputs:
            out["image"] = self.image(inputs["image"])
        return out

    def text(self, captions: Sequence[str]) -> BatchEncoding:
        """Caption strings -> the tokenizer's output, padded to the longest."""
        return self.tokenizer(list(captions), padding=True, return_tensors="pt")

    def image(self, images: Sequence[Any]) -> BatchFeature:
        """8x8 grayscale images (nested lists or arrays of 0-255) -> the image processor's output."""
        pixels = [np.asarray(image, dtype=np.uint8)[..., None] for image in images]
        return self.processor(pixels, return_tensors="pt", input_data_format="channels_last")

    def hooks(self) -> dict[str, Any]:
        """``mosel.http``'s pre-processing hook: each JSON field's raw value -> its model inputs."""
        return {"text": self.text, "image": self.image}


def raw(split: Split, rows: Sequence[int]) -> dict[str, Any]:
    """The rows as a client sends them: caption strings and 8x8 pixel arrays."""
    return {"text": [split.captions[i] for i in rows], "image": split.images[list(rows)]}


def batches(
    split: Split, preprocess: Preprocess, size: int, shuffle: int | None = None
) -> Iterator[tuple[dict[str, Any], Tensor]]:
    """``(inputs, labels)`` batches, each caption batch padded to its own longest (as served)."""
    order = list(range(len(split)))
    if shuffle is not None:
        random.Random(shuffle).shuffle(order)
    for start in range(0, len(order), size):
        rows = order[start : start + size]
        yield preprocess(raw(split, rows)), split.labels[rows]


# --- 3. Train with modality dropout, profile on this machine ---------------------------------------


@dataclass(frozen=True)
class Built:
    model: DigitDualEncoder
    profile: mosel.Profile
    preprocess: Preprocess
    test: Split


def build(small: bool = False) -> Built:
    """Data, tokenizer, model; trained with modality dropout and profiled here."""
    train, validation, test = make_splits((500, 250, 250) if small else (1100, 350, 347))
    preprocess = Preprocess(train_tokenizer(train.captions), image_processor())
    model = build_model(len(preprocess.tokenizer))
    epochs = 8 if small else 16
    mosel.train_with_modality_dropout(
        model,
        lambda: batches(train, preprocess, 32, shuffle=random.randrange(1 << 30)),
        epochs=epochs,
        drop_probability=0.5,
        lr=2e-3,
    )
    profile = mosel.profile(
        model,
        batches(validation, preprocess, 50, shuffle=1),  # shuffled: the profiler groups rows by length
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
        # Served rows were padded to their bucket's edge: the same up to a float's last bits.
        assert torch.allclose(result.output[rows_in], by_hand[rows_in], atol=1e-5), config
    return result


# --- 5. Serve over HTTP: raw captions and pixels, pre-processed server-side -------------------------


def create_app(built: Built) -> Any:
    """``mosel.http``'s app; its hook turns each raw JSON field into the model's inputs.

    ``{"text": [caption, ...], "image": [8x8 pixels, ...]}`` comes in; the hook runs off the event
    loop, a field it cannot take answers 400 naming it, and what it returns is checked against
    the profile's input schema before anything is computed.
    """
    import mosel.http

    return mosel.http.create_app(built.model, preprocess=built.preprocess.hooks())


def tour(built: Built) -> None:
    """What the model measured, served in-process and over HTTP (the example's printout)."""
    model, profile, test = built.model, built.profile, built.test
    for config, accuracy in profile.accuracy.items():
        print(
            f"   {profile.key(config):<11} accuracy {accuracy:.3f} +/- {profile.accuracy_stderr(config):.3f}"
        )
    for bucket, table in sorted(profile.sized["text"].tables.items()):
        at_1, at_8 = table.at(1) / 1000, table.at(8) / 1000
        print(f"   text  bucket {bucket:>2}: {at_1:.2f} ms at b=1, {at_8:.2f} ms at b=8")
    image = profile.branch_latency["image"]
    print(f"   image branch:    {image.at(1) / 1000:.2f} ms at b=1, {image.at(8) / 1000:.2f} ms at b=8")

    print("\n2. serving with infer(), inputs straight from the tokenizer and the image processor ...")
    rows = raw(test, range(8))
    inputs = built.preprocess(rows)
    print(f"   inputs: text {type(inputs['text']).__name__}, image {type(inputs['image']).__name__}")
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
    text_only = model.infer(built.preprocess({"text": rows["text"]}), deadline_ms=100.0)  # type: ignore[operator]
    print(f"   text only (no image sent): {sorted({profile.key(c) for c in text_only.modalities})}")

    print("\n3. the same model behind mosel.http: raw captions and pixels, pre-processed server-side ...")
    from fastapi.testclient import TestClient

    body = {"inputs": {"text": rows["text"][:2], "image": rows["image"][:2].tolist()}}
    with TestClient(create_app(built)) as client:
        response = client.post("/predict", json=body, headers={"X-Deadline-Ms": "200"})
        answer = response.json()
        print(f"   POST /predict -> {response.status_code} prediction {answer.get('prediction')}, "
              f"modalities {answer.get('modalities')}")  # fmt: skip
        bad = client.post("/predict", json={"inputs": {"text": 5, "image": body["inputs"]["image"]}})
        print(f"   a caption that is not a string -> {bad.status_code} {bad.json()}")


def main(small: bool = False) -> None:
    torch.set_num_threads(1)  # a model this small gains nothing from more; on a busy host they cost dearly
    started = time.perf_counter()
    print("1. training a ViT + BERT VisionTextDualEncoderModel with modality dropout, then profiling ...")
    built = build(small)
    print(f"   trained and profiled in {time.perf_counter() - started:.0f} s")
    tour(built)
    mosel.close(built.model)
    print(f"\nhf_image_text finished in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="fewer rows and epochs (the tests' run)")
    main(parser.parse_args().small)
