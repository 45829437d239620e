from __future__ import annotations

import copy
import pickle
from collections.abc import Mapping

import pytest
import torch
from torch import Tensor, nn

import mosel
from mosel.spec import MARK_ATTR, Mark


@mosel.multimodal
class AV(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.v = nn.Linear(6, 3)

    @mosel.modality("audio")
    def encode_audio(self, audio: Tensor) -> Tensor:
        return self.a(audio)

    @mosel.modality("video")
    def encode_video(self, video: Tensor) -> Tensor:
        return self.v(video)

    @mosel.fusion
    def fuse(self, features: Mapping[str, Tensor]) -> Tensor:
        return sum(features.values())  # type: ignore[return-value]


def make_av() -> type[nn.Module]:
    return AV


def test_markers_return_the_function_unchanged() -> None:
    def encode(self: object, x: Tensor) -> Tensor:
        return x

    assert mosel.modality("audio")(encode) is encode
    assert getattr(encode, MARK_ATTR) == Mark("modality", "audio")

    def fuse(self: object, features: Mapping[str, Tensor]) -> Tensor:
        return next(iter(features.values()))

    assert mosel.fusion(fuse) is fuse


def test_spec_is_collected_once_and_class_stays_a_module() -> None:
    av = make_av()
    spec = mosel.spec_of(av)
    assert spec.modalities == ("audio", "video")
    assert dict(spec.branches) == {"audio": "encode_audio", "video": "encode_video"}
    assert spec.fusion == "fuse"
    assert spec.configurations == (frozenset({"audio"}), frozenset({"video"}), frozenset({"audio", "video"}))
    model = av()
    assert type(model) is av and isinstance(model, nn.Module)
    assert set(model.state_dict()) == {"a.weight", "a.bias", "v.weight", "v.bias"}
    assert mosel.spec_of(model) is spec
    # Ordinary module behaviour is untouched: copying, pickling, moving, compiling.
    clone = copy.deepcopy(model)
    assert torch.equal(clone.a.weight, model.a.weight)
    restored = pickle.loads(pickle.dumps(model))
    assert torch.equal(restored.v.bias, model.v.bias)
    assert model.to(torch.float64).a.weight.dtype == torch.float64
    assert callable(torch.compile(model))


def test_inherited_and_overridden_branches_resolve() -> None:
    av = make_av()

    @mosel.multimodal
    class WithText(av):  # type: ignore[misc,valid-type]
        @mosel.modality("text")
        def encode_text(self, text: Tensor) -> Tensor:
            return text

    assert mosel.spec_of(WithText).modalities == ("audio", "video", "text")

    @mosel.multimodal
    class Override(av):  # type: ignore[misc,valid-type]
        def encode_audio(self, audio: Tensor) -> Tensor:  # unmarked override keeps the branch
            return audio * 2

        @mosel.modality("sound")  # the same method re-marked as another modality
        def encode_video(self, video: Tensor) -> Tensor:
            return video

    spec = mosel.spec_of(Override)
    assert spec.modalities == ("audio", "sound")
    assert spec.branches["audio"] == "encode_audio"
    assert spec.branches["sound"] == "encode_video"
    # The unmarked override is what runs.
    assert torch.equal(Override().encode_audio(torch.ones(1)), torch.full((1,), 2.0))

    @mosel.multimodal
    class NewFusion(av):  # type: ignore[misc,valid-type]
        @mosel.fusion
        def combine(self, features: Mapping[str, Tensor]) -> Tensor:
            return features["audio"]

    assert mosel.spec_of(NewFusion).fusion == "combine"


def test_duplicate_modality_is_rejected() -> None:
    with pytest.raises(mosel.SpecError, match="declares modality 'audio' twice"):

        @mosel.multimodal
        class Bad(nn.Module):
            @mosel.modality("audio")
            def a(self, x: Tensor) -> Tensor:
                return x

            @mosel.modality("audio")
            def b(self, x: Tensor) -> Tensor:
                return x

            @mosel.fusion
            def f(self, feats: Mapping[str, Tensor]) -> Tensor:
                return feats["audio"]


def test_missing_or_double_fusion_and_no_modality_are_rejected() -> None:
    with pytest.raises(mosel.SpecError, match="has no fusion"):

        @mosel.multimodal
        class NoFusion(nn.Module):
            @mosel.modality("audio")
            def a(self, x: Tensor) -> Tensor:
                return x

    with pytest.raises(mosel.SpecError, match="two methods with @mosel.fusion"):

        @mosel.multimodal
        class TwoFusions(nn.Module):
            @mosel.modality("audio")
            def a(self, x: Tensor) -> Tensor:
                return x

            @mosel.fusion
            def f(self, feats: Mapping[str, Tensor]) -> Tensor:
                return feats["audio"]

            @mosel.fusion
            def g(self, feats: Mapping[str, Tensor]) -> Tensor:
                return feats["audio"]

    with pytest.raises(mosel.SpecError, match="declares no modality"):

        @mosel.multimodal
        class NoModality(nn.Module):
            @mosel.fusion
            def f(self, feats: Mapping[str, Tensor]) -> Tensor:
                return feats["audio"]


@pytest.mark.parametrize("name", ["infer", "submit", "ainfer"])
def test_clash_with_serving_methods_is_rejected(name: str) -> None:
    def user_method(self: object) -> None:
        return None

    namespace = {
        "a": mosel.modality("audio")(lambda self, x: x),
        "f": mosel.fusion(lambda self, feats: feats["audio"]),
        name: user_method,
    }
    cls = type("Clash", (nn.Module,), namespace)
    with pytest.raises(mosel.SpecError, match=f"already defines '{name}'"):
        mosel.multimodal(cls)


def test_decorating_non_functions_and_bare_modality_are_rejected() -> None:
    with pytest.raises(mosel.SpecError, match="plain method"):
        mosel.modality("audio")(staticmethod(lambda x: x))  # type: ignore[arg-type]
    with pytest.raises(mosel.SpecError, match="plain method"):
        mosel.fusion(property(lambda self: None))  # type: ignore[arg-type]
    with pytest.raises(mosel.SpecError, match="must decorate a function"):
        mosel.modality("audio")(nn.Linear)  # type: ignore[type-var]
    with pytest.raises(mosel.SpecError, match=r"write @mosel.modality\('audio'\)"):
        mosel.modality(lambda self, x: x)  # type: ignore[arg-type]
    with pytest.raises(mosel.SpecError, match="non-empty string"):
        mosel.modality("a+b")
    with pytest.raises(mosel.SpecError, match="exactly one argument after self"):
        mosel.modality("audio")(lambda self: None)
    with pytest.raises(mosel.SpecError, match="already marked"):
        mosel.fusion(mosel.modality("audio")(lambda self, x: x))
    with pytest.raises(mosel.SpecError, match="torch.nn.Module subclass"):
        mosel.multimodal(object)  # type: ignore[type-var]


def test_spec_of_undecorated_model_says_how_to_fix() -> None:
    with pytest.raises(mosel.SpecError, match="not decorated with @mosel.multimodal"):
        mosel.spec_of(nn.Linear(2, 2))


@pytest.mark.parametrize("value", [None, 0, "infer me"])
def test_reserved_names_set_to_any_value_are_refused(value: object) -> None:
    namespace = {
        "a": mosel.modality("audio")(lambda self, x: x),
        "f": mosel.fusion(lambda self, feats: feats["audio"]),
        "infer": value,
    }
    with pytest.raises(mosel.SpecError, match="already defines 'infer'"):
        mosel.multimodal(type("Clash", (nn.Module,), namespace))


@pytest.mark.parametrize("wrapper", [staticmethod, classmethod, property])
def test_a_mark_hidden_under_a_method_wrapper_is_refused(wrapper: type) -> None:
    def encode(self: object, x: object) -> object:
        return x

    namespace = {
        "a": wrapper(mosel.modality("audio")(encode)),
        "v": mosel.modality("video")(lambda self, x: x),
        "f": mosel.fusion(lambda self, feats: feats["video"]),
    }
    with pytest.raises(mosel.SpecError, match=f"is a {wrapper.__name__} wrapping a @mosel.modality"):
        mosel.multimodal(type("Hidden", (nn.Module,), namespace))
