"""The decision policies of ``quantize_``, on top of the one race helper ``timing.race``.

The race times the float layer (the incumbent, always first) and every correct quantized
candidate in interleaved rounds; the policies here turn its median paired ratios, plus each
candidate's measured output error and serialized size, into one choice:

- :func:`accurate_among_fast`: which candidate replaces a layer (accuracy may cost some
  speed, not any).
- :func:`clearly_faster`: whether a candidate beats the float layer by more than the noise
  (``only_faster``).
"""

from __future__ import annotations

from nbcompress.timing import Race

__all__ = [
    "ACCURATE",
    "NEGLIGIBLE_ERROR",
    "REFERENCE",
    "SLOWER_OK",
    "TIE",
    "TIE_SECONDS",
    "accurate_among_fast",
    "clearly_faster",
]

#: Candidates whose median ratios are within this factor of the fastest count as tied.
TIE = 1.15
#: ... or within this many seconds (tiny layers: call overhead and noise, not the kernel).
TIE_SECONDS = 10e-6
#: Candidates whose output error is within this factor of the most accurate one compete on speed.
ACCURATE = 1.2
#: A more accurate candidate may be at most this much slower than the fastest to be chosen.
SLOWER_OK = 1.5
#: Output errors (rms, relative) up to this count as equally accurate: between 0.4% and 0.8%
#: the ACCURATE rule alone picked torch.ao on LeNet-300-100 without VNNI, slower and 1.2×
#: larger at the same test accuracy. The end-to-end budget (``min_cosine``) still guards
#: the whole model.
NEGLIGIBLE_ERROR = 0.01
#: The candidate whose error bounds every other's: nbcompress's own dynamic int8, correct on
#: both CPU paths (7-bit weights without VNNI, see ``cpu.py``). A backend faster but less
#: accurate than it (int16 saturation, 7-bit activations) must not win on speed alone.
REFERENCE = "nbcompress-int8"


def _slack(race: Race) -> float:
    """:data:`TIE_SECONDS` in units of the incumbent's time (ratios are relative to it)."""
    return TIE_SECONDS / max(race.times[race.incumbent].median, 1e-12)


def accurate_among_fast(race: Race, errors: dict[str, float], sizes: dict[str, int]) -> str:
    """The candidate to keep: the smallest of the fast, accurate ones.

    Three rules, in order, over the candidates after the incumbent (``race.names[1:]``),
    once those less accurate than :data:`REFERENCE` (if it ran: error above
    :data:`ACCURATE` × its error and above :data:`NEGLIGIBLE_ERROR`) are set aside, so no
    backend wins on speed alone with a larger error than our own int8's:

    1. SLOWER_OK: only candidates at most :data:`SLOWER_OK` × the fastest one's ratio
       (+ :data:`TIE_SECONDS`) compete: accuracy may cost some speed, not any.
    2. ACCURATE: of those, the ones whose error is within :data:`ACCURATE` × the lowest
       error (or below :data:`NEGLIGIBLE_ERROR`) remain (7-bit activations doubled a
       layer's error, and three such layers of 37 took MiniLM's embedding cosine from
       0.994 to 0.989).
    3. TIE: of those, ratios within :data:`TIE` × the quickest (+ :data:`TIE_SECONDS`) are
       tied (they move that much on a shared 2-core machine); the smallest module wins,
       then the quickest.

    Args:
        race: The race of the float layer (incumbent) and the candidates.
        errors: Candidate → measured relative output error on the layer's real input.
        sizes: Candidate → serialized bytes.

    Returns:
        The chosen candidate's name.
    """
    slack = _slack(race)
    names = race.names[1:]
    if REFERENCE in names:
        bound = max(ACCURATE * errors[REFERENCE] + 1e-6, NEGLIGIBLE_ERROR)
        names = tuple(b for b in names if errors[b] <= bound)
    ratio = {name: race.ratio(name) for name in names}
    fastest = min(ratio.values())
    pool = [b for b in ratio if ratio[b] <= SLOWER_OK * fastest + slack]
    least = min(errors[b] for b in pool)
    pool = [b for b in pool if errors[b] <= max(ACCURATE * least + 1e-6, NEGLIGIBLE_ERROR)]
    quickest = min(ratio[b] for b in pool)
    near = [b for b in pool if ratio[b] <= TIE * quickest + slack]
    return min(near, key=lambda b: (sizes[b], ratio[b]))


def clearly_faster(race: Race, name: str) -> bool:
    """Whether ``name`` beats the incumbent by more than the noise band (:data:`TIE`).

    Only a clear win counts: marginal per-layer wins summed to an end-to-end loss on
    LeNet-300-100 here.
    """
    return TIE * race.ratio(name) + _slack(race) < 1
