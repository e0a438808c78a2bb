"""What RECO's per-query gate can see (app/fusion.py computes it): the signal names and their named sets. Torch-free,
so that a bad name is refused before torch loads."""

from __future__ import annotations

# What the gate can see, per query, from its present neighbours only (absent ones are masked out): the retrieval
# scores (top-1, margin to the last, spread), how much the neighbours' fused vectors agree with each other (mean
# pairwise cosine) and with the top-1's (mean cosine to it), the query's cosine to their mean, the share present;
# and the top-1's rival, the look-alike a fine-grained memory holds beside it: the top-1's score gap to the
# runner-up, the cosine between the two's fused vectors (do they say the same?), the query's cosine to the top-1's
GATE_SIGNALS = ("top1_score", "margin", "score_std", "agreement", "top1_agreement", "query_to_mean", "present",
                "runner_up_gap", "runner_up_agreement", "query_to_top1")
# named sets: "scores" is what the gate saw through round six (and what a model saved without the field sees)
GATE_SETS = {"scores": GATE_SIGNALS[:7], "rivals": GATE_SIGNALS}
GATE_FEATURES = GATE_SETS["scores"]


def gate_names(spec) -> tuple[str, ...]:
    """A set's name (GATE_SETS), comma-separated signal names, or a sequence of names -> the names, checked."""
    if isinstance(spec, str):
        spec = GATE_SETS.get(spec.strip()) or [x.strip() for x in spec.split(",") if x.strip()]
    names = tuple(spec)
    unknown = [x for x in names if x not in GATE_SIGNALS]
    if not names or unknown or len(set(names)) < len(names):
        raise ValueError(f"gate features take a set ({', '.join(GATE_SETS)}) or distinct names from "
                         f"{', '.join(GATE_SIGNALS)}, not {','.join(names) or 'nothing'!r}")
    return names
