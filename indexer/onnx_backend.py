"""An ONNX Runtime forward pass for a sentence-transformers model, exported locally from the model itself.

The whole module chain (transformer, pooling, MRL head) is traced once with ``torch.onnx.export`` into
``<onnx_dir>/<fingerprint>.<GRAPH_VERSION>.onnx`` and reused afterwards; ONNX Runtime then runs it on the CPU.
BERT-family models are traced with eager attention and rewritten by ONNX Runtime's transformer optimizer into
fused ``Attention``, ``EmbedLayerNormalization``, ``SkipLayerNormalization`` and ``BiasGelu`` operators (the
SDPA trace hides the attention pattern from it); measured on scifact passages with MiniLM that took the fp32
graph from 1.66x to 2.0x the seed baseline, and int8 from 2.13x to 2.67x. The fused graph is checked against the
plain trace on a sample before it is kept. The vectors equal the torch path's to float rounding (the tests check
1e-5), so retrieval quality does not change.

Every cached graph is written under a temporary name and renamed when complete, so a process killed mid-export
leaves no file a later start would load; processes that need the same graph at once take turns on a lock file
beside it (``flock``): the first exports, the others wait and load its file. Temporary files of a process that
died are removed by the next export of the same graph.

>>> session = OnnxForward.for_model(st_model, Path("~/.cache/stella-search/onnx"), "3f2a...", threads=2)
>>> session(st_model.preprocess(["hello"])).shape
(1, 384)
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from storage.errors import ModelUnavailableError

log = logging.getLogger(__name__)

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
GRAPH_VERSION = "g2"  # part of the cached file names: g2 = fused BERT attention (g1 was the plain trace)
FUSABLE = {"bert"}  # model types whose trace ONNX Runtime's optimizer fuses (its "bert" patterns)
# What the default int8 recipe keeps in fp32: the FFN down projections of BERT and Qwen2/GTE layers, and every
# module after the transformer (pooling, the MRL Dense head), which runs once per text rather than per token, so
# quantising it saves nothing (on the Stella-shaped model an int8 head alone cost 0.1 of cosine)
INT8_KEEP_FP32 = (r"layer\.\d+/output/dense/MatMul$", r"/mlp/down_proj/MatMul$", r"^/st/st\.[1-9]\d*/")


@dataclass(frozen=True)
class Int8Recipe:
    """How the int8 graph is derived from the fp32 export with ``quantize_dynamic``; part of its cache key.

    Weights of the ``op_types`` nodes with a constant weight are quantised (activations dynamically, per batch):
    MatMuls, and in a fused graph the ``Attention`` nodes (their packed Q/K/V projection, which were MatMuls
    before fusion), except the nodes whose names match ``keep_fp32`` (``encoder.int8_keep_fp32``). The default
    keeps the modules after the transformer and the FFN down projections in fp32: measured on MiniLM, quantising
    the FFN down projections alone moved the sentence vectors most (1 - cosine 0.0028 of the 0.0053 that
    quantising every MatMul costs), and per-channel weight scales cut the error of per-tensor ones tenfold.
    """

    per_channel: bool = True
    reduce_range: bool = False
    weight_type: str = "QInt8"
    keep_fp32: tuple[str, ...] = INT8_KEEP_FP32
    op_types: tuple[str, ...] = ("MatMul", "Attention")

    @property
    def key(self) -> str:
        return hashlib.sha256(repr(self).encode()).hexdigest()[:8]

    def nodes_to_exclude(self, model) -> list[str]:
        """Names of the nodes of ``model`` (an ONNX ModelProto) that stay in fp32."""
        patterns = [re.compile(p) for p in self.keep_fp32]
        names = [node.name for node in model.graph.node if any(p.search(node.name) for p in patterns)]
        # onnxruntime >= 1.2x rewrites a Gemm (a Linear layer such as an MRL head) into a MatMul named
        # "<gemm>_MatMul" before quantising, and matches exclusions against the new name
        gemms = {node.name for node in model.graph.node if node.op_type == "Gemm"}
        return names + [f"{name}_MatMul" for name in names if name in gemms]


def graph_path(onnx_dir: Path, fingerprint: str, int8: Int8Recipe | None = None) -> Path:
    """Where the export of the computation ``fingerprint`` is cached (its int8 graph when ``int8``).

    >>> graph_path(Path("/cache/onnx"), "3f2a").name
    '3f2a.g2.onnx'
    """
    suffix = f".int8-{int8.key}" if int8 is not None else ""
    return Path(onnx_dir) / f"{fingerprint}.{GRAPH_VERSION}{suffix}.onnx"


def cpu_session(path: Path, threads: int = 0):
    """An ONNX Runtime session on the CPU for the graph at ``path`` (``threads`` 0: ONNX Runtime's choice)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ModelUnavailableError("encoder.backend 'onnx' needs onnxruntime: pip install onnxruntime onnx") from exc
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@contextmanager
def _export_lock(path: Path) -> Iterator[None]:
    """Hold the lock file beside ``path`` (``flock``, released by the kernel when a holder dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process writing %s", path.name)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _cached(path: Path, write: Callable[[Path], None], what: str) -> None:
    """Make ``path`` with ``write(partial)`` unless it exists: under the lock, into a temporary name renamed once
    complete and on disk; ``what`` names the work in the log line that says it was done."""
    if path.exists():
        return
    with _export_lock(path):
        if path.exists():  # another process wrote it while this one waited
            return
        temporary = f".{path.name}."
        # under the lock no live process writes this graph: what is there was left by one that died
        for leftover in path.parent.glob(f"{temporary}*"):
            log.info("removing %s, left by an interrupted export", leftover.name)
            leftover.unlink()
        partial = path.with_name(f"{temporary}{os.getpid()}.{secrets.token_hex(4)}")
        started = time.perf_counter()
        try:
            write(partial)
            with open(partial, "rb") as written:
                os.fsync(written.fileno())
            os.replace(partial, path)
        finally:
            for leftover in path.parent.glob(f"{partial.name}*"):
                leftover.unlink()
    log.info("%s: %s in %.1fs", what, path, time.perf_counter() - started)


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
    def for_model(
        cls, st_model, onnx_dir: Path, fingerprint: str, threads: int, int8: Int8Recipe | None = None
    ) -> OnnxForward:
        """Load the cached export for ``fingerprint`` (its int8 derivative when ``int8``), creating it if needed."""
        sample = st_model.preprocess(["a short sample", "a somewhat longer sample sentence to trace"])
        names = tuple(name for name in INPUTS if name in sample)
        path = graph_path(onnx_dir, fingerprint)
        _cached(path, lambda partial: _export(st_model, sample, names, partial), "exported the model for ONNX Runtime")
        if int8 is not None:
            fp32_path, path = path, graph_path(onnx_dir, fingerprint, int8)
            _cached(path, lambda partial: _quantize(fp32_path, partial, int8), f"quantised to int8 ({int8})")
        return cls(cpu_session(path, threads), names)

    def __call__(self, features: dict) -> np.ndarray:
        inputs = {name: features[name].numpy() for name in self.names}
        return self.session.run(None, inputs)[0]


def _export(st_model, sample: dict, names: tuple[str, ...], path: Path) -> None:
    """Trace the model to ``path``; fused where ONNX Runtime's optimizer knows the model type."""
    config = getattr(getattr(st_model[0], "auto_model", None), "config", None)
    if getattr(config, "model_type", None) not in FUSABLE:
        _trace(st_model, sample, names, path)
        return
    traced = path.with_name(path.name + ".trace")
    _trace(st_model, sample, names, traced, attention="eager")
    _fuse(traced, path, config, sample, names)
    traced.unlink(missing_ok=True)


def _trace(st_model, sample: dict, names: tuple[str, ...], path: Path, attention: str | None = None) -> None:
    """``torch.onnx.export`` of the module chain; ``attention`` switches the transformer's attention
    implementation for the trace only (the model is left as it was)."""
    import torch

    auto_model = getattr(st_model[0], "auto_model", None)
    before = getattr(getattr(auto_model, "config", None), "_attn_implementation", None)
    dynamic = {name: {0: "batch", 1: "tokens"} for name in names}
    dynamic["sentence_embedding"] = {0: "batch"}
    try:
        if attention is not None:
            auto_model.set_attn_implementation(attention)
        with torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(
                _traceable(st_model, names),
                tuple(sample[name] for name in names),
                str(path),
                input_names=list(names),
                output_names=["sentence_embedding"],
                dynamic_axes=dynamic,
                opset_version=17,
                dynamo=False,  # the TorchScript exporter traces sentence-transformers modules as they are
            )
    finally:
        if attention is not None and before is not None:
            auto_model.set_attn_implementation(before)


def _fuse(traced: Path, path: Path, config, sample: dict, names: tuple[str, ...]) -> None:
    """Write ONNX Runtime's fused rewrite of the graph at ``traced`` to ``path``, or the trace itself where the
    rewrite fuses no attention or does not reproduce the trace's vectors on ``sample`` (to 1e-4)."""
    import onnxruntime as ort
    from onnxruntime.transformers import optimizer

    fused = optimizer.optimize_model(
        str(traced),
        model_type="bert",
        num_heads=config.num_attention_heads,
        hidden_size=config.hidden_size,
        opt_level=0,
        use_gpu=False,
    )
    counts = fused.get_fused_operator_statistics()
    fused.save_model_to_file(str(path))
    inputs = {name: sample[name].numpy() for name in names}
    outputs = [
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, inputs)[0] for p in (traced, path)
    ]
    error = float(np.abs(outputs[0] - outputs[1]).max())
    if not counts.get("Attention") or error > 1e-4:
        log.warning("kept the plain trace: the fused graph had %s attention nodes, max error %.2g", counts, error)
        os.replace(traced, path)
        return
    log.info("fused the graph: %s", {k: v for k, v in counts.items() if v})


def _quantize(fp32_path: Path, path: Path, recipe: Int8Recipe) -> None:
    """Write the int8 graph of ``recipe`` for the fp32 export at ``fp32_path`` to ``path``."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        fp32_path,
        path,
        op_types_to_quantize=list(recipe.op_types),
        # fused operators (com.microsoft domain) defeat shape inference; their outputs are float
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        per_channel=recipe.per_channel,
        reduce_range=recipe.reduce_range,
        weight_type=QuantType[recipe.weight_type],
        nodes_to_exclude=recipe.nodes_to_exclude(onnx.load(fp32_path, load_external_data=False)),
    )
