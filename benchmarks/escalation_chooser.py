"""Would a learned per-row chooser rank rows better than a confidence threshold? (issue 25, stretch)

Not part of mosel: a feasibility measurement for the next step. On the AV-Digits models of
``escalation.py offline`` (the same validation and held-out halves, 8 noise realisations each),
for transitions A -> D it compares two scores of a row's need to escalate, both from A's output
alone:

* the maximum softmax probability (what mosel uses: low probability, escalate first);
* a logistic regression fitted on the *validation* rows only (the user's model untouched) on
  features of A's softmax: the top three probabilities, the entropy, the log of the top one,
  the predicted class (one-hot) and every class probability; its target is "D is right where
  A is wrong".

Reported on the held-out rows: the AUROC of each score against that target, and the accuracy
against D's when the given share of rows (the highest need first) escalates. The shares are
set on the held-out rows themselves (a comparison of rankings, not of a fitted threshold).

Run: cd benchmarks && PYTHONPATH=../src python escalation_chooser.py [--epochs 20 6]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from scenarios import av_digits_model

from mosel.escalation import ranking_score
from mosel.spec import spec_of

SHARES = (0.1, 0.15, 0.2, 0.25, 0.3, 0.4)
TRANSITIONS = (
    ("image+audio", "image+audio+video"),
    ("audio+video", "image+audio+video"),
    ("audio", "image+audio+video"),
    ("audio", "image+audio"),
)


def logits(model: torch.nn.Module) -> list[tuple[dict[str, np.ndarray], np.ndarray]]:
    """Per half (validation, held out): every configuration's logits per row, and the targets."""
    from av_digits import data

    spec = spec_of(model)
    fuse = getattr(model, spec.fusion)
    order = np.random.default_rng(2024).permutation(540)  # the halves of escalation.py
    out = []
    for half, base in zip((order[:270], order[270:]), (1, 101)):
        per: dict[str, list[np.ndarray]] = {}
        targets = []
        for r in range(8):
            for inputs, target in data.load("test", realisation=base + r, images=half).batches(90):
                with torch.inference_mode():
                    features = {m: getattr(model, spec.branches[m])(inputs[m]) for m in spec.modalities}
                    for c in spec.configurations:
                        key = "+".join(m for m in spec.modalities if m in c)
                        per.setdefault(key, []).append(fuse({m: features[m] for m in c}).float().numpy())
                targets.append(np.asarray(target))
        out.append(({k: np.concatenate(v) for k, v in per.items()}, np.concatenate(targets)))
    return out


def features(output: np.ndarray) -> np.ndarray:
    """The chooser's features of one configuration's logits, per row."""
    shifted = np.exp(output - output.max(axis=1, keepdims=True))
    p = shifted / shifted.sum(axis=1, keepdims=True)
    top = np.sort(p, axis=1)[:, ::-1]
    entropy = -(p * np.log(p + 1e-12)).sum(axis=1)
    return np.column_stack(
        [top[:, :3], entropy, np.log(top[:, 0] + 1e-9), np.eye(p.shape[1])[p.argmax(1)], p]
    )


def losses(need: np.ndarray, low: np.ndarray, high: np.ndarray) -> str:
    """Accuracy against ``high``'s (points) when each share of rows escalates, highest need first."""
    order = np.argsort(-need, kind="stable")
    parts = []
    for share in SHARES:
        escalated = np.zeros(len(order), dtype=bool)
        escalated[order[: int(share * len(order))]] = True
        parts.append(f"{share:.0%} {100 * (np.where(escalated, high, low).mean() - high.mean()):+.2f}")
    return ", ".join(parts)


def main() -> None:
    from sklearn.linear_model import LogisticRegression

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, nargs="+", default=[20, 6])
    args = parser.parse_args()
    torch.set_num_threads(1)
    for epochs in args.epochs:
        built = av_digits_model(epochs=epochs, profile=False)
        if built is None:
            print("espeak-ng missing: AV-Digits skipped")
            return
        (validation, v_target), (held_out, h_target) = logits(built[0].eval())
        print(f"\n## AV-Digits, {epochs} epochs: {len(v_target)} validation / {len(h_target)} held-out rows")
        for a, d in TRANSITIONS:
            v_low = (validation[a].argmax(1) == v_target).astype(float)
            v_high = (validation[d].argmax(1) == v_target).astype(float)
            h_low = (held_out[a].argmax(1) == h_target).astype(float)
            h_high = (held_out[d].argmax(1) == h_target).astype(float)
            chooser = LogisticRegression(C=1.0, max_iter=2000)
            chooser.fit(features(validation[a]), (v_high > v_low).astype(int))
            learned = chooser.predict_proba(features(held_out[a]))[:, 1]
            shifted = np.exp(held_out[a] - held_out[a].max(axis=1, keepdims=True))
            probability = (shifted / shifted.sum(axis=1, keepdims=True)).max(axis=1)
            gains = (h_high > h_low).astype(float)
            print(
                f"{a} -> {d}: held-out AUROC max probability {ranking_score(-probability, gains):.3f}, "
                f"learned {ranking_score(learned, gains):.3f}\n"
                f"  accuracy vs {d} at escalated share, max probability: {losses(-probability, h_low, h_high)}\n"
                f"  learned:                                {losses(learned, h_low, h_high)}"
            )


if __name__ == "__main__":
    main()
