"""What a profile was measured on: the :class:`Fingerprint` of a model, its device and threads."""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mosel.compiling import compiled_parts
from mosel.jsonvalues import json_dict, json_field, json_int, json_list, json_str

__all__ = ["Fingerprint", "fingerprint_of", "model_device"]


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """What a profile was measured on: device, torch version, model class and weights.

    ``dtype`` is the dtype of the model's first parameter (``""``: not recorded, an older
    profile), ``compiled`` the branches and fusion compiled with
    :func:`mosel.compile_branches` when it was measured, ``threads`` torch's intra-op thread
    count then (0: not recorded).
    """

    device: str
    torch_version: str
    model_class: str
    parameter_checksum: str
    dtype: str = ""
    compiled: tuple[str, ...] = ()
    threads: int = 0

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "device": self.device,
            "torch_version": self.torch_version,
            "model_class": self.model_class,
            "parameter_checksum": self.parameter_checksum,
            "dtype": self.dtype,
            "compiled": list(self.compiled),
            "threads": self.threads,
        }

    @classmethod
    def from_json(cls, data: Any) -> Fingerprint:
        """Inverse of :meth:`to_json`; ValueError on malformed data."""
        data = json_dict(data, "fingerprint")
        fields = ("device", "torch_version", "model_class", "parameter_checksum")
        values = [json_str(json_field(data, f, "fingerprint"), f"fingerprint.{f}") for f in fields]
        dtype = json_str(data.get("dtype", ""), "fingerprint.dtype")
        compiled = json_list(data.get("compiled", []), "fingerprint.compiled")
        threads = json_int(data.get("threads", 0), "fingerprint.threads", low=0)
        device, torch_version, model_class, checksum = values
        return cls(
            device, torch_version, model_class, checksum, dtype,
            tuple(json_str(c, "fingerprint.compiled[]") for c in compiled), threads,
        )  # fmt: skip


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with neither)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def fingerprint_of(model: nn.Module, model_class: str) -> Fingerprint:
    """Fingerprint a model: device, torch version, class and a checksum of its parameters.

    The checksum hashes names, shapes, dtypes and rounded float64 sums of each tensor, so it is
    cheap on any device and stable across devices for the same weights.
    """
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            if tensor.numel() and (tensor.is_floating_point() or tensor.dtype in (torch.int64, torch.int32)):
                t = tensor.detach().to(torch.float64)
                digest.update(f"{float(t.sum()):.6e}:{float(t.abs().sum()):.6e}".encode())
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return Fingerprint(
        device=_device_name(model_device(model)),
        torch_version=torch.__version__,
        model_class=model_class,
        parameter_checksum=digest.hexdigest()[:16],
        dtype="" if first is None else str(first.dtype),
        compiled=compiled_parts(model),
        threads=torch.get_num_threads(),
    )
