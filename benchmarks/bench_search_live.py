"""What the live view of ``%search`` costs: per redraw, per update, and on a whole search.

* **redraw**: ``SearchView.redraw()`` (the figure of N trials drawn with Agg and encoded as
  PNG) for N = 10, 100, 300 — median of repeats after a warm-up;
* **update without redraw**: ``SearchView.update()`` when the throttle says not yet (the
  progress bar and its text line);
* **whole search**: ``search(...)`` of LeNet-300-100 on digits at 90%, ``--trials`` trials,
  without a callback and with ``callback=view.update`` (+ ``view.finish``), side by side,
  median of repeats, and how many redraws the throttle let through.

Usage::

    python benchmarks/bench_search_live.py [--trials 300] [--repeats 3] [--sampler tpe]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

from nbcompress import zoo  # noqa: E402
from nbcompress.engine.search.result import SearchTrial  # noqa: E402
from nbcompress.engine.search.search import search  # noqa: E402
from nbcompress.notebook.display.search_live import SearchView  # noqa: E402


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _synthetic(n: int) -> list[SearchTrial]:
    rng = random.Random(0)
    return [SearchTrial(i, {"a": 0.5}, rng.random(), rng.random()) for i in range(n)]


def parts(repeats: int) -> None:
    model = zoo.LeNet300()
    for n in (10, 100, 300):
        view = SearchView(model, n, min_interval=1e9)  # never due: updates only
        trials = _synthetic(n)
        for i, t in enumerate(trials[:-1], start=1):
            view.update(t, i, n + 1)
        redraw = _median_ms(view.redraw, repeats)
        update = _median_ms(lambda v=view, t=trials[-1], n=n: v.update(t, n - 1, n + 1), repeats)
        print(f"{n:4d} trials: redraw {redraw:6.1f} ms · update without redraw {update:5.2f} ms")


def whole(trials: int, repeats: int, sampler: str) -> None:
    torch.manual_seed(0)
    digits = zoo.load_digits(8)
    model = zoo.train(zoo.LeNet300(), digits.x_train, digits.y_train, epochs=5)

    def accuracy(m: torch.nn.Module) -> float:  # a cost measure only: no score is reported
        return zoo.accuracy(m, digits.x_test, digits.y_test)

    def run(live: bool) -> tuple[float, int]:
        view = SearchView(model, trials, target_sparsity=0.9) if live else None
        start = time.perf_counter()
        result = search(model, accuracy, target_sparsity=0.9, n_trials=trials, seed=0,
                        sampler=sampler, progress=False,
                        callback=None if view is None else view.update)  # fmt: skip
        if view is not None:
            view.finish(result)
            view.close()
        return time.perf_counter() - start, 0 if view is None else len(view.draws)

    run(False)  # warm-up (imports, first optuna study)
    bare, live, draws = [], [], 0
    for _ in range(repeats):  # interleaved, so drift hits both arms alike
        bare.append(run(False)[0])
        seconds, draws = run(True)
        live.append(seconds)
    b, v = statistics.median(bare), statistics.median(live)
    print(
        f"{trials} trials ({sampler}): without view {b:.2f} s · with view {v:.2f} s · "
        f"ratio {v / b:.3f} · {draws} redraws ({b / trials * 1e3:.1f} ms a trial bare)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sampler", default="tpe")
    args = parser.parse_args()
    torch.set_num_threads(1)
    parts(max(args.repeats, 5))
    whole(args.trials, args.repeats, args.sampler)


if __name__ == "__main__":
    main()
