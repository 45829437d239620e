"""Issue 9 hardening: tampered plans, concurrent saves, bad metrics, hostile JSON."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mosel
from mosel.plan import accuracy_units
from mosel.testing import synthetic_profile

from .helpers import Tiny, tiny_inputs, tiny_profile

Json = Any
ALL = "audio+video+text"


@pytest.fixture(scope="module")
def profile() -> mosel.Profile:
    return tiny_profile(Tiny())


@pytest.fixture
def document(profile: mosel.Profile) -> dict[str, Json]:
    data: dict[str, Json] = json.loads(json.dumps(profile.to_json()))
    return data


def frontier(data: dict[str, Json], available: str, n: int) -> dict[str, Json]:
    found: dict[str, Json] = next(
        f for f in data["plan"]["frontiers"] if f["available"] == available and f["n"] == n
    )
    return found


def load_text(tmp_path: Path, text: str | bytes) -> mosel.Profile:
    path = tmp_path / "edited.profile.json"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return mosel.Profile.load(path)


# ---------------------------------------------------------------------------------------------
# (9) a plan edited by hand is refused on load


def inflate_best(d: Json) -> None:
    frontier(d, ALL, 4)["strategies"][-1][2] = 4 * 999_999  # "0.999999" for a 0.90 configuration


def drop_frontier(d: Json) -> None:
    d["plan"]["frontiers"].remove(frontier(d, "audio+video", 3))


def sum_past_n(d: Json) -> None:
    frontier(d, ALL, 4)["strategies"][0][0] = [["audio", 3], ["video", 3]]


def outside_available(d: Json) -> None:
    frontier(d, "audio", 4)["strategies"][0][0] = [["audio+video", 4]]


def duplicate_configuration(d: Json) -> None:
    frontier(d, "audio", 4)["strategies"][0][0] = [["audio", 2], ["audio", 2]]


def zero_count(d: Json) -> None:
    frontier(d, "audio", 4)["strategies"][0][0] = [["audio", 4], ["audio+video", 0]]


def negative_count(d: Json) -> None:
    frontier(d, ALL, 4)["strategies"][0][0] = [["audio", 6], ["video", -2]]


def wrong_latency(d: Json) -> None:
    frontier(d, "audio", 4)["strategies"][0][1] += 1


def unsorted(d: Json) -> None:
    frontier(d, ALL, 4)["strategies"].reverse()


def best_dropped(d: Json) -> None:
    del frontier(d, ALL, 4)["strategies"][-1]


def frontier_twice(d: Json) -> None:
    d["plan"]["frontiers"].append(copy.deepcopy(frontier(d, "audio", 2)))


def beyond_max_batch(d: Json) -> None:
    d["plan"]["frontiers"].append(copy.deepcopy(frontier(d, "audio", 8)) | {"n": 9})


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (inflate_best, r"frontier \(available='audio\+video\+text', n=4\), strategy \d+ claims 3999996 acc"),
        (drop_frontier, r"has no frontier \(available='audio\+video', n=3\)"),
        (sum_past_n, r"frontier \(available='audio\+video\+text', n=4\), strategy 0 has counts \[3, 3\]"),
        (outside_available, r"frontier \(available='audio', n=4\), strategy 0 uses 'audio\+video', a conf"),
        (
            duplicate_configuration,
            r"frontier \(available='audio', n=4\), strategy 0 lists a configuration tw",
        ),
        (zero_count, r"frontier \(available='audio', n=4\)\.strategies\[0\]\.groups\[\] count .* got 0"),
        (negative_count, r"frontier \(available='audio\+video\+text', n=4\)\.strategies.* count .* got 6"),
        (wrong_latency, r"frontier \(available='audio', n=4\), strategy 0 claims latency"),
        (unsorted, r"frontier \(available='audio\+video\+text', n=4\), strategy 1 .* does not improve"),
        (best_dropped, r"frontier \(available='audio\+video\+text', n=4\) ends at \d+ accuracy units"),
        (frontier_twice, r"frontier \(available='audio', n=2\) appears twice"),
        (beyond_max_batch, r"plan\.frontiers\[\d+\]\.n must lie in \[1, 8\], got 9"),
    ],
)
def test_a_tampered_plan_is_refused_on_load(
    tmp_path: Path, document: dict[str, Json], edit: Callable[[Json], None], match: str
) -> None:
    edit(document)
    with pytest.raises(mosel.ProfileError, match=match) as caught:
        load_text(tmp_path, json.dumps(document))
    assert "re-profile" in str(caught.value) or "re-create it with mosel.profile" in str(caught.value)


def test_every_frontier_of_an_intact_plan_verifies(profile: mosel.Profile) -> None:
    profile.plan.verify(profile.cost_model())
    assert mosel.Profile.from_json(profile.to_json()) == profile


# ---------------------------------------------------------------------------------------------
# (12) concurrent saves to one path


def variants(profile: mosel.Profile, count: int) -> list[mosel.Profile]:
    return [dataclasses.replace(profile, sample_count=i) for i in range(count)]


def run_threads(targets: list[Callable[[], None]]) -> list[BaseException]:
    errors: list[BaseException] = []

    def guarded(target: Callable[[], None]) -> None:
        try:
            target()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(t,)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def test_saves_that_rename_at_the_same_moment_each_land_whole(
    tmp_path: Path, profile: mosel.Profile, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every save writes its file, then all rename together: with one shared temporary name only the
    # first rename would find a file.
    path = tmp_path / "shared.profile.json"
    versions = variants(profile, 6)
    barrier = threading.Barrier(len(versions))
    real_replace = os.replace

    def replace_together(src: Any, dst: Any) -> None:
        barrier.wait(timeout=60)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_together)
    errors = run_threads([lambda p=p: p.save(path) for p in versions])
    monkeypatch.undo()
    assert errors == []
    loaded = mosel.Profile.load(path)
    assert loaded == versions[loaded.sample_count]
    assert list(tmp_path.iterdir()) == [path]


def test_many_threads_saving_to_one_path_leave_one_whole_profile(
    tmp_path: Path, profile: mosel.Profile
) -> None:
    path = tmp_path / "shared.profile.json"
    versions = variants(profile, 12)

    def save_repeatedly(p: mosel.Profile) -> None:
        for _ in range(5):
            p.save(path)

    assert run_threads([lambda p=p: save_repeatedly(p) for p in versions]) == []
    loaded = mosel.Profile.load(path)
    assert loaded == versions[loaded.sample_count]
    assert list(tmp_path.iterdir()) == [path]


def test_a_failed_save_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, profile: mosel.Profile, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "tiny.profile.json"
    profile.save(path)
    before = path.read_bytes()

    def broken_replace(src: Any, dst: Any) -> None:
        raise OSError("disk unplugged")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk unplugged"):
        dataclasses.replace(profile, sample_count=1).save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert list(tmp_path.iterdir()) == [path]


def test_a_saved_profile_gets_the_umask_mode_not_a_private_one(
    tmp_path: Path, profile: mosel.Profile
) -> None:
    old = os.umask(0o022)
    try:
        profile.save(tmp_path / "p.json")
    finally:
        os.umask(old)
    assert (tmp_path / "p.json").stat().st_mode & 0o777 == 0o644


# ---------------------------------------------------------------------------------------------
# (16) metric scores and accuracies outside [0, 1]


def scores_of(value: float) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    def metric(output: torch.Tensor, target: Any) -> torch.Tensor:
        return torch.full((output.shape[0],), value, dtype=torch.float64)

    return metric


@pytest.mark.parametrize("value", [1.5, -0.25, math.nan, math.inf])
def test_a_metric_scoring_outside_unit_interval_is_an_input_error(value: float) -> None:
    data = [(tiny_inputs(4), torch.zeros(4))]
    with pytest.raises(
        mosel.InputError,
        match=rf"metric scores_of.<locals>.metric scored a request {value} under configuration 'audio'; "
        rf"a metric must return per-request scores in \[0, 1\]",
    ):
        mosel.profile(
            Tiny().eval(),
            data,
            metric=scores_of(value),
            max_batch_size=2,
            warmup=0,
            repeats=1,
            cost_checks=0,
            progress=False,
        )


def test_a_metric_returning_one_score_per_element_is_refused() -> None:
    def per_class(output: torch.Tensor, target: Any) -> torch.Tensor:
        return torch.ones(output.shape[0], 3)

    with pytest.raises(mosel.InputError, match=r"one score per request, shape \(4,\), got \(4, 3\)"):
        mosel.profile(
            Tiny().eval(),
            [(tiny_inputs(4), torch.zeros(4))],
            metric=per_class,
            max_batch_size=2,
            cost_checks=0,
        )


def test_a_complex_metric_and_a_failing_metric_are_input_errors() -> None:
    def complex_scores(output: torch.Tensor, target: Any) -> torch.Tensor:
        return torch.ones(output.shape[0], dtype=torch.complex64)

    with pytest.raises(mosel.InputError, match="complex scores"):
        mosel.profile(
            Tiny().eval(),
            [(tiny_inputs(4), torch.zeros(4))],
            metric=complex_scores,
            max_batch_size=2,
            cost_checks=0,
        )
    with pytest.raises(mosel.InputError, match="one entry per request"):  # top-1 against 3 targets for 4 rows
        mosel.profile(Tiny().eval(), [(tiny_inputs(4), torch.zeros(3))], max_batch_size=2, cost_checks=0)


@pytest.mark.parametrize("value", [math.nan, 1.5, -0.1])
def test_accuracies_outside_unit_interval_are_refused_clearly(profile: mosel.Profile, value: float) -> None:
    accuracy = dict.fromkeys(["audio", "video", "text", "audio+video", "audio+text", "video+text", ALL], 0.5)
    with pytest.raises(mosel.ProfileError, match=rf"accuracy of configuration 'video' is {value}"):
        synthetic_profile(
            Tiny,
            branch_us={m: [1.0, 2.0] for m in ("audio", "video", "text")},
            accuracy=accuracy | {"video": value},
        )
    bad = dict(profile.accuracy) | {frozenset({"audio"}): value}
    with pytest.raises(mosel.ProfileError, match=rf"accuracy of configuration 'audio' is {value}.*\[0, 1\]"):
        dataclasses.replace(profile, accuracy=bad)
    with pytest.raises(ValueError, match=r"finite number in \[0, 1\]"):
        accuracy_units(value)


# ---------------------------------------------------------------------------------------------
# (18) hostile JSON: only ProfileError comes out


def nested(depth: int) -> Json:
    value: Json = []
    for _ in range(depth):
        value = [value]
    return value


def valid_text(profile: mosel.Profile) -> str:
    return json.dumps(profile.to_json())


HOSTILE_TEXTS: dict[str, Callable[[str], str | bytes]] = {
    "deep array": lambda t: "[" * 100_000 + "]" * 100_000,
    "deep object": lambda t: '{"a":' * 100_000 + "1" + "}" * 100_000,
    "deep field": lambda t: t.replace(
        '"sample_count": 1000', '"sample_count": ' + "[" * 100_000 + "]" * 100_000
    ),
    "5000-digit version": lambda t: t.replace('"version": 3', '"version": ' + "9" * 5000),
    "5000-digit batch size": lambda t: t.replace('"max_batch_size": 8', '"max_batch_size": ' + "9" * 5000),
    "version true": lambda t: t.replace('"version": 3', '"version": true'),
    "version 1.0": lambda t: t.replace('"version": 3', '"version": 3.0'),
    "version string": lambda t: t.replace('"version": 3', '"version": "2"'),
    "NaN accuracy": lambda t: t.replace('"audio": 0.6', '"audio": NaN'),
    "Infinity latency": lambda t: t.replace('"median_us": [110.0', '"median_us": [Infinity'),
    "-Infinity build time": lambda t: t.replace('"build_seconds": ', '"build_seconds": -Infinity, "x": '),
    "huge max_batch_size": lambda t: t.replace('"max_batch_size": 8', '"max_batch_size": 1000000000000'),
    "huge float": lambda t: t.replace('"audio": 0.6', '"audio": 1e999'),
    "accuracy string": lambda t: t.replace('"audio": 0.6', '"audio": "0.6"'),
    "sample_count float": lambda t: t.replace('"sample_count": 1000', '"sample_count": 1000.0'),
    "fingerprint list": lambda t: t.replace('"fingerprint": {', '"fingerprint": [], "x": {'),
    "plan string": lambda t: t.replace('"plan": {', '"plan": "plan", "x": {'),
    "exact string": lambda t: t.replace('"exact": true', '"exact": "true"'),
    "empty": lambda t: "",
    "null": lambda t: "null",
    "a number": lambda t: "1",
    "not UTF-8": lambda t: b"\xff\xfe" + t.encode(),
    "nul bytes": lambda t: t[:100] + "\0" + t[100:],
}


@pytest.mark.parametrize("name", sorted(HOSTILE_TEXTS))
def test_hostile_json_files_raise_profile_error(tmp_path: Path, profile: mosel.Profile, name: str) -> None:
    text = valid_text(profile)
    hostile = HOSTILE_TEXTS[name](text)
    assert hostile != text
    with pytest.raises(mosel.ProfileError) as caught:
        load_text(tmp_path, hostile)
    assert isinstance(caught.value, (mosel.MoselError, ValueError))


def replaced(data: dict[str, Json], key: str, value: Json) -> dict[str, Json]:
    return data | {key: value}


HOSTILE_OBJECTS: dict[str, Callable[[dict[str, Json]], Json]] = {
    "deep list as version": lambda d: replaced(d, "version", nested(100_000)),
    "deep list as plan": lambda d: replaced(d, "plan", nested(100_000)),
    "deep list as modalities": lambda d: replaced(d, "modalities", nested(100_000)),
    "5000-digit version": lambda d: replaced(d, "version", 10**5000),
    "5000-digit max_batch_size": lambda d: replaced(d, "max_batch_size", 10**5000),
    "5000-digit accuracy": lambda d: replaced(d, "accuracy", d["accuracy"] | {"audio": 10**5000}),
    "NaN accuracy": lambda d: replaced(d, "accuracy", d["accuracy"] | {"audio": math.nan}),
    "version True": lambda d: replaced(d, "version", True),
    "tuple as modalities": lambda d: replaced(d, "modalities", ("audio", "video", "text")),
    "set as groups": lambda d: replaced(d, "cost_checks", [{"groups": {1, 2}}]),
    "non-string keys": lambda d: replaced(d, "accuracy", {1: 0.5}),
    "60 modalities": lambda d: replaced(d, "modalities", [f"m{i}" for i in range(60)]),
    "huge batch": lambda d: replaced(d, "max_batch_size", 10**12),
    "object()": lambda d: replaced(d, "fingerprint", object()),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_OBJECTS))
def test_hostile_objects_raise_profile_error(document: dict[str, Json], name: str) -> None:
    with pytest.raises(mosel.ProfileError):
        mosel.Profile.from_json(HOSTILE_OBJECTS[name](document))


@pytest.fixture(scope="module")
def document_paths(profile: mosel.Profile) -> tuple[str, list[tuple[str | int, ...]]]:
    text = valid_text(profile)
    return text, paths(json.loads(text))


def paths(value: Json, prefix: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    """Every path into a JSON document (the root excluded)."""
    children: list[tuple[str | int, Json]] = []
    if isinstance(value, dict):
        children = list(value.items())
    elif isinstance(value, list):
        children = list(enumerate(value))
    out = []
    for key, child in children:
        out.append((*prefix, key))
        out += paths(child, (*prefix, key))
    return out


REPLACEMENTS: list[Json] = [
    None,
    True,
    False,
    0,
    -1,
    1,
    7,
    2**63,
    10**40,
    0.5,
    1.5,
    -0.0,
    math.nan,
    math.inf,
    "",
    "x",
    "audio",
    "audio+video",
    "1",
    [],
    {},
    [1],
    [[1, 2, 3]],
    {"a": 1},
    nested(50),
]


@st.composite
def mutations(draw: st.DrawFn, text: str, where: list[tuple[str | int, ...]]) -> dict[str, Json]:
    """The document ``text`` with one to three values deleted, replaced or re-typed.

    ``where`` lists the paths of the unmutated document; a path an earlier mutation removed is skipped.
    """
    data: dict[str, Json] = json.loads(text)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(where))
        parent: Json = data
        try:
            for key in path[:-1]:
                parent = parent[key]
            if draw(st.booleans()):
                del parent[path[-1]]
            else:
                parent[path[-1]] = copy.deepcopy(draw(st.sampled_from(REPLACEMENTS)))
        except (KeyError, IndexError, TypeError):
            continue
    return data


def valid_or_profile_error(read: Callable[[], mosel.Profile]) -> None:
    """``read()`` raises nothing but ProfileError, and what it returns round-trips."""
    try:
        loaded = read()
    except mosel.ProfileError:
        return
    assert mosel.Profile.from_json(loaded.to_json()) == loaded


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_mutated_profiles_load_or_raise_profile_error(
    tmp_path: Path, document_paths: tuple[str, list[tuple[str | int, ...]]], data: st.DataObject
) -> None:
    mutated = data.draw(mutations(*document_paths))
    valid_or_profile_error(lambda: mosel.Profile.from_json(mutated))
    text = json.dumps(mutated)  # NaN and Infinity come out as the literals a file may hold
    valid_or_profile_error(lambda: load_text(tmp_path, text))


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(cut=st.integers(0, 10**6), insert=st.sampled_from(["", "[", "]", "{", "}", ",", '"', "0", "-", "e9"]))
def test_damaged_files_load_or_raise_profile_error(
    tmp_path: Path, profile: mosel.Profile, cut: int, insert: str
) -> None:
    text = valid_text(profile)
    at = cut % (len(text) + 1)
    valid_or_profile_error(lambda: load_text(tmp_path, text[:at] + insert + text[at + 1 :]))
