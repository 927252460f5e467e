"""An ONNX Runtime forward pass for a sentence-transformers model, exported locally from the model itself.

The whole module chain (transformer, pooling, MRL head) is traced once with ``torch.onnx.export`` into
``<onnx_dir>/<fingerprint>.onnx`` and reused afterwards; ONNX Runtime then runs it on the CPU. The vectors equal
the torch path's to float rounding (the tests check 1e-5), so retrieval quality does not change.

>>> session = OnnxForward.for_model(st_model, Path(".stella-cache/onnx"), "3f2a...", threads=2)
>>> session(st_model.preprocess(["hello"])).shape
(1, 384)
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from pathlib import Path

import numpy as np

from storage.errors import ModelUnavailableError

log = logging.getLogger(__name__)

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _traceable(st_model, names: tuple[str, ...]):
    """The traced function: token tensors in, the model's ``sentence_embedding`` out."""
    import torch

    class SentenceEmbedding(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.st = st_model

        def forward(self, *tensors):
            return self.st(dict(zip(names, tensors)))["sentence_embedding"]

    return SentenceEmbedding().eval()


class OnnxForward:
    def __init__(self, session, names: tuple[str, ...]):
        self.session = session
        self.names = names

    @classmethod
    def for_model(cls, st_model, onnx_dir: Path, fingerprint: str, threads: int) -> OnnxForward:
        """Load the cached export for ``fingerprint``, exporting it first if needed."""
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ModelUnavailableError(
                "encoder.backend 'onnx' needs onnxruntime: pip install 'stella-search[onnx]'"
            ) from exc
        sample = st_model.preprocess(["a short sample", "a somewhat longer sample sentence to trace"])
        names = tuple(name for name in INPUTS if name in sample)
        path = Path(onnx_dir) / f"{fingerprint}.onnx"
        if not path.exists():
            cls._export(st_model, sample, names, path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return cls(session, names)

    @staticmethod
    def _export(st_model, sample: dict, names: tuple[str, ...], path: Path) -> None:
        import torch

        started = time.perf_counter()
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        dynamic = {name: {0: "batch", 1: "tokens"} for name in names}
        dynamic["sentence_embedding"] = {0: "batch"}
        with torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(
                _traceable(st_model, names),
                tuple(sample[name] for name in names),
                str(partial),
                input_names=list(names),
                output_names=["sentence_embedding"],
                dynamic_axes=dynamic,
                opset_version=17,
                dynamo=False,  # the TorchScript exporter traces sentence-transformers modules as they are
            )
        os.replace(partial, path)  # concurrent exporters each write their own file; the last rename wins
        log.info("exported the model to %s for ONNX Runtime in %.1fs", path, time.perf_counter() - started)

    def __call__(self, features: dict) -> np.ndarray:
        inputs = {name: features[name].numpy() for name in self.names}
        return self.session.run(None, inputs)[0]
