"""Verdicts from agreeing evidence, with the design brief's remedies and the numbers behind each signal.

Inputs are `metrics.sample_set_metrics` dicts (the samples of one epoch, the base model's samples with the same
prompts and seeds, the training images' own statistics), optionally a style detector's score in each ("style"),
and the run's validation loss (training/validation.py: fixed timesteps and noise, so it compares across
epochs). The validation loss speaks first, then the image metrics. Every verdict lists every signal with its
direction ("learned", "not learned", "overfit", "baked in", "ok") and numbers; where the signals disagree the
verdict is "mixed" and names them. "underfit" needs every learning signal to say "not learned", so it is never
given while the style metric or the loss says the style was learned.

Thresholds (each is also written into the signal's text, so a user can disagree with a number):
- validation loss, learned: at least VAL_LEARNED_DROP (5%) below the base model's value (step 0);
- validation loss, overfit: more than VAL_OVERFIT_RISE (10%) above its lowest value so far, or (caption-only
  check) more than CAPTION_ONLY_RISE (25%) above the base model's value;
- fidelity, learned: the LoRA closed at least LEARNED_SHARE (25%) of the base->data feature distance;
- style, learned: the detector's score closed at least STYLE_SHARE (10%) of the base->data gap;
- overfit in the images: saturation above max(data, base) + SATURATION_MARGIN, artefacts above
  max(data, base) x ARTEFACT_FACTOR, diversity below base x DIVERSITY_FLOOR;
- baked in: drift on unrelated prompts above DRIFT_LIMIT.
"""
from __future__ import annotations

from dataclasses import dataclass, field

SATURATION_MARGIN = 0.05  # absolute, above the larger of training images and base model
ARTEFACT_FACTOR = 1.5  # times the larger of training images and base model
DIVERSITY_FLOOR = 0.5  # share of the base model's diversity across seeds
LEARNED_SHARE = 0.25  # share of the base->data feature distance a LoRA must close
STYLE_SHARE = 0.10  # share of the base->data style-score gap: the detector counts pixels exactly on the style,
#                     so a tenth of them moving there is already a grade the eye sees
DRIFT_LIMIT = 0.08  # RMS pixel change on unrelated prompts
VAL_LEARNED_DROP = 0.05  # held-out loss this far below the base model's: it predicts unseen images better;
#                          the fixed grid and noise make smaller moves real, but not worth a verdict
VAL_OVERFIT_RISE = 0.10  # held-out loss this far above its lowest so far: fitting the training images now
#                          costs unseen ones (a grid of 5 timesteps x a few images wobbles by a few %)
CAPTION_ONLY_RISE = 0.25  # caption-only check: the training images under unrelated captions this far above the
#                           base model's loss: the LoRA damages prompts it was not trained on
LEARNING_SIGNALS = ("validation loss", "style", "fidelity")


@dataclass
class Signal:
    name: str  # "validation loss", "style", "fidelity", "saturation", "artefacts", "diversity", "drift"
    direction: str  # "learned", "not learned", "overfit", "baked in", "ok"
    detail: str  # the numbers and the threshold

    def text(self) -> str:
        return f"{self.name}: {self.direction} ({self.detail})"


@dataclass
class Verdict:
    kind: str  # "overfit", "underfit", "mixed", "style baked in", "good"
    remedy: str
    evidence: dict[str, str] = field(default_factory=dict)  # signal -> "direction: value vs threshold"
    signals: list[Signal] = field(default_factory=list)

    def line(self) -> str:
        numbers = "; ".join(f"{k} {v}" for k, v in self.evidence.items())
        return f"{self.kind}: {self.remedy}" + (f" ({numbers})" if numbers else "")

    def to_json(self) -> dict:
        return {"kind": self.kind, "line": self.line(), "evidence": self.evidence,
                "signals": [{"name": s.name, "direction": s.direction, "detail": s.detail} for s in self.signals]}


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


def validation_signal(validation: dict | None) -> Signal | None:
    """validation: {"loss", "base" (step 0), "lowest" (the lowest so far, this one included), "kind"}."""
    if not validation:
        return None
    loss, base, lowest = validation["loss"], validation["base"], validation["lowest"]
    name = "validation loss" + (" (caption-only check)" if validation["kind"] == "caption_only" else "")
    change, rise = loss / base - 1, loss / lowest - 1
    numbers = f"{loss:.4f} vs {base:.4f} for the base model ({change:+.0%}), lowest so far {lowest:.4f}"
    if rise > VAL_OVERFIT_RISE:
        return Signal(name, "overfit", f"{numbers}: {rise:+.0%} above its lowest > +{VAL_OVERFIT_RISE:.0%}")
    if validation["kind"] == "caption_only" and change > CAPTION_ONLY_RISE:
        return Signal(name, "overfit", f"{numbers}: unrelated captions {change:+.0%} > +{CAPTION_ONLY_RISE:.0%}")
    if change <= -VAL_LEARNED_DROP:
        return Signal(name, "learned", f"{numbers}; learned at <= -{VAL_LEARNED_DROP:.0%}")
    return Signal(name, "not learned", f"{numbers}; learned needs <= -{VAL_LEARNED_DROP:.0%}")


def signals(run: dict, base: dict, data: dict, validation: dict | None = None) -> list[Signal]:
    """Every signal for one epoch, the validation loss first."""
    out = [s for s in [validation_signal(validation)] if s]
    if "style" in run and "style" in base and "style" in data:
        share = (run["style"] - base["style"]) / max(data["style"] - base["style"], 1e-9)
        out.append(Signal("style", "learned" if share >= STYLE_SHARE else "not learned",
                          f"score {base['style']:.3f} -> {run['style']:.3f} (data {data['style']:.3f}): {share:.0%} "
                          f"of the gap, learned at >= {STYLE_SHARE:.0%}"))
    share = learned_share(run, base)
    out.append(Signal("fidelity", "learned" if share >= LEARNED_SHARE else "not learned",
                      f"{base['fidelity']:.3f} -> {run['fidelity']:.3f}: {share:.0%} of the base->data distance, "
                      f"learned at >= {LEARNED_SHARE:.0%}"))
    signs = overfit_signs(run, base, data)
    for metric in ("saturation", "artefacts", "diversity"):
        out.append(Signal(metric, "overfit", signs[metric]) if metric in signs else
                   Signal(metric, "ok", f"{run[metric]:.3f}, within the limit"))
    if "drift" in run:
        out.append(Signal("drift", "baked in" if run["drift"] > DRIFT_LIMIT else "ok",
                          f"{run['drift']:.3f} {'>' if run['drift'] > DRIFT_LIMIT else '<='} {DRIFT_LIMIT}"))
    return out


def _say(names: list[str], what: str) -> str:
    return f"{', '.join(names)} {'says' if len(names) == 1 else 'say'} {what}"


def kind_of(found: list[Signal]) -> tuple[str, str]:
    """(kind, why) from the signals: the validation loss first, then the images; disagreement is "mixed"."""
    val = next((s for s in found if s.name.startswith("validation loss")), None)
    burnt = [s.name for s in found if s.direction == "overfit" and s is not val]
    if val and val.direction == "overfit":
        return "overfit", f"the validation loss rose; images: {', '.join(burnt) or 'no overfitting signs yet'}"
    if burnt:
        if val:
            return "mixed", f"{_say(burnt, 'overfit')}; the validation loss says {val.direction}"
        return "overfit", _say(burnt, "overfit")
    learning = [s for s in found if s.name.split(" (")[0] in LEARNING_SIGNALS]
    yes = [s.name for s in learning if s.direction == "learned"]
    no = [s.name for s in learning if s.direction == "not learned"]
    if yes and no:
        return "mixed", f"{_say(yes, 'learned')}; {_say(no, 'not learned')}"
    if no:
        return "underfit", _say(no, "not learned")
    if any(s.name == "drift" and s.direction == "baked in" for s in found):
        return "style baked in", f"{_say(yes, 'learned')}; drift says baked in"
    return "good", f"{_say(yes, 'learned')}; no overfitting signs"


REMEDIES = {
    "overfit": "lower the learning rate, lower network_alpha/network_dim (and conv_alpha/conv_dim), or take an "
               "earlier epoch",
    "underfit": "raise the learning rate or the dims, or train more epochs",
    "mixed": "the signals disagree: judge the grid; act on the signal it confirms",
    "good": "no sign of over- or underfitting at these thresholds",
}


def diagnose(run: dict, base: dict, data: dict, conv_dim: int = 0, validation: dict | None = None) -> list[Verdict]:
    """The verdict for one sample set (an epoch of a run) against the base model and the training data, with
    every signal; validation: that epoch's validation loss (see validation_signal), when the run recorded one."""
    found = signals(run, base, data, validation)
    kind, why = kind_of(found)
    remedy = REMEDIES.get(kind)
    if kind == "style baked in":
        remedy = ("concept right, style baked in: lower conv_alpha only (keep network_alpha)" if conv_dim else
                  "changes unrelated prompts: lower network_alpha or apply the LoRA at a lower multiplier")
    evidence = {s.name: f"{s.direction}: {s.detail}" for s in found if s.direction != "ok"}
    return [Verdict(kind, f"{remedy} [{why}]", evidence, found)]


def best_epoch(per_epoch: dict[int, dict], base: dict, data: dict,
               validation: dict[int, dict] | None = None) -> tuple[int, str]:
    """The epoch with the lowest held-out validation loss among those without overfitting signs in the images;
    without a held-out loss (none recorded, or only the caption-only check), the one closest to the data
    (ties: less drift)."""
    clean = {e: m for e, m in per_epoch.items() if not overfit_signs(m, base, data)}
    held = {e: v["loss"] for e, v in (validation or {}).items() if v["kind"] == "split" and e in per_epoch}
    if held:
        pool = {e: loss for e, loss in held.items() if e in clean} or held
        epoch = min(pool, key=lambda e: (pool[e], e))
        return epoch, (f"lowest held-out validation loss ({pool[epoch]:.4f})"
                       + (" without overfitting signs in the images" if epoch in clean else
                          "; every epoch shows overfitting signs in the images"))
    pool = clean or {min(per_epoch): per_epoch[min(per_epoch)]}
    epoch = min(pool, key=lambda e: (round(pool[e]["fidelity"], 4), pool[e].get("drift", 0.0)))
    why = (f"closest to the training data (fidelity {pool[epoch]['fidelity']:.3f}) without overfitting signs"
           if clean else "every epoch shows overfitting signs: the earliest is the least affected")
    return epoch, why
