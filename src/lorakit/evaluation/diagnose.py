"""Verdicts from metrics, with the design brief's remedies and the numbers behind each one.

Inputs are `metrics.sample_set_metrics` dicts: the samples of one epoch, the base model's samples (no
LoRA, same prompts and seeds), and the training images' own statistics. The thresholds are stated in
the verdicts, so a user can disagree with a number instead of with a black box.
"""
from __future__ import annotations

from dataclasses import dataclass, field

SATURATION_MARGIN = 0.05  # absolute, above the larger of training images and base model
ARTEFACT_FACTOR = 1.5  # times the larger of training images and base model
DIVERSITY_FLOOR = 0.5  # share of the base model's diversity across seeds
LEARNED_SHARE = 0.25  # share of the base->data feature distance a LoRA must close
DRIFT_LIMIT = 0.08  # RMS pixel change on unrelated prompts


@dataclass
class Verdict:
    kind: str  # "overfit", "underfit", "style baked in", "good"
    remedy: str
    evidence: dict[str, str] = field(default_factory=dict)  # metric -> "value vs threshold"

    def line(self) -> str:
        numbers = "; ".join(f"{k} {v}" for k, v in self.evidence.items())
        return f"{self.kind}: {self.remedy}" + (f" ({numbers})" if numbers else "")


def learned_share(run: dict, base: dict) -> float:
    """How much of the distance from the base model's samples to the training data the LoRA closed."""
    return (base["fidelity"] - run["fidelity"]) / max(base["fidelity"], 1e-9)


def overfit_signs(run: dict, base: dict, data: dict) -> dict[str, str]:
    signs = {}
    sat_limit = max(data["saturation"], base["saturation"]) + SATURATION_MARGIN
    if run["saturation"] > sat_limit:
        signs["saturation"] = f"{run['saturation']:.3f} > {sat_limit:.3f}"
    art_limit = max(data["artefacts"], base["artefacts"]) * ARTEFACT_FACTOR
    if run["artefacts"] > art_limit:
        signs["artefacts"] = f"{run['artefacts']:.4f} > {art_limit:.4f}"
    div_limit = base["diversity"] * DIVERSITY_FLOOR
    if run["diversity"] < div_limit:
        signs["diversity"] = f"{run['diversity']:.3f} < {div_limit:.3f}"
    return signs


def diagnose(run: dict, base: dict, data: dict, conv_dim: int = 0) -> list[Verdict]:
    """Verdicts for one sample set (an epoch of a run) against the base model and the training data."""
    verdicts = []
    signs = overfit_signs(run, base, data)
    if signs:
        verdicts.append(Verdict("overfit", "lower the learning rate, lower network_alpha/network_dim (and "
                                           "conv_alpha/conv_dim), or take an earlier epoch", signs))
    share = learned_share(run, base)
    if share < LEARNED_SHARE:
        verdicts.append(Verdict("underfit", "raise the learning rate or the dims, or train more epochs",
                                {"learned": f"{share:.0%} < {LEARNED_SHARE:.0%} of the base->data distance"}))
    elif run.get("drift", 0.0) > DRIFT_LIMIT:
        remedy = ("concept right, style baked in: lower conv_alpha only (keep network_alpha)" if conv_dim else
                  "changes unrelated prompts: lower network_alpha or apply the LoRA at a lower multiplier")
        verdicts.append(Verdict("style baked in", remedy,
                                {"drift": f"{run['drift']:.3f} > {DRIFT_LIMIT}", "learned": f"{share:.0%}"}))
    if not verdicts:
        verdicts.append(Verdict("good", "no sign of over- or underfitting at these thresholds",
                                {"learned": f"{share:.0%}"}))
    return verdicts


def best_epoch(per_epoch: dict[int, dict], base: dict, data: dict) -> tuple[int, str]:
    """The epoch closest to the data among those without overfitting signs (ties: less drift)."""
    clean = {e: m for e, m in per_epoch.items() if not overfit_signs(m, base, data)}
    pool = clean or {min(per_epoch): per_epoch[min(per_epoch)]}
    epoch = min(pool, key=lambda e: (round(pool[e]["fidelity"], 4), pool[e].get("drift", 0.0)))
    why = (f"closest to the training data (fidelity {pool[epoch]['fidelity']:.3f}) without overfitting signs"
           if clean else "every epoch shows overfitting signs: the earliest is the least affected")
    return epoch, why
