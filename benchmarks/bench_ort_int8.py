"""Dense int8 against ONNX Runtime's whole-model int8, at its default and at equal accuracy.

``quantize_(m, "dynamic")`` (per-layer race, Sequential runs and whole submodules as ORT
graphs) against the model exported by ``torch.onnx.export`` and quantized by
``onnxruntime.quantization.quantize_dynamic``: as ``bench_runtimes.py`` does (every MatMul,
Gather etc., QInt8 weights), and restricted to the weight MatMuls (``op_types_to_quantize=
["MatMul"]``, the activation×activation MatMuls of attention in ``nodes_to_exclude``,
per-channel weights): ONNX Runtime at the accuracy of nbcompress's int8. One process,
interleaved rounds, medians; ratios to torch eager fp32 (> 1 = faster), then max relative
error and lowest per-sample cosine. Variants of nbcompress: ``NBCOMPRESS_ORT_BLOCKS=0``
(per-layer and Sequential runs only, as before whole-block graphs existed).

    python benchmarks/bench_ort_int8.py --models ffn,minilm --batches 1,8 --threads 1,2
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as bench_runtimes.py
os.environ.setdefault("NBCOMPRESS_TUNING", "off")
sys.path.insert(0, str(Path(__file__).parent))

import bench_runtimes as br  # noqa: E402
import torch  # noqa: E402

import nbcompress as nc  # noqa: E402
from nbcompress.timing import race  # noqa: E402


def weight_matmuls_only(fp32: Path, out: Path) -> None:
    """ORT dynamic int8 of the MatMuls with a constant weight only, per channel."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(fp32))
    consts = {i.name for i in model.graph.initializer}
    consts |= {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    activations = [
        n.name
        for n in model.graph.node
        if n.op_type == "MatMul" and not any(i in consts for i in n.input)
    ]
    quantize_dynamic(
        fp32,
        out,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul"],
        nodes_to_exclude=activations,
        per_channel=True,
    )


def ort_session(path: Path, threads: int):
    """A session as bench_runtimes builds it (sequential, no spinning, all optimizations)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def nbc(model: torch.nn.Module, x: tuple, blocks: bool) -> torch.nn.Module:
    q = copy.deepcopy(model)
    old = os.environ.get("NBCOMPRESS_ORT_BLOCKS")
    os.environ["NBCOMPRESS_ORT_BLOCKS"] = "1" if blocks else "0"
    try:
        nc.quantize_(q, "dynamic", example_inputs=x, repeats=5)
    finally:
        if old is None:
            del os.environ["NBCOMPRESS_ORT_BLOCKS"]
        else:
            os.environ["NBCOMPRESS_ORT_BLOCKS"] = old
    return q


def export(model: torch.nn.Module, spec: br.ModelSpec) -> Path:
    """The fp32 export and both int8 variants, in a new folder."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    folder = Path(tempfile.mkdtemp())
    with contextlib.redirect_stdout(io.StringIO()):
        br._export(model, spec.inputs(2), folder / "m.onnx", dynamo=True, seq=spec.seq)
    quantize_dynamic(folder / "m.onnx", folder / "all.onnx", weight_type=QuantType.QInt8)
    weight_matmuls_only(folder / "m.onnx", folder / "weights.onnx")
    return folder


def row(name: str, spec: br.ModelSpec, model, folder: Path, batch: int, threads: int, args):
    """One markdown row: every runtime raced on one input."""
    torch.set_num_threads(threads)
    x = spec.inputs(batch)
    runs = {"torch fp32": lambda: model(*x)}
    for label, file in (("ORT int8", "all.onnx"), ("ORT int8 weight MatMuls", "weights.onnx")):
        session = ort_session(folder / file, threads)
        feeds = {i.name: t.numpy() for i, t in zip(session.get_inputs(), x, strict=True)}
        runs[label] = lambda s=session, f=feeds: torch.from_numpy(s.run(None, f)[0])
    for label, blocks in (("nbc int8", True), ("nbc int8 no blocks", False)):
        q = nbc(model, x, blocks)
        runs[label] = lambda q=q: q(*x)
    with torch.inference_mode():
        ref = model(*x)
        errors = {n: br.output_error(f(), ref) for n, f in runs.items()}
        timed = race(runs, rounds=args.rounds, warmup=2, min_sample=2e-4)
    cells = [f"{timed.times['torch fp32'].median * 1e3:.2f} ms"]
    for n in list(runs)[1:]:
        err, cos = errors[n]
        cells.append(f"{1 / timed.ratio(n):.2f}× · {err:.1e} · {cos:.4f}")
    return f"| {name} | {threads} | {batch} | " + " | ".join(cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="ffn,minilm")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--threads", default="1")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    print(
        "| model | threads | batch | torch fp32 | ORT int8 | ORT int8 weight MatMuls | "
        "nbc int8 | nbc int8 no blocks |\n|---|---|---|---|---|---|---|---|"
    )
    for name in args.models.split(","):
        spec = br.MODELS[name]
        model = spec.build()
        folder = export(model, spec)
        for threads in map(int, args.threads.split(",")):
            for batch in map(int, args.batches.split(",")):
                print(row(name, spec, model, folder, batch, threads, args), flush=True)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
