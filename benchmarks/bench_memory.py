"""Peak extra memory of each verb on a 100.7M-parameter model, as a multiple of what it changes.

Issue 11 (F11) asks that every verb's peak extra memory stay within 1.5× the size of the
weights it changes, the undo copy included. The model is 6 × Linear(4096, 4096) (100.7M
parameters, 384 MiB in float32), the one global pruning used to need +5.2 GiB on.

How the peak is measured: each verb runs in a fresh subprocess (so memory freed by an
earlier verb but kept by the allocator cannot hide a later peak). The subprocess builds the
model, then writes ``5`` to ``/proc/self/clear_refs``, which resets the kernel's high-water
mark ``VmHWM`` to the current resident size; after the verb, ``VmHWM`` minus the resident
size before is the peak extra RSS. The kernel updates ``VmHWM`` on every page it maps, so
no short-lived peak is missed (a sampling thread could miss one between samples). Where
``clear_refs`` cannot be written, a thread sampling ``VmRSS`` every millisecond is used and
the table says so.

Verbs: ``prune_`` (layer and global scope), ``sensitivity``, ``sparsify_`` (after pruning
to 90%) and ``quantize_`` in its dynamic, weight-only and static int8 modes (with the
example input, so end-to-end timing and the output check run too). The table's last
column and the two lines under it say which verbs stay within :data:`LIMIT`.

Run: ``PYTHONPATH=$PWD python benchmarks/bench_memory.py`` (about two minutes on 2 cores).
``--verb NAME`` runs one verb only. The table goes to stdout; RESULTS.md is not written.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

MIB = 2**20
WIDTH, DEPTH = 4096, 6


def _status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes (``VmRSS``, ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakRSS:
    """Peak resident memory above the level at ``start()``: kernel high-water mark or sampling."""

    def __init__(self) -> None:
        self.method = "VmHWM after clear_refs"
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Reset the high-water mark (or start sampling) at the current resident size."""
        self.base = _status("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")
            if _status("VmHWM") > self.base + 4 * MIB:
                raise OSError("VmHWM was not reset")
        except OSError:
            self.method = "VmRSS sampled every 1 ms"
            self._peak = self.base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _status("VmRSS"))
            time.sleep(0.001)

    def stop(self) -> int:
        """Peak extra bytes since :meth:`start`."""
        if self._thread is None:
            return _status("VmHWM") - self.base
        self._stop.set()
        self._thread.join()
        return max(self._peak, _status("VmRSS")) - self.base


def _model():
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers = []
    for _ in range(DEPTH):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval(), torch.randn(8, WIDTH)


def _weight_bytes(model, names) -> int:
    return sum(model.get_submodule(n).weight.nbytes for n in names)


def _run(verb: str) -> dict:
    """Run one verb in this process and return its peak extra RSS and changed weights."""
    import torch

    import nbcompress as nc

    torch.set_num_threads(1)
    model, x = _model()
    linears = [str(i) for i in range(0, 2 * DEPTH - 1, 2)]
    changed: Callable[[], int]
    if verb.startswith("sparsify"):
        nc.prune_(model, 0.9, include_output=True)
        nc.history(model)  # the pruning step is the setting, not what is measured
    before = {id(p): p for p in model.parameters()}
    if verb == "prune_ layer":
        call = lambda: nc.prune_(model, 0.5)  # noqa: E731
        changed = lambda: _weight_bytes(model, linears[:-1])  # noqa: E731
    elif verb == "prune_ global":
        call = lambda: nc.prune_(model, 0.5, scope="global")  # noqa: E731
        changed = lambda: _weight_bytes(model, linears[:-1])  # noqa: E731
    elif verb == "sensitivity":

        def cheap(m):
            with torch.no_grad():
                return -float(m(x).abs().mean())

        call = lambda: nc.sensitivity(model, cheap, ratios=[0.5, 0.9], progress=False)  # noqa: E731
        # One layer is pruned at a time and restored: that layer is what changes at once.
        changed = lambda: _weight_bytes(model, linears[:1])  # noqa: E731
    elif verb == "sparsify_":
        call = lambda: nc.sparsify_(model, x, repeats=3)  # noqa: E731
        changed = lambda: sum(p.nbytes for i, p in before.items() if not _alive(model, i))  # noqa: E731
    elif verb.startswith("quantize_"):
        mode = verb.split()[1]
        calibrate = x if mode == "static" else None
        call = lambda: nc.quantize_(  # noqa: E731
            model, mode, example_inputs=x, calibrate=calibrate, repeats=3
        )
        changed = lambda: sum(p.nbytes for i, p in before.items() if not _alive(model, i))  # noqa: E731
    else:
        raise SystemExit(f"--verb: unknown verb {verb!r}; choose one of {VERBS}.")
    peak = PeakRSS()
    peak.start()
    t0 = time.perf_counter()
    call()
    seconds = time.perf_counter() - t0
    extra = peak.stop()
    params = sum(p.numel() for p in before.values())
    return dict(
        verb=verb,
        peak=extra,
        changed=changed(),
        seconds=seconds,
        method=peak.method,
        params=params,
        model_bytes=sum(p.nbytes for p in before.values()),
    )


def _alive(model, pid: int) -> bool:
    return any(id(p) == pid for p in model.parameters())


VERBS = [
    "prune_ layer",
    "prune_ global",
    "sensitivity",
    "sparsify_",
    "quantize_ dynamic",
    "quantize_ weight",
    "quantize_ static",
]
#: Issue 11 (F11): peak extra memory at most this multiple of the weights a verb changes.
LIMIT = 1.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verb", choices=VERBS, help="run one verb only")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the subprocess entry
    args = parser.parse_args()
    if args.one:
        print(json.dumps(_run(args.one)))
        return
    rows = []
    verbs = [args.verb] if args.verb else VERBS
    for verb in verbs:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        out = subprocess.run(
            [sys.executable, __file__, "--one", verb],
            capture_output=True,
            text=True,
            env=env,
            timeout=1800,
        )
        if out.returncode:
            print(f"{verb}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    if not rows:
        return
    first = rows[0]
    print(
        f"model: {DEPTH} x Linear({WIDTH}, {WIDTH}), {first['params'] / 1e6:.1f}M parameters, "
        f"{first['model_bytes'] / MIB:.0f} MiB; peak = {first['method']}; limit {LIMIT}x"
    )
    head = f"{'verb':<20}{'peak extra':>12}{'changes':>12}{'peak/changes':>14}{'peak/model':>12}"
    print(f"{head}{'time':>9}  within {LIMIT}x")
    meets, over = [], []
    for r in rows:
        ratio = r["peak"] / r["changed"] if r["changed"] else float("nan")
        (meets if ratio <= LIMIT else over).append(r["verb"])
        print(
            f"{r['verb']:<20}{r['peak'] / MIB:>8.0f} MiB{r['changed'] / MIB:>8.0f} MiB"
            f"{ratio:>13.2f}x{r['peak'] / r['model_bytes']:>11.2f}x{r['seconds']:>8.1f}s  "
            + ("yes" if ratio <= LIMIT else "NO")
        )
    print(
        "changes: prune_ = the weights it zeroes (output layer left alone); sensitivity = one "
        "layer (each trial prunes one layer and restores it); sparsify_/quantize_ = the dense "
        "weights of the layers they replaced (the undo copy is those layers themselves, kept "
        "by the history; the peak includes it). quantize_: example input given (end-to-end "
        "timing and output check), static calibrated on it."
    )
    print(f"meet the {LIMIT}x limit: {', '.join(meets) or 'none'}")
    print(f"over the {LIMIT}x limit: {', '.join(over) or 'none'}")
    failed = [v for v in verbs if v not in {r["verb"] for r in rows}]
    if failed:
        print(f"failed (see stderr): {', '.join(failed)}")


if __name__ == "__main__":
    main()
