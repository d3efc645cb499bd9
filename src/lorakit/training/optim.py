"""Optimizers, LR schedules and the after-step max-norm, with kohya's names and meaning.

    optimizer = make_optimizer("SGDNesterov", network.param_groups(...), 1e-4, device, ["momentum=0.95"])
    scheduler = make_scheduler("cosine_with_restarts", optimizer, warmup_steps(0.1, 800), 800, num_cycles=3)

`optimizer_args` and `lr_scheduler_args` are kohya's `key=value` strings with values read by ast.literal_eval;
every key is checked against the optimizer's (or schedule's) signature, so a typo is a ConfigError naming it.
Schedules are transformers' (diffusers' for piecewise_constant), called with the arguments kohya's
train_util.get_scheduler_fix passes. `optimization_checks(config)` runs all of this when the config is read.
"""
from __future__ import annotations

import ast
import importlib
import inspect
from dataclasses import dataclass, field

import torch

from lorakit.training.config import ConfigError, did_you_mean


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023): update = sign(β1·m + (1-β1)·g); m ← β2·m + (1-β2)·g; decoupled weight decay.
    Use about 1/3-1/10 of AdamW's learning rate."""

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(m * beta1 + p.grad * (1 - beta1)), alpha=-group["lr"])
                m.mul_(beta2).add_(p.grad, alpha=1 - beta2)
        return loss


# ---- key=value arguments ---------------------------------------------------------------------------------------
class MissingPackage(ConfigError):
    """The optimizer lives in a package that is not installed (the message says which)."""


def parse_kwargs(items: list[str] | None, key: str) -> dict[str, object]:
    """kohya's ["name=value", ...] -> {name: ast.literal_eval(value)}.

    The config loader splits a command-line string at commas, so an item without "=" continues the value
    before it: "betas=0.9", "0.99" is betas=(0.9, 0.99), as the TOML item "betas=0.9,0.99" is."""
    joined: list[str] = []
    for item in (str(i).strip() for i in items or []):
        if "=" in item or not joined:
            joined.append(item)
        else:
            joined[-1] += "," + item
    out: dict[str, object] = {}
    for item in joined:
        name, eq, text = item.partition("=")
        name, text = name.strip(), text.strip()
        if not eq or not name.isidentifier():
            raise ConfigError(f'{key} item {item!r} is not name=value (e.g. "weight_decay=0.1")')
        try:
            out[name] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ConfigError(f"{key} {item!r}: the value is not a Python literal (numbers, True/False/None, "
                              f"tuples such as (0.9,0.99); a string needs quotes: {name}='{text}')") from None
    return out


def check_kwargs(target, kwargs: dict, key: str, what: str, set_by: dict[str, str]) -> None:
    """Each name in kwargs must be an argument of target (any, if it takes **kwargs) that lorakit does not set."""
    params = inspect.signature(target).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    accepted = [n for n, p in params.items() if n not in set_by and n != "self"
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for name in kwargs:
        if name in set_by:
            raise ConfigError(f"{key} {name}: {set_by[name]}")
        if name not in accepted and not takes_any:
            raise ConfigError(f"{key} {name!r} is not an argument of {what} (it takes "
                              f"{', '.join(accepted) or 'none'}){did_you_mean(name, accepted)}")


def _import_class(path: str, default_module, key: str):
    """kohya's class lookup: a bare name in default_module, or a full dotted path."""
    module_name, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name) if module_name else default_module, name)
    except (ImportError, AttributeError):
        raise ConfigError(f"{key} = {path!r}: no such class (a name in {default_module.__name__}, or a full "
                          f"path such as {default_module.__name__}.{name or 'Name'})") from None


# ---- optimizers ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OptimizerPlan:
    """The optimizer class and its arguments: kohya's defaults for that type, then optimizer_args."""

    cls: type
    kwargs: dict  # defaults + optimizer_args (what kohya reports in ss_optimizer)
    fixed: dict = field(default_factory=dict)  # arguments the type implies (SGDNesterov: nesterov=True)
    relative_step: bool = False  # Adafactor's own step size: learning rates unused, the adafactor schedule runs

    @property
    def description(self) -> str:
        """kohya's ss_optimizer: module.Class(name=value,...)."""
        args = ",".join(f"{k}={v}" for k, v in self.kwargs.items())
        return f"{self.cls.__module__}.{self.cls.__name__}" + (f"({args})" if args else "")


def _optimizer_class(name: str) -> tuple[type, dict, dict]:
    """(class, implied arguments, kohya's defaults) of an optimizer_type, case-insensitive as kohya."""
    key = name.lower()
    if key == "adamw":
        return torch.optim.AdamW, {}, {}
    if key == "sgdnesterov":  # kohya: Nesterov needs momentum; 0.9 unless optimizer_args gives one
        return torch.optim.SGD, {"nesterov": True}, {"momentum": 0.9}
    if key == "lion":
        return Lion, {}, {}
    if key == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor, {}, {"relative_step": True}  # kohya states transformers' default explicitly
    packages = {"prodigy": ("prodigyopt", "Prodigy"), "adamw8bit": ("bitsandbytes.optim", "AdamW8bit")}
    if key not in packages:
        raise ConfigError(f"unknown optimizer_type {name!r}")
    module, cls = packages[key]
    try:
        return getattr(importlib.import_module(module), cls), {}, {}
    except ImportError:
        package = module.split(".")[0]
        raise MissingPackage(f"optimizer_type {name} needs the {package} package: pip install {package}") from None


def plan_optimizer(name: str, args: list[str] | None = None) -> OptimizerPlan:
    cls, fixed, defaults = _optimizer_class(name)
    given = parse_kwargs(args, "optimizer_args")
    set_by = {"params": "lorakit passes the adapter parameters",
              "lr": "set by learning_rate, unet_lr and text_encoder_lr",
              **{k: f"optimizer_type {name} always uses {k}={v} (as kohya)" for k, v in fixed.items()}}
    check_kwargs(cls, given, "optimizer_args", f"{cls.__name__} (optimizer_type {name})", set_by)
    kwargs = {**defaults, **given}
    relative = False
    if cls.__name__ == "Adafactor":
        if kwargs.get("warmup_init"):  # kohya: warmup_init only exists with relative steps
            kwargs["relative_step"] = True
        relative = bool(kwargs["relative_step"])
    return OptimizerPlan(cls, kwargs, fixed, relative)


def make_optimizer(name: str, param_groups: list[dict], lr: float, device: torch.device,
                   args: list[str] | None = None) -> torch.optim.Optimizer:
    """The optimizer kohya's get_optimizer builds for optimizer_type `name` and optimizer_args `args`."""
    if name.lower() == "adamw8bit" and device.type != "cuda":
        raise ConfigError("optimizer_type AdamW8bit needs a CUDA GPU (bitsandbytes); use AdamW on this device")
    plan = plan_optimizer(name, args)
    if plan.relative_step:  # kohya: Adafactor sets its own step size; the group learning rates are dropped
        param_groups, lr = [{k: v for k, v in g.items() if k != "lr"} for g in param_groups], None
    kwargs = {**plan.kwargs, **cpu_fused(plan, device)}
    try:
        return plan.cls(param_groups, lr=lr, **plan.fixed, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"optimizer_type {name} with optimizer_args {plan.kwargs}: {e}") from None


def cpu_fused(plan: OptimizerPlan, device: torch.device) -> dict:
    """fused=True for torch's Adam/AdamW on the CPU unless optimizer_args choose an implementation: one kernel
    over all tensors instead of a Python loop over ~560 of them (SD1.5 LoCon 8/8: 9.5 against 32 ms a step,
    clipping included). The same update up to rounding; CUDA keeps torch's default (foreach), as kohya."""
    chosen = {"fused", "foreach", "differentiable", "capturable"} & set(plan.kwargs)
    if device.type != "cpu" or chosen or plan.cls not in (torch.optim.Adam, torch.optim.AdamW):
        return {}
    return {"fused": True}


def uses_relative_step(optimizer: torch.optim.Optimizer) -> bool:
    return type(optimizer).__name__ == "Adafactor" and bool(optimizer.defaults.get("relative_step"))


# ---- LR schedules ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SchedulePlan:
    """A schedule function or class, the keyword arguments it gets besides the optimizer, and notes."""

    build: object
    kwargs: dict
    notes: tuple[str, ...] = ()


def resolve_warmup(value: float, total: int) -> int:
    """kohya's lr_warmup_steps: below 1 a fraction of the run, floor(value · total); else a step count."""
    if value < 1:
        return int(value * total)
    if value != int(value):
        raise ConfigError(f"lr_warmup_steps = {value}: give whole steps, or a fraction below 1 (0.1 = the first "
                          "10% of the run)")
    return int(value)


def _schedule_arguments(name: str, warmup: int, total: int, num_cycles: int, power: float) -> dict:
    """What kohya's get_scheduler_fix passes to each schedule: {argument: (value, the config key behind it)}."""
    w = {"num_warmup_steps": (warmup, "lr_warmup_steps")}
    wt = {**w, "num_training_steps": (total, "max_train_steps / max_train_epochs")}
    half_cycles = {"num_cycles": (num_cycles / 2, "lr_scheduler_num_cycles (kohya passes half of it)")}
    return {"constant": {}, "piecewise_constant": {}, "constant_with_warmup": w, "inverse_sqrt": w,
            "linear": wt, "cosine": wt,
            "cosine_with_restarts": {**wt, "num_cycles": (num_cycles, "lr_scheduler_num_cycles")},
            "polynomial": {**wt, "power": (power, "lr_scheduler_power")},
            "cosine_with_min_lr": {**wt, **half_cycles}, "warmup_stable_decay": {**w, **half_cycles}}[name]


def _schedule_function(name: str):
    if name == "piecewise_constant":  # kohya takes this one from diffusers
        from diffusers.optimization import get_piecewise_constant_schedule

        return get_piecewise_constant_schedule
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

    return TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]


_SET_BY_LORAKIT = {"optimizer": "lorakit passes the optimizer",
                   "last_epoch": "set by --resume (the schedule's state is saved with the training state)"}


def _refuse_warmup(warmup: int, what: str) -> None:
    if warmup:
        raise ConfigError(f"{what} has no warmup: set lr_warmup_steps = 0 (kohya refuses it too)")


def plan_scheduler(name: str, warmup: int, total: int, num_cycles: int = 1, power: float = 1.0,
                   scheduler_type: str | None = None, scheduler_args: list[str] | None = None,
                   relative_step: bool = False, initial_lr: float = 0.0) -> SchedulePlan:
    """What kohya's get_scheduler_fix builds; warmup and total count optimizer steps (kohya multiplies both
    by the process count because accelerate steps its schedule once per process; lorakit steps it once)."""
    given, notes = parse_kwargs(scheduler_args, "lr_scheduler_args"), []
    if scheduler_type:  # any class, as kohya: a name in torch.optim.lr_scheduler or a full path
        cls = _import_class(scheduler_type, torch.optim.lr_scheduler, "lr_scheduler_type")
        check_kwargs(cls, given, "lr_scheduler_args", scheduler_type, _SET_BY_LORAKIT)
        _refuse_warmup(warmup, f"lr_scheduler_type {scheduler_type}")
        if name != "constant":
            notes.append(f"lr_scheduler {name} has no effect: lr_scheduler_type {scheduler_type} replaces it (as "
                         "kohya)")
        return SchedulePlan(cls, given, tuple(notes))
    if relative_step or name == "adafactor":
        return _adafactor_schedule(name, warmup, given, relative_step, initial_lr)
    if name == "constant" and warmup:
        name = "constant_with_warmup"  # warmup is never silently ignored
        notes.append("lr_scheduler constant with lr_warmup_steps runs as constant_with_warmup (kohya refuses "
                     "the pair)")
    if name == "piecewise_constant" and warmup:
        notes.append("lr_warmup_steps has no effect with lr_scheduler piecewise_constant (kohya ignores it too); "
                     "put a warmup into its step_rules")
    fn, fixed = _schedule_function(name), _schedule_arguments(name, warmup, total, num_cycles, power)
    if name == "warmup_stable_decay":  # kohya derives the stable part; num_training_steps is not passed
        fixed.update(num_stable_steps=(None, "max_train_steps - lr_warmup_steps - num_decay_steps"),
                     num_training_steps=(None, "num_stable_steps"))
    check_kwargs(fn, given, "lr_scheduler_args", f"the {name} schedule",
                 {**_SET_BY_LORAKIT, **{k: f"set by {key}" for k, (_, key) in fixed.items()}})
    kwargs = {**{k: v for k, (v, _) in fixed.items() if v is not None}, **given}
    if name == "warmup_stable_decay":  # kohya's lr_decay_steps (int or fraction) and min_lr_ratio, default 0
        decay = kwargs.setdefault("num_decay_steps", 0)
        kwargs["num_decay_steps"] = decay = int(decay * total) if isinstance(decay, float) and decay < 1 else decay
        kwargs.setdefault("min_lr_ratio", 0.0)
        kwargs["num_stable_steps"] = total - warmup - decay
    if name == "cosine_with_min_lr" and "min_lr" not in kwargs and "min_lr_rate" not in kwargs:
        raise ConfigError('lr_scheduler cosine_with_min_lr needs its floor: lr_scheduler_args = ["min_lr_rate=0.1"] '
                          '(a fraction of the learning rate) or ["min_lr=1e-6"]')
    if name == "piecewise_constant" and "step_rules" not in kwargs:
        raise ConfigError("lr_scheduler piecewise_constant needs lr_scheduler_args = [\"step_rules='1:100,0.1'\"] "
                          "(multiplier 1 until step 100, then 0.1)")
    return SchedulePlan(fn, kwargs, tuple(notes))


def _adafactor_schedule(name: str, warmup: int, given: dict, relative_step: bool, initial_lr: float) -> SchedulePlan:
    from transformers.optimization import AdafactorSchedule

    if not relative_step:
        raise ConfigError("lr_scheduler adafactor follows Adafactor's own step size: it needs optimizer_type "
                          "Adafactor with relative_step=True (its default)")
    _refuse_warmup(warmup, "Adafactor with relative_step=True (its default, which sets its own step size)")
    check_kwargs(AdafactorSchedule, given, "lr_scheduler_args", "the adafactor schedule",
                 {**_SET_BY_LORAKIT, "initial_lr": "set by learning_rate"})
    notes = () if name == "adafactor" else (
        f"lr_scheduler {name} has no effect: Adafactor with relative_step=True (its default) sets its own step "
        f"size and runs the adafactor schedule, as in kohya; optimizer_args relative_step=False uses "
        f"learning_rate and {name}",)
    return SchedulePlan(AdafactorSchedule, {"initial_lr": initial_lr, **given}, notes)


def schedule_options(config) -> dict:
    """The TrainConfig keys make_scheduler takes besides the name, warmup and step count."""
    return dict(num_cycles=config.lr_scheduler_num_cycles, power=config.lr_scheduler_power,
                scheduler_type=config.lr_scheduler_type, scheduler_args=config.lr_scheduler_args,
                initial_lr=config.learning_rate)


def make_scheduler(name: str, optimizer: torch.optim.Optimizer, warmup_steps: int = 0, total_steps: int = 1,
                   **options):
    """The LR schedule, stepped once per optimizer step; its state_dict is part of the --resume state.
    options: num_cycles, power, scheduler_type, scheduler_args, initial_lr (see plan_scheduler)."""
    plan = plan_scheduler(name, warmup_steps, total_steps, relative_step=uses_relative_step(optimizer), **options)
    try:
        return plan.build(optimizer, **plan.kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"lr_scheduler {options.get('scheduler_type') or name} with {plan.kwargs}: {e}") from None


def optimization_checks(config) -> tuple[list[str], list[str]]:
    """(problems, notes) of the optimizer and schedule keys, found when the config is read. The real step
    count needs the dataset, so max_train_steps stands in for it: the arguments are what is checked here."""
    problems, relative = [], False
    try:
        relative = plan_optimizer(config.optimizer_type, config.optimizer_args).relative_step
    except MissingPackage:
        pass  # said when the run starts: the config may be meant for another machine
    except ConfigError as e:
        problems.append(str(e))
    total = config.max_train_steps
    try:
        options = {**schedule_options(config), "relative_step": relative}
        plan = plan_scheduler(config.lr_scheduler, resolve_warmup(config.lr_warmup_steps, total), total, **options)
    except ConfigError as e:
        return problems + [str(e)], []
    return problems, list(plan.notes)


# ---- after each step: kohya's max-norm (scale_weight_norms) ----------------------------------------------------
@dataclass(frozen=True)
class MaxNormStats:
    keys_scaled: int  # modules whose ΔW was shrunk this step
    mean_norm: float  # mean ‖ΔW‖ over modules, after scaling
    max_norm: float  # largest ‖ΔW‖, after scaling


def max_norm_ratio(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """kohya's factor r = min(n', c) / n' with n' = max(‖ΔW‖, c/2), c = max_norm: that is min(1, c/‖ΔW‖),
    without dividing by a zero norm."""
    floored = norm.clamp(min=max_norm / 2)
    return floored.clamp(max=max_norm) / floored


@torch.no_grad()
def apply_max_norm(adapters, max_norm: float) -> MaxNormStats:
    """Shrink every adapter whose ‖ΔW‖_F (without the multiplier) exceeds max_norm back to it.

    ΔW is a product in which each of a module's k parameter tensors appears once (LoRA up·down, LoHa's four
    factors, LoKr's Kronecker factors, Tucker cores, LyCORIS's scalar), so multiplying each tensor by r^(1/k)
    multiplies ΔW by r; for LoRA this is kohya's √r on up and down."""
    scaled, norms = 0, []
    for adapter in adapters:
        if adapter.algo == "norm":  # LyCORIS's NormModule takes no max-norm either (it is not a product)
            continue
        norm = adapter.delta_sq_norm().sqrt()  # from the factors: no ΔW built each step
        ratio = max_norm_ratio(norm, max_norm)
        if ratio != 1:
            scaled += 1
            params = list(adapter.parameters())
            factor = ratio ** (1.0 / len(params))
            for weight in params:
                weight.mul_(factor.to(weight.dtype))
        norms.append(float(norm * ratio))
    return MaxNormStats(scaled, sum(norms) / max(1, len(norms)), max(norms, default=0.0))
