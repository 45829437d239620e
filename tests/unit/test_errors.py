"""Errors cross process boundaries (a Ray replica to its caller) with their type and attributes."""

from __future__ import annotations

import pickle

import pytest

import mosel


@pytest.mark.parametrize(
    "error",
    [
        mosel.DeadlineError("late", deadline_ms=5.0, predicted_ms=9.0, best_accuracy_within_deadline=0.7),
        mosel.AccuracyUnreachableError("too high", min_accuracy=0.99, best_accuracy=0.9),
        mosel.QueueFullError("full"),
        mosel.ReplicaError("gone"),
    ],
)
def test_errors_pickle_with_their_attributes(error: mosel.MoselError) -> None:
    error.add_note("a note")
    restored = pickle.loads(pickle.dumps(error))
    assert type(restored) is type(error)
    assert str(restored) == str(error)
    assert restored.__dict__ == error.__dict__


def test_replica_error_is_a_runtime_error() -> None:
    assert issubclass(mosel.ReplicaError, mosel.MoselError)
    assert issubclass(mosel.ReplicaError, RuntimeError)
