"""The network behind the service: a run's module (PyTorch) or its ONNX export.

Both take what the image store holds, uint8 [B, 3, S, S], and return L2-normalised float32
[B, D]: scaling, normalisation and the eval resize are inside `module.embed` and inside the
exported graph alike (`shared.export.onnx`), so the service only decodes and resizes.
Both are safe to call from several threads at once (eval mode without autograd; ONNX
Runtime sessions are thread-safe).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch


class Embedder:
    """uint8 [B, 3, S, S] -> float32 [B, D], L2-normalised. `image_size` is S."""

    image_size: int
    name: str  # what /health reports
    key: str  # a content hash of the weights: a stored gallery is only used with the same key

    def embed(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def embed_all(self, images, batch_size: int = 256) -> np.ndarray:
        """Embed a large uint8 array (e.g. a memory-mapped store) a batch at a time."""
        parts = [
            self.embed(np.asarray(images[start : start + batch_size]))
            for start in range(0, len(images), batch_size)
        ]
        if not parts:
            raise ValueError("no images to embed")
        return np.concatenate(parts)


def file_key(path: str | Path) -> str:
    """The sha256 of a file's bytes (an ONNX export holds its weights): unchanged by a copy,
    a move or a `touch`, changed by any new weights."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def weights_key(module: torch.nn.Module, image_size: int) -> str:
    """The sha256 of a module's state (names, dtypes, shapes, bytes) and its input size: the
    same for the same weights whichever checkpoint file they were loaded from."""
    digest = hashlib.sha256(f"image_size={int(image_size)}".encode())
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return f"sha256:{digest.hexdigest()}"


class TorchEmbedder(Embedder):
    def __init__(
        self, module: torch.nn.Module, image_size: int, name: str, key: str | None = None
    ) -> None:
        self.module = module.eval()
        self.image_size, self.name = int(image_size), name
        self.key = key or weights_key(self.module, self.image_size)

    def embed(self, images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = self.module.embed(torch.from_numpy(np.ascontiguousarray(images)))
        return out.float().cpu().numpy()


class OnnxEmbedder(Embedder):
    """An ONNX file written by `python -m shared.export.onnx` (input `images`, output
    `embeddings`); the image size is read from the graph's input shape."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        from shared.export.onnx import onnx_session

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"onnx={str(path)!r} does not exist")
        self.session = onnx_session(path, threads)
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        if "images" not in inputs or "embeddings" not in outputs:
            raise ValueError(
                f"onnx={str(path)!r} is not an export of shared.export.onnx: inputs "
                f"{sorted(inputs)}, outputs {outputs} (expected images -> embeddings)"
            )
        shape = inputs["images"].shape
        if len(shape) != 4 or not isinstance(shape[2], int) or shape[2] != shape[3]:
            raise ValueError(f"onnx={str(path)!r}: input shape {shape} is not [B, 3, S, S]")
        self.image_size = int(shape[2])
        self.name = f"ONNX {path.name}"  # not the path: /health must not map the disk
        self.key = file_key(path)

    def embed(self, images: np.ndarray) -> np.ndarray:
        out = self.session.run(["embeddings"], {"images": np.ascontiguousarray(images)})[0]
        return out.astype(np.float32, copy=False)
