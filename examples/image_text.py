"""Worked example: a CLIP-style image + text classifier whose text arrives as token ids and masks.

What a user of Hugging Face-style models has: the text modality is a dict of two tensors
(``input_ids``, int64, and ``attention_mask``, bool), padded to a fixed length; the text tower is
a small transformer encoder that honours the padding mask; the image tower is a small CNN. The
model is an ordinary ``nn.Module`` with its own ``forward``; mosel only needs the three marks.

The task is synthetic and seeded (ten classes; each image is a noisy class template; each
caption holds a few class words among filler words, at a random length), so the example runs
in about a minute on a CPU and needs no download. It trains with modality dropout, profiles,
serves a few jobs under SLOs, and serves one request over HTTP (``mosel.http``) with the token
ids kept as integers.

Run: python examples/image_text.py
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

import mosel

CLASSES = 10
VOCAB = 64
PAD = 0
MAX_LEN = 24
FILLER = range(42, VOCAB)  # words that say nothing about the class


def class_words(c: int) -> list[int]:
    """Three words per class: its own, and one shared with each neighbour (text alone is ambiguous)."""
    return [2 + 2 * c, 3 + 2 * c, 3 + 2 * ((c - 1) % CLASSES)]


def make_split(n: int, seed: int) -> tuple[dict[str, Tensor | dict[str, Tensor]], Tensor]:
    """``n`` labelled requests: ``{"image": (n, 1, 16, 16), "text": {"input_ids", "attention_mask"}}``."""
    gen = torch.Generator().manual_seed(seed)
    templates = torch.randn(CLASSES, 1, 16, 16, generator=torch.Generator().manual_seed(1234))
    labels = torch.randint(0, CLASSES, (n,), generator=gen)
    images = templates[labels] + 1.2 * torch.randn(n, 1, 16, 16, generator=gen)
    ids = torch.full((n, MAX_LEN), PAD, dtype=torch.int64)
    lengths = torch.randint(4, MAX_LEN + 1, (n,), generator=gen)
    for i in range(n):
        length = int(lengths[i])
        filler = torch.tensor(list(FILLER))[torch.randint(0, len(FILLER), (length,), generator=gen)]
        ids[i, :length] = filler
        if float(torch.rand((), generator=gen)) < 0.85:  # one class word, maybe a shared one
            slot = int(torch.randint(0, length, (1,), generator=gen))
            ids[i, slot] = class_words(int(labels[i]))[int(torch.randint(0, 3, (1,), generator=gen))]
    mask = torch.arange(MAX_LEN)[None, :] < lengths[:, None]
    return {"image": images, "text": {"input_ids": ids, "attention_mask": mask}}, labels


def rows(inputs: Mapping[str, Tensor | dict[str, Tensor]], index: Tensor | slice) -> dict[str, object]:
    """The requests ``index`` of a split's inputs (every leaf sliced along its first dimension)."""
    text = inputs["text"]
    assert isinstance(text, dict)
    image = inputs["image"]
    assert isinstance(image, Tensor)
    return {"image": image[index], "text": {k: v[index] for k, v in text.items()}}


def batches(
    inputs: Mapping[str, Tensor | dict[str, Tensor]], labels: Tensor, size: int = 100
) -> Iterator[tuple[dict[str, object], Tensor]]:
    for start in range(0, len(labels), size):
        yield rows(inputs, slice(start, start + size)), labels[start : start + size]


@mosel.multimodal
class ImageText(nn.Module):
    """Image tower (CNN) and text tower (transformer over token ids, padding-aware), late fusion."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.image_tower = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(32, width),
        )  # fmt: skip
        self.embed = nn.Embedding(VOCAB, width, padding_idx=PAD)
        self.position = nn.Parameter(0.02 * torch.randn(MAX_LEN, width))
        layer = nn.TransformerEncoderLayer(width, 4, 2 * width, dropout=0.0, batch_first=True)
        self.text_tower = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        # Late fusion by summed per-modality logits: any subset of modalities is a valid input.
        self.heads = nn.ModuleDict({m: nn.Linear(width, CLASSES) for m in ("image", "text")})

    @mosel.modality("image")
    def encode_image(self, image: Tensor) -> Tensor:
        return self.image_tower(image)

    @mosel.modality("text")
    def encode_text(self, text: Mapping[str, Tensor]) -> Tensor:
        ids, mask = text["input_ids"], text["attention_mask"]
        hidden = self.text_tower(self.embed(ids) + self.position[: ids.shape[1]], src_key_padding_mask=~mask)
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)  # mean over real tokens

    @mosel.fusion
    def fuse(self, features: Mapping[str, Tensor]) -> Tensor:
        return torch.stack([self.heads[m](f) for m, f in features.items()]).sum(0)

    def forward(self, image: Tensor, text: Mapping[str, Tensor]) -> Tensor:
        """The model's own forward (what ``infer`` bypasses): every modality."""
        return self.fuse({"image": self.encode_image(image), "text": self.encode_text(text)})


def build(epochs: int = 12, train_size: int = 3000) -> tuple[ImageText, mosel.Profile, tuple[object, Tensor]]:
    """Train with modality dropout, profile on this machine; returns the model, profile, test split."""
    torch.manual_seed(0)
    model = ImageText()
    train_inputs, train_labels = make_split(train_size, seed=1)
    mosel.train_with_modality_dropout(
        model, lambda: batches(train_inputs, train_labels, 64), epochs=epochs, drop_probability=0.5
    )
    test_inputs, test_labels = make_split(1000, seed=2)
    profile = mosel.profile(
        model,
        batches(test_inputs, test_labels),
        max_batch_size=16,
        batch_sizes=[1, 2, 4, 8, 16],
        progress=False,
    )
    return model, profile, (test_inputs, test_labels)


def main() -> None:
    started = time.perf_counter()
    print(
        "1. training ImageText (CNN image tower, transformer text tower over token ids), modality dropout ..."
    )
    model, profile, (test_inputs, test_labels) = build()
    print(f"   trained and profiled in {time.perf_counter() - started:.0f} s")
    for config, accuracy in profile.accuracy.items():
        print(
            f"   {profile.key(config):<11} accuracy {accuracy:.3f} +/- {profile.accuracy_stderr(config):.3f}"
        )
    for name, table in profile.branch_latency.items():
        print(
            f"   {name:<5} branch: {table.at(1) / 1000:.3f} ms at b=1, {table.at(16) / 1000:.3f} ms at b=16"
        )

    assert isinstance(test_inputs, dict)
    print("\n2. serving: structured text input {'input_ids': int64, 'attention_mask': bool} ...")
    job = rows(test_inputs, slice(0, 8))
    full = model.infer(job)  # type: ignore[operator]
    same = model(job["image"], job["text"])
    assert torch.allclose(full.output, same, atol=1e-5), "infer with every modality equals forward"
    print(f"   no SLO: every modality, equal to forward(); modalities {sorted(full.modalities[0])}")
    frontier = profile.plan.frontier(frozenset(profile.modalities), 8)
    fastest_ms = frontier.strategies[0].predicted_latency_ms
    slowest_ms = frontier.best.predicted_latency_ms
    for deadline_ms in (
        round(3 * slowest_ms, 2),
        round((fastest_ms + slowest_ms) / 2, 2),
        round(fastest_ms / 3, 2),
    ):
        try:
            result = model.infer(job, deadline_ms=deadline_ms, min_accuracy=0.5)  # type: ignore[operator]
        except mosel.DeadlineError as exc:
            print(f"   deadline {deadline_ms} ms: DeadlineError ({str(exc)[:60]}...)")
            continue
        correct = int((result.output.argmax(-1) == test_labels[:8]).sum())
        used = sorted({profile.key(c) for c in result.modalities})
        print(
            f"   deadline {deadline_ms} ms: {used}, expected accuracy {result.expected_accuracy:.3f}, "
            f"{correct}/8 correct, {result.completion_ms:.2f} ms; reason: {result.reason}"
        )
    # No SLO here: the point is the modalities, and a busy host's prices could refuse a deadline.
    text_only = model.infer({"text": job["text"]})  # type: ignore[operator]
    print(f"   text only (no image sent): {sorted({profile.key(c) for c in text_only.modalities})}")

    print("\n3. the same model behind mosel.http (token ids stay integers) ...")
    from fastapi.testclient import TestClient

    from mosel.http import create_app

    one = rows(test_inputs, slice(0, 1))
    text = one["text"]
    assert isinstance(text, dict)
    inputs = {"image": one["image"].tolist(), "text": {k: v.tolist() for k, v in text.items()}}  # type: ignore[attr-defined]
    with TestClient(create_app(model)) as client:
        response = client.post("/predict", json={"inputs": inputs}, headers={"X-Deadline-Ms": "100"})
    answer = response.json()
    fields = ("prediction", "modalities", "expected_accuracy", "deadline_met", "error")
    shown = {k: answer.get(k) for k in fields}
    print(f"   POST /predict -> {response.status_code} {shown}")
    print(f"\nimage_text finished in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
