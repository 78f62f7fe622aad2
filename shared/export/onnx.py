"""ONNX export of a run's embedding network (the `embed` path), checked against PyTorch.

    python -m shared.export.onnx --run-dir logs/ssl/dino/runs/<time> --out model.onnx

The graph is exactly `module.embed`: input `images` uint8 RGB [B, 3, S, S] at the run's
store resolution S (`data.image_size`), output `embeddings` float32 [B, D], L2-normalised.
Scaling to [0, 1], ImageNet normalisation and the optional `eval_size` resize are inside
the graph, so a server only decodes and resizes photos to S, as the image store does. The
batch axis is dynamic.

After export the ONNX Runtime output is compared with `embed` on real images of the run's
store (its validation rows), at the export batch size and at batch 1; the export fails if
the max abs difference exceeds `atol` (1e-4). The exporter is torch.export-based
(`torch.onnx.export(dynamo=True)`, ONNX opset 18); a network it cannot trace or convert
raises `ExportError` naming the operator.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18  # Resize with antialias (the eval_size resize) needs 18


class ExportError(RuntimeError):
    """The network cannot be exported: `op` names the operator when one is to blame."""

    def __init__(self, message: str, op: str | None = None) -> None:
        super().__init__(message)
        self.op = op


class ParityError(AssertionError):
    """ONNX Runtime and PyTorch disagree by more than the tolerance."""


class EmbedGraph(nn.Module):
    """`module.embed` as a module's forward: what gets traced."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.module.embed(images)


@dataclass
class ExportReport:
    onnx_path: str
    input_shape: list  # [batch, 3, S, S], batch dynamic
    embedding_dim: int
    opset: int
    n_images: int  # real images compared
    batch_sizes: list
    max_abs_diff: float
    atol: float
    export_seconds: float


def failing_op(exc: BaseException) -> str | None:
    """The operator an export error blames, from its message or its chained causes."""
    text = "".join(traceback.format_exception(exc))
    for pattern in (
        r"OpOverload\(op='([\w.:]+)'",  # dynamo exporter: no ONNX function for aten.x
        r"target=torch\.ops\.([\w.]+)",  # dynamo exporter: node that failed to translate
        r"operator '([\w.:]+)'",  # TorchScript exporter: operator 'aten::x' ... not supported
    ):
        match = re.search(pattern, text)
        if match:
            return match.group(1)
    return None


def export_onnx(
    module: nn.Module,
    out: str | Path,
    image_size: int,
    opset: int = DEFAULT_OPSET,
    name: str = "the module",
) -> Path:
    """Write `module.embed` as ONNX (dynamic batch) to `out`; ExportError names the op."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    graph = EmbedGraph(module).eval()
    example = torch.zeros(2, 3, image_size, image_size, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1)
    try:
        torch.onnx.export(
            graph,
            (example,),
            str(out),
            dynamo=True,
            opset_version=opset,
            input_names=["images"],
            output_names=["embeddings"],
            dynamic_shapes=({0: batch},),
            external_data=False,
            verbose=False,
        )
    except Exception as exc:
        op = failing_op(exc)
        if op:
            raise ExportError(
                f"cannot export {name} to ONNX: operator {op} has no ONNX conversion "
                f"(opset {opset}). Use a backbone without it, try another --opset, or register "
                "a translation (torch.onnx.export custom_translation_table).",
                op,
            ) from exc
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(
            f"cannot export {name} to ONNX: torch.export could not trace embed(): {first}"
        ) from exc
    return out


def onnx_session(path: str | Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def check_parity(
    module: nn.Module,
    onnx_path: str | Path,
    images: torch.Tensor,
    atol: float = 1e-4,
    batch_sizes: tuple[int, ...] = (0, 1),
) -> float:
    """Max abs difference of ONNX Runtime vs `module.embed` on `images` (uint8), at each
    batch size (0: all images in one batch). ParityError above `atol`."""
    session = onnx_session(onnx_path)
    worst = 0.0
    for bs in batch_sizes:
        bs = bs or len(images)
        for start in range(0, len(images), bs):
            x = images[start : start + bs]
            ref = module.embed(x).float().cpu().numpy()
            got = session.run(["embeddings"], {"images": x.cpu().numpy()})[0]
            if got.shape != ref.shape:
                raise ParityError(f"ONNX output {got.shape} != PyTorch {ref.shape} (batch {bs})")
            worst = max(worst, float(np.abs(got - ref).max()))
    if not worst <= atol:
        raise ParityError(
            f"ONNX Runtime differs from PyTorch by {worst:.3g} (max abs) on "
            f"{len(images)} images, above the tolerance {atol:g}"
        )
    return worst


def real_images(datamodule, n: int) -> torch.Tensor:
    """`n` stored uint8 images of the run's validation rows (train rows if there are few)."""
    datamodule.setup()
    store = datamodule.store
    rows = np.concatenate([datamodule.val_indices, datamodule.train_indices])[:n]
    return torch.as_tensor(store.images[torch.as_tensor(rows)])


def export_run(
    run_dir: str | Path,
    out: str | Path | None = None,
    which: str = "best",
    n_check: int = 32,
    atol: float = 1e-4,
    opset: int = DEFAULT_OPSET,
) -> ExportReport:
    """Load a run (`load_run`), export its `embed` to ONNX, check parity on its own images;
    the report is also written beside the model (`model.onnx` -> `model.json`)."""
    from shared.run_loading import load_run

    run = load_run(run_dir, which)
    out = Path(out) if out else Path(run_dir) / "export" / "model.onnx"
    size = int(run.config.data.image_size)
    backbone = run.config.get("backbone", {}).get("name", "?")
    name = f"{type(run.module).__name__} (backbone {backbone}) from {run.checkpoint}"
    start = time.perf_counter()
    export_onnx(run.module, out, size, opset, name)
    seconds = time.perf_counter() - start
    images = real_images(run.datamodule, n_check)
    diff = check_parity(run.module, out, images, atol)
    dim = int(run.module.embed(images[:1]).shape[-1])
    report = ExportReport(
        str(out),
        ["batch", 3, size, size],
        dim,
        opset,
        len(images),
        [len(images), 1],
        diff,
        atol,
        round(seconds, 2),
    )
    out.with_suffix(".json").write_text(json.dumps(asdict(report), indent=1))
    return report


def main(argv: list[str] | None = None) -> ExportReport:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--run-dir", required=True, help="a run directory (.hydra/ + checkpoints/)")
    p.add_argument("--out", default=None, help="ONNX file (default <run-dir>/export/model.onnx)")
    p.add_argument("--which", choices=["best", "last"], default="best")
    p.add_argument("--n-check", type=int, default=32, help="store images compared with PyTorch")
    p.add_argument("--atol", type=float, default=1e-4, help="max abs difference allowed")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    for name in ("onnx_ir", "onnxscript"):  # one INFO line per graph pass otherwise
        logging.getLogger(name).setLevel(logging.WARNING)
    report = export_run(args.run_dir, args.out, args.which, args.n_check, args.atol, args.opset)
    print(
        f"wrote {report.onnx_path}: uint8 images {report.input_shape} -> float32 "
        f"[batch, {report.embedding_dim}] (L2-normalised)"
    )
    print(
        f"parity on {report.n_images} store images, batches {report.batch_sizes}: "
        f"max abs diff {report.max_abs_diff:.2e} <= {report.atol:g}"
    )
    return report


if __name__ == "__main__":
    main()
