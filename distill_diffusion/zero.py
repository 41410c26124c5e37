"""DeepSpeed ZeRO stage 1 / 2 for every trainable role, asked for through an accelerate DeepSpeed config.

``accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml`` launches the processes and says how to
partition; accelerate parses the config (``DeepSpeedPlugin``) and the trainer builds one DeepSpeed engine per
trainable role. Why not ``accelerator.prepare``: accelerate's DeepSpeed path wraps one model whose engine owns the
backward and the step, while a method here calls several roles through `Models` (a student and a critic updated in
turn, perhaps adapters on one shared UNet). ZeRO-1/2 leave every weight whole on every process and partition only
the Adam states (stage 1) and the averaged gradients (stage 2), so the methods keep calling the roles as they are;
each role's engine owns that role's optimizer, gradient reduction (in backward) and clipping (in its step).

Checkpoints keep the one-process format: `ZeroOptimizer.state_dict` gathers each weight's Adam states into the
tensors ``torch.optim.AdamW`` would hold for it, and ``load_state_dict`` scatters them back, so a ZeRO run resumes in
one process, under DDP or FSDP, and back. Checked against DeepSpeed's ``runtime/engine.py`` (``backward``, ``step``,
``_configure_zero_optimizer``), ``runtime/zero/stage_1_and_2.py`` (fp32 partitions, ``refresh_fp32_params``, the
overflow skip in ``step``) and ``utils/mixed_precision_linkage.py`` / ``utils/tensor_fragment.py`` (where a weight's
slice lives in a partition), and accelerate's ``utils/dataclasses.py`` (``DeepSpeedPlugin``).
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import ConfigError

# what the trainer takes from an accelerate DeepSpeed config's zero_optimization section (the rest is its own)
ZERO_KEYS = {"stage", "allgather_partitions", "allgather_bucket_size", "overlap_comm", "reduce_scatter",
             "reduce_bucket_size", "contiguous_gradients", "round_robin_gradients"}
ADAM_KEYS = ("exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class Zero:
    stage: int  # 1: Adam states partitioned; 2: gradients too
    zero_optimization: dict  # the section handed to DeepSpeed


def requested() -> Zero | None:
    """The ZeRO stage an accelerate DeepSpeed launch asked for (None: no DeepSpeed), taken out of the environment so
    that accelerate itself stays a plain multi-process launch."""
    environ = os.environ
    if environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return None
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("an accelerate DeepSpeed launch needs the deepspeed package: pip install "
                          "'distill-diffusion[deepspeed]' (or launch with configs/accelerate/ddp.yaml)")
    from accelerate.utils import DeepSpeedPlugin

    try:
        plugin = DeepSpeedPlugin()  # accelerate reads its own ACCELERATE_DEEPSPEED_* variables or config file
    except (ValueError, OSError) as e:
        raise ConfigError(f"accelerate DeepSpeed config: {e}") from None
    ds = plugin.deepspeed_config
    section = dict(ds.get("zero_optimization", {}))
    stage = section.get("stage", plugin.zero_stage)
    if stage not in (1, 2):
        raise ConfigError(f"DeepSpeed ZeRO stage {stage} is not supported; use zero_stage 1 or 2 "
                          "(configs/accelerate/deepspeed_zero2.yaml), or for ZeRO-3 configs/accelerate/fsdp.yaml")
    for key in ("offload_optimizer", "offload_param"):
        device = (section.get(key) or {}).get("device", "none")
        if device not in (None, "none"):
            raise ConfigError(f"DeepSpeed {key} to {device} is not supported; set it to none (ZeRO-2 over more "
                              "GPUs, or train.optimizer adamw8bit under configs/accelerate/ddp.yaml)")
    accumulation = ds.get("gradient_accumulation_steps", 1)
    if accumulation not in (1, "auto"):
        raise ConfigError(f"DeepSpeed gradient_accumulation_steps {accumulation} is not supported; set it to 1 "
                          "(train.batch_size is the global batch of one step)")
    zero = {k: v for k, v in section.items() if k in ZERO_KEYS and v != "auto"}
    for key in [k for k in environ if k.startswith(("ACCELERATE_DEEPSPEED_", "ACCELERATE_GRADIENT_"))
                or k in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_CONFIG_DS_FIELDS")]:
        del environ[key]
    return Zero(stage=int(stage), zero_optimization={**zero, "stage": int(stage)})


def check(cfg: Any) -> None:
    """What a ZeRO run refuses before anything is written (``cfg``: the run's `Config`)."""
    tc = cfg.train
    if tc.optimizer != "adamw":
        raise ConfigError(f"train.optimizer {tc.optimizer} cannot be partitioned by DeepSpeed; use adamw (ZeRO "
                          f"partitions its states already) or configs/accelerate/ddp.yaml")
    if tc.mixed_precision == "fp16":
        raise ConfigError("train.mixed_precision fp16 is not supported under DeepSpeed (the role engines keep fp32 "
                          "weights and no loss scaler); use bf16 or configs/accelerate/ddp.yaml")


def engine(role: nn.Module, params: list[nn.Parameter], optimizer: torch.optim.Optimizer, zero: Zero,
           batch_size: int, world: int, grad_clip: float) -> ZeroOptimizer:
    """One DeepSpeed engine for one role: its weights ``params`` (full on every process), ``optimizer`` (AdamW over
    exactly those) partitioned by ZeRO; gradients are averaged over processes and clipped to ``grad_clip`` (0: not
    clipped) by the engine."""
    import deepspeed

    config = {
        "train_batch_size": batch_size,
        "train_micro_batch_size_per_gpu": batch_size // world,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": float(grad_clip),
        "zero_optimization": zero.zero_optimization,
        # precision is the trainer's (autocast over fp32 weights, train.mixed_precision), never the engine's
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    eng, zero_opt, _, _ = deepspeed.initialize(model=role, optimizer=optimizer, model_parameters=params,
                                               config=config)
    return ZeroOptimizer(eng, zero_opt, params)


class ZeroOptimizer:
    """A role's ZeRO engine seen as the role's optimizer: ``backward`` (reduces gradients into this process's
    partition), ``step`` (clips, skips a step whose gradient norm is not finite, updates, gathers the weights),
    ``param_groups`` (the learning rate the trainer sets each step) and a state dict in ``torch.optim.AdamW``'s own
    format over the role's weights, so checkpoints do not depend on the number of processes."""

    def __init__(self, eng: Any, zero_opt: Any, params: list[nn.Parameter]):
        self.engine, self.zero, self.params = eng, zero_opt, params
        self.defaults = zero_opt.optimizer.defaults

    @property
    def param_groups(self) -> list[dict]:
        return self.zero.param_groups

    @property
    def state(self) -> dict:
        return self.zero.optimizer.state

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self, closure: Any = None) -> None:
        self.engine.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.zero.zero_grad(set_to_none=set_to_none)

    @property
    def applied(self) -> bool:
        """Whether the last step updated the weights (False: a non-finite gradient norm; gradients were dropped)."""
        return bool(self.engine.was_step_applied())

    @property
    def grad_norm(self) -> float:
        """The averaged gradients' norm before clipping, at the last step (inf when it was skipped)."""
        norm = self.engine.get_global_grad_norm()
        return math.inf if norm is None else float(norm)

    def _flat(self) -> list[tuple[torch.Tensor, dict]]:
        """Each fp32 partition this process updates, with its optimizer state (empty before the first step)."""
        inner = self.zero.optimizer
        return [(flat, inner.state.get(flat, {})) for flat in self.zero.single_partition_of_fp32_groups]

    def _slices(self) -> list[tuple[int, nn.Parameter, int, Any]]:
        """(index among the role's weights, weight, its partition group, its fragment mapping or None)."""
        groups = {id(p): g for g, group in enumerate(self.zero.bit16_groups) for p in group}
        return [(i, p, groups[id(p)], getattr(p, "_hp_mapping", None)) for i, p in enumerate(self.params)]

    def state_dict(self) -> dict:
        """Full Adam states per weight (a collective: every process calls it), as one process's AdamW keeps them."""
        flats = self._flat()
        state: dict[int, dict[str, torch.Tensor]] = {}
        if all(s for _, s in flats):  # before a role's first step there is no state (as in torch)
            dp = self.zero.dp_process_group
            for i, p, g, mapping in self._slices():
                entry = {"step": flats[g][1]["step"].detach().clone()}
                for key in ADAM_KEYS:
                    full = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
                    if mapping is not None:  # this process holds a slice of the weight: put it in place
                        lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
                        full.narrow(0, lp.start, lp.numel).copy_(flats[g][1][key].narrow(0, hp.start, hp.numel))
                    torch.distributed.all_reduce(full, group=dp)  # the slices are disjoint: their sum is whole
                    entry[key] = full.view_as(p)
                state[i] = entry
        group = self.zero.optimizer.param_groups[0]  # a role's AdamW has one group (memory.make_optimizer)
        hyper = {k: v for k, v in group.items() if k != "params"}
        return {"state": state, "param_groups": [{**hyper, "params": list(range(len(self.params)))}]}

    def load_state_dict(self, state_dict: dict) -> None:
        """Scatter full per-weight Adam states into this process's partitions and restart the fp32 master copies
        from the weights (loaded into the module just before: accelerate restores weights, then optimizers)."""
        self.zero.refresh_fp32_params()
        for group in self.zero.optimizer.param_groups:
            for key, value in state_dict["param_groups"][0].items():
                if key != "params":
                    group[key] = value
        saved = {int(i): s for i, s in state_dict["state"].items()}
        if not saved:
            return
        step = next(iter(saved.values()))["step"]
        flats = self._flat()
        inner = self.zero.optimizer
        for flat, _ in flats:
            inner.state[flat] = {"step": torch.as_tensor(step, dtype=torch.float32).clone(),
                                 **{key: torch.zeros_like(flat) for key in ADAM_KEYS}}
        for i, _, g, mapping in self._slices():
            if mapping is None or i not in saved:  # a weight without saved state starts at zero (as AdamW would)
                continue
            lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
            target = inner.state[flats[g][0]]
            for key in ADAM_KEYS:
                value = saved[i][key].to(target[key].device, torch.float32).flatten()
                target[key].narrow(0, hp.start, hp.numel).copy_(value.narrow(0, lp.start, lp.numel))
        self.zero._hp_optimizer_states_linked = False  # DeepSpeed relinks its fragment views to the new states
