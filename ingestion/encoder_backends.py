"""Where the embedder's transformer runs: torch (sentence-transformers), or an exported graph on ONNX Runtime
(fp32, or dynamically quantised to int8) or OpenVINO.

The exported files are made once per model and backend under a cache folder, written to a temporary folder
and renamed into place (a crash leaves no half-written model), and reused by every later load. Export uses
torch's ONNX exporter and onnxruntime's own tools (BERT graph fusions, dynamic quantisation); OpenVINO
converts the plain fp32 graph. (sentence-transformers' ``backend="onnx"`` needs optimum-onnx, whose only
release pins transformers < 4.58; the project runs transformers 5.)

A runner maps the tokenizer's features (int64 arrays of shape (batch, tokens)) to token embeddings, float32
(batch, tokens, hidden); pooling and normalisation stay the model's own sentence-transformers modules.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ingestion.model_files import ModelUnavailable

BACKENDS = ("torch", "onnx", "onnx-int8", "openvino")
EXPORT_FORMAT = 1  # bump when the way files are exported changes: old cache entries are then left unused
GRAPH = "model.onnx"
OPENVINO_GRAPH = "openvino_model.xml"
_NEEDS = {"onnx": ("onnx", "onnxruntime"), "onnx-int8": ("onnx", "onnxruntime"),
          "openvino": ("onnx", "openvino")}
log = logging.getLogger(__name__)
_FUSED_TYPES = {"bert", "roberta", "xlm-roberta"}  # onnxruntime's BERT-family fusions

Runner = Callable[[Mapping[str, np.ndarray]], np.ndarray]


def _fail(backend: str, what: str) -> ModelUnavailable:
    return ModelUnavailable(f"RAG_EMBEDDING_BACKEND={backend!r}: {what}; reinstall the project (make install) "
                            "or set RAG_EMBEDDING_BACKEND=torch")


def check_backend(backend: str) -> None:
    """ValueError for an unknown backend, ModelUnavailable (naming the setting) when its packages are missing."""
    import importlib.util

    if backend not in BACKENDS:
        raise ValueError(f"unknown embedding backend {backend!r}; known: {', '.join(BACKENDS)}")
    missing = [name for name in _NEEDS.get(backend, ()) if importlib.util.find_spec(name) is None]
    if missing:
        raise _fail(backend, f"needs the Python package(s) {', '.join(missing)}, which are not installed")


def quantization_config() -> dict[str, Any]:
    """Dynamic int8 settings for this CPU: signed per-channel weights, unsigned activations; the full 8-bit
    range where the CPU has VNNI dot products (AVX512-VNNI / AVX-VNNI), else 7 bits (AVX2, as optimum's
    avx2 preset) so the 16-bit intermediate sums cannot saturate."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    vnni = "avx512_vnni" in flags or "avx_vnni" in flags
    return {"preset": "avx512_vnni" if vnni else "avx2", "per_channel": True, "reduce_range": not vnni,
            "weight_type": "QInt8"}


def cache_folder(cache_root: Path, model_name: str, model_dir: str, backend: str) -> Path:
    """``<cache_root>/encoders/<model>-<digest>/<backend>`` (int8: ``onnx-int8-<preset>``, the CPU's quantisation
    preset): the digest covers the model's files (names, sizes, modification times) and the exporters' versions."""
    import onnx
    import torch

    files = sorted((p.relative_to(model_dir).as_posix(), p.stat().st_size, int(p.stat().st_mtime))
                   for p in Path(model_dir).rglob("*") if p.is_file())
    key = {"format": EXPORT_FORMAT, "model": model_name, "files": files, "torch": torch.__version__,
           "onnx": onnx.__version__}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_name.split("/")[-1].split(":")[-1])
    variant = f"{backend}-{quantization_config()['preset']}" if backend == "onnx-int8" else backend
    return cache_root / "encoders" / f"{slug}-{digest}" / variant


def export_graph(transformer: Any, features: Mapping[str, Any], path: Path) -> None:
    """The transformer (a Hugging Face encoder) as an fp32 ONNX graph: inputs named as the tokenizer's
    features, output ``token_embeddings`` (batch, tokens, hidden); batch and token axes dynamic."""
    import torch

    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in features]
    model = transformer.eval()
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")  # the attention pattern onnxruntime's optimizer fuses

    class Graph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            hidden: torch.Tensor = self.model(**dict(zip(names, inputs))).last_hidden_state
            return hidden

    axes = {name: {0: "batch", 1: "tokens"} for name in [*names, "token_embeddings"]}
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
            torch.onnx.export(Graph(), tuple(features[n] for n in names), str(path), input_names=names,
                              output_names=["token_embeddings"], dynamic_axes=axes, opset_version=17,
                              dynamo=False, do_constant_folding=True)
    finally:
        model.set_attn_implementation(previous)


def _write(folder: Path, transformer: Any, features: Mapping[str, Any], backend: str) -> None:
    """The backend's files in `folder` (empty, temporary)."""
    plain = folder / "plain.onnx"
    export_graph(transformer, features, plain)
    config = transformer.config
    if backend == "openvino":
        import openvino as ov

        ov.save_model(ov.convert_model(str(plain)), str(folder / OPENVINO_GRAPH), compress_to_fp16=False)
    else:
        graph = folder / GRAPH
        if config.model_type in _FUSED_TYPES:
            from onnxruntime.transformers.optimizer import optimize_model

            optimize_model(str(plain), model_type="bert", num_heads=config.num_attention_heads,
                           hidden_size=config.hidden_size).save_model_to_file(str(graph))
        else:
            shutil.copyfile(plain, graph)
        if backend == "onnx-int8":
            import onnx
            from onnxruntime.quantization import QuantType, quantize_dynamic

            fp32 = folder / "fp32.onnx"
            graph.rename(fp32)
            q = quantization_config()
            quantize_dynamic(fp32, graph, weight_type=QuantType.QInt8, per_channel=q["per_channel"],
                             reduce_range=q["reduce_range"],
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})  # fused ops' outputs
            fp32.unlink()
    plain.unlink()
    (folder / "export.json").write_text(json.dumps({"backend": backend, "model_type": config.model_type,
                                                    "inputs": sorted(features), "format": EXPORT_FORMAT}))


def exported(folder: Path, transformer: Any, features: Mapping[str, Any], backend: str) -> tuple[Path, bool]:
    """(the cached folder, whether it was exported now): made once, atomically, then reused."""
    if (folder / "export.json").is_file():
        return folder, False
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{backend}-", dir=folder.parent))
    log.info("exporting the embedding model for RAG_EMBEDDING_BACKEND=%s into %s (once)", backend, folder)
    try:
        _write(tmp, transformer, features, backend)
        try:
            tmp.rename(folder)
        except OSError:  # another process finished first: use its copy
            if not (folder / "export.json").is_file():
                raise
    except ModelUnavailable:
        raise
    except Exception as exc:
        raise _fail(backend, f"exporting the model into {folder.parent} failed ({type(exc).__name__}: {exc})") \
            from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder, True


def load_runner(folder: Path, backend: str, threads: int) -> Runner:
    """A callable running the exported graph on `threads` threads."""
    if backend == "openvino":
        import openvino as ov

        # INFERENCE_PRECISION_HINT left to OpenVINO: bf16 where the CPU has it (this one: AVX512-BF16)
        compiled = ov.Core().compile_model(str(folder / OPENVINO_GRAPH), "CPU", {"INFERENCE_NUM_THREADS": threads})
        inputs = {port.get_any_name() for port in compiled.inputs}
        return lambda features: np.asarray(compiled({k: v for k, v in features.items() if k in inputs})[0],
                                           dtype=np.float32)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # no warnings about nodes placed on the CPU
    session = ort.InferenceSession(str(folder / GRAPH), options, providers=["CPUExecutionProvider"])
    names = {node.name for node in session.get_inputs()}
    return lambda features: session.run(None, {k: v for k, v in features.items() if k in names})[0]


def build_runner(model: Any, model_name: str, model_dir: str, backend: str, cache_root: Path,
                 threads: int) -> tuple[Runner, Path, bool]:
    """(runner, its cached folder, whether it was exported now) for a loaded SentenceTransformer `model`."""
    check_backend(backend)
    folder = cache_folder(cache_root, model_name, model_dir, backend)
    features = {k: v for k, v in model.preprocess(["an example sentence", "a second one"]).items()
                if hasattr(v, "dtype")}
    folder, fresh = exported(folder, model[0].auto_model, features, backend)
    try:
        return load_runner(folder, backend, threads), folder, fresh
    except Exception as exc:
        raise _fail(backend, f"the exported model in {folder} does not load ({type(exc).__name__}: {exc}); "
                             "delete that folder to export it again") from exc
