"""The training loop: one readable loop on accelerate that knows no method.

Each step the method names the role that updates (``method.phase(step)``) and gives its loss; the trainer owns
devices, precision, one optimizer per trainable role, clipping, the student's EMA, checkpoints, logs and previews.

Run directory layout::

    RUN/config.yaml            the resolved config (resume refuses a different one)
    RUN/logs.jsonl             one line per log interval
    RUN/checkpoints/step_N/    accelerate state (safetensors weights) + trainer_state.json + rng/ema safetensors
    RUN/final/                 student.safetensors (+ student_ema.safetensors), metrics.json
    RUN/samples/               periodic previews
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import sharding, zero
from .config import Config, ConfigError, RunError, first_line, parse_config
from .data import build_data
from .files import first_non_finite, remove_dir, replace_dir, write_text_atomic
from .lora import own_parameters
from .memory import HALF, cast_frozen, check_optimizer, make_optimizer, set_attention
from .models import build_models
from .preview import preview
from .rng import ShardedGenerator
from .roles import Models

CHECKPOINT_PREFIX = "step_"
MAX_NONFINITE_IN_A_ROW = 10
# config sections a resumed run may change: how long it runs and how it reports, never what it computes
RESUMABLE_KEYS = {"steps", "checkpoint_every", "keep_checkpoints", "log_every", "sample_every", "eval_samples",
                  "progress", "attention"}  # attention kernels compute the same function


class EMA:
    """Exponential moving average of the student's trainable weights (kept in fp32)."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: p.detach().float().clone() for k, p in own_parameters(module).items()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        for k, p in module.named_parameters():
            if k in self.shadow:
                self.shadow[k].lerp_(p.detach().float(), 1 - self.decay)

    def copy_to(self, module: torch.nn.Module) -> None:
        params = dict(module.named_parameters())
        with torch.no_grad():
            for k, v in self.shadow.items():
                params[k].copy_(v.to(params[k].dtype))


def trainable_state(module: torch.nn.Module, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The weights a role trains (frozen parts such as the mixture teacher inside a residual MLP, a shared base and
    other roles' adapters are left out); ``names`` (the trainer's, fixed at build) or the module's own parameters."""
    names = set(own_parameters(module)) if names is None else names
    # full tensors: gathering a sharded role's weights is a collective, so every process calls this
    return {k: sharding.full(v.detach()).cpu().contiguous() for k, v in module.state_dict().items() if k in names}


def _checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX) and (p / "trainer_state.json").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = _checkpoints(run_dir)
    return found[-1] if found else None


def _check_same_config(saved: dict, current: dict) -> None:
    for section in set(saved) | set(current):
        if section == "eval":  # what is measured after training never changes what was trained
            continue
        a, b = saved.get(section), current.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            for key in set(a) | set(b):
                if section == "train" and key in RESUMABLE_KEYS:
                    continue
                if a.get(key) != b.get(key):
                    raise ConfigError(f"cannot resume: {section}.{key} was {a.get(key)!r} in the saved run, now "
                                      f"{b.get(key)!r}; use the saved config or a new --out directory")
        elif a != b:
            raise ConfigError(f"cannot resume: {section} was {a!r} in the saved run, now {b!r}")


def _prepare_run_dir(cfg: Config, run_dir: Path, resume: bool) -> Path | None:
    saved_cfg = run_dir / "config.yaml"
    empty = not run_dir.exists() or not any(run_dir.iterdir())
    if resume and empty:  # killed before anything was written (or never started): --resume is safe to pass always
        return None
    if resume:
        if not saved_cfg.is_file():
            raise ConfigError(f"cannot resume: {str(run_dir)!r} holds no run (no config.yaml)")
        # parsed first, so a key added since the run was saved compares at its default
        _check_same_config(parse_config(yaml.safe_load(saved_cfg.read_text())).to_dict(), cfg.to_dict())
        return latest_checkpoint(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"run directory {str(run_dir)!r} is not empty; pass --resume to continue it or choose "
                          "another --out")
    return None


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path, resume: bool = False, pipeline: Any = None):
        """``pipeline``: the teacher as a diffusers pipeline already in memory (instead of loading model.teacher)."""
        from distill_diffusion.methods import METHODS, configure_student

        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.resume_from = _prepare_run_dir(cfg, self.run_dir, resume)
        tc = cfg.train
        self.sharding = sharding.requested()  # an accelerate FSDP launch (read before accelerate sees it)
        self.zero = zero.requested()  # or a DeepSpeed ZeRO-1/2 launch
        if self.zero is not None:
            zero.check(cfg)
        self.accelerator = Accelerator(mixed_precision=tc.mixed_precision)
        device = self.accelerator.device
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        check_parallel(self.accelerator, tc.batch_size)

        # 1. roles and method; fresh weights are seeded, so two runs with one seed start identical
        method_cls = METHODS[cfg.method]
        self.models: Models = build_models(cfg.model, need_critic="critic" in method_cls.roles, seed=tc.seed,
                                           critic_lora_rank=method_cls.critic_lora_rank, pipeline=pipeline,
                                           frozen_critic=method_cls.frozen_critic)
        configure_student(self.models, method_cls, cfg.method_args)
        self.method = method_cls(cfg.method_args, self.models)
        for module in (self.models.teacher, self.models.vae):
            if module is not None:
                module.to(device)
        if self.models.text is not None:
            for enc in self.models.text.encoders:
                enc.to(device)
        self.data = build_data(self.models, cfg.data, device)
        if self.method.needs_real_data and not self.data.has_real:
            raise ConfigError(f"{cfg.method} as configured trains on real images ({self.method.real_data_use}); set "
                              "data.real to digits or an image folder")
        set_attention(self.models, tc.attention, device)
        check_optimizer(tc.optimizer)
        half = HALF.get(tc.mixed_precision)
        if half is not None and tc.half_frozen:  # after build_data: prompts and real images encode in fp32
            cast_frozen(self.models, half)
        roles = {r: m for r, m in self.models.trainable().items() if r in method_cls.roles}
        to_shard = self._check_sharding(roles, method_cls) if self.sharding is not None else []
        # the run directory is written only once everything above has been accepted
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.accelerator.is_main_process:  # one writer: two through the same temporary name race (FileNotFound)
            cfg.save(self.run_dir / "config.yaml")  # atomically

        # 2. one optimizer per trainable role
        for module in roles.values():
            net = sharding.network(module)
            if tc.gradient_checkpointing and hasattr(net, "enable_gradient_checkpointing"):
                net.enable_gradient_checkpointing()
        # data parallelism without DDP wrappers: roles may share one UNet (LoRA adapters) and methods call them
        # through Models, so the trainer averages each updating role's gradients itself (``sync_gradients``)
        self.roles = {r: self.accelerator.prepare_model(m, evaluation_mode=True) for r, m in roles.items()}
        broadcast_parameters([p for m in roles.values() for p in own_parameters(m).values()], self.world)
        self.sharded = to_shard if self.world > 1 else []  # one process has nothing to shard across
        for r in self.sharded:  # after the broadcast: every process shards the same weights
            sharding.shard_network(sharding.network(roles[r]), self.sharding, device)
        own = {r: own_parameters(m) for r, m in roles.items()}  # fixed here: phases toggle requires_grad later
        self.params = {r: list(o.values()) for r, o in own.items()}
        self.own_names = {r: set(o) for r, o in own.items()}
        ma = cfg.method_args
        optimizers = [make_optimizer(tc.optimizer, self.params[r], lr=self.method.lr(r), betas=tuple(ma.adam_betas),
                                     eps=ma.adam_eps, weight_decay=ma.weight_decay) for r in roles]
        for opt in optimizers if self.sharded else []:
            sharding.hook_optimizer(opt)  # checkpoints keep full optimizer states, as one process writes them
        self.zero_roles = list(roles) if self.zero is not None and self.world > 1 else []
        if self.zero_roles:  # each role's engine averages, clips and partitions (zero.py)
            optimizers = [zero.engine(roles[r], self.params[r], o, self.zero, tc.batch_size, self.world, tc.grad_clip)
                          for r, o in zip(roles, optimizers)]
        self.optimizers = {r: self.accelerator.prepare_optimizer(o) for r, o in zip(roles, optimizers)}
        # checkpoints hold each role's own weights only: a shared frozen base (LoRA roles) is not written per role
        self.accelerator.register_save_state_pre_hook(self._save_own_weights)
        self.accelerator.register_load_state_pre_hook(self._load_own_weights)
        self.ema = EMA(self.models.student, tc.ema_decay) if tc.ema_decay > 0 else None
        # one seed on every process; per-sample draws are sliced per process (distill_diffusion.rng)
        self.generator = ShardedGenerator(device, tc.seed, self.rank, self.world)
        self.step = 0
        self.counts = {r: 0 for r in roles}
        self.skipped = 0
        self.bad_in_a_row = 0

    def _check_sharding(self, roles: dict[str, torch.nn.Module], method_cls: type) -> list[str]:
        """The roles an FSDP launch shards (each full-weight role: distill_diffusion/sharding.py), or a refusal."""
        if self.cfg.train.optimizer != "adamw":
            raise ConfigError(f"train.optimizer {self.cfg.train.optimizer} cannot step sharded weights; use adamw "
                              "under FSDP (it shards the Adam states already) or configs/accelerate/ddp.yaml")
        sharded = [r for r, m in roles.items() if sharding.shardable(m, own_parameters(m))]
        if "student" in sharded and method_cls.copies_student:
            raise ConfigError(f"{self.cfg.method} keeps a copy of the student, which a sharded student cannot give; "
                              "use configs/accelerate/ddp.yaml (or a LoRA student, model.student_lora_rank)")
        return sharded

    def _reshard(self) -> None:
        for role in self.sharded:
            sharding.reshard(sharding.network(self.roles[role]))

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    # ------------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        """Write to a temporary directory, then rename: a kill mid-write leaves the previous checkpoint intact. The
        weights are checked finite first, so a NaN never reaches a checkpoint."""
        root = self.run_dir / "checkpoints"
        final = root / f"{CHECKPOINT_PREFIX}{self.step:08d}"
        tmp = root / f".tmp_{final.name}"
        if self.accelerator.is_main_process and root.is_dir():  # what an earlier kill left half-written
            for stale in root.iterdir():
                if stale.name.startswith((".tmp_", ".old_")):
                    shutil.rmtree(stale, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._reshard()  # sharded weights are gathered from their shards, which hold the current values
        # every process writes (its RNG state at least), any may fail; they agree before anything is published, so
        # a failure on one never leaves the others waiting at a barrier it will not reach
        error: Exception | None = None
        ema = None if self.ema is None else {k: sharding.full(v).cpu().contiguous()  # every process: may gather
                                             for k, v in self.ema.shadow.items()}
        try:
            self.accelerator.save_state(str(tmp), safe_serialization=True)
        except Exception as e:  # a full disk, a quota, a vanished mount: each library words it its own way
            error = e
        if agree(error is None, self.world) and self.accelerator.is_main_process:
            try:
                self._save_trainer_state(tmp, ema)
            except Exception as e:
                error = e
        if not agree(error is None, self.world):
            if self.accelerator.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(error, RunError):  # refused before writing (non-finite weights): already one line
                raise error
            previous = latest_checkpoint(self.run_dir)
            kept = f"{previous.name} is intact" if previous else "there is no earlier checkpoint"
            reason = "another process failed to write its part" if error is None else first_line(error)
            raise RunError(f"could not write checkpoint {final.name} in {str(root)!r} ({reason}); {kept}: free space "
                           "and rerun with --resume") from error
        if self.accelerator.is_main_process:
            replace_dir(tmp, final)
            for old in _checkpoints(self.run_dir)[: -self.cfg.train.keep_checkpoints]:
                remove_dir(old)
        self.accelerator.wait_for_everyone()
        return final

    def _save_trainer_state(self, tmp: Path, ema: dict[str, torch.Tensor] | None) -> None:
        save_file({"generator": self.generator.get_state()}, str(tmp / "rng.safetensors"))
        if ema is not None:
            save_file(ema, str(tmp / "ema.safetensors"))
        extra = self.method.state_dict()
        if extra:
            save_file({k: v.detach().cpu().contiguous() for k, v in extra.items()}, str(tmp / "method.safetensors"))
        state = {"step": self.step, "counts": self.counts, "skipped": self.skipped}
        (tmp / "trainer_state.json").write_text(json.dumps(state))  # written last: marks the checkpoint complete

    def load_checkpoint(self, path: Path) -> None:
        self.accelerator.load_state(str(path))
        self.generator.set_state(load_file(str(path / "rng.safetensors"))["generator"].to(torch.uint8))
        if self.ema is not None:
            saved = load_file(str(path / "ema.safetensors"))
            self.ema.shadow = {k: sharding.like(saved[k], v) for k, v in self.ema.shadow.items()}
        if (path / "method.safetensors").is_file():
            extra = load_file(str(path / "method.safetensors"))
            self.method.load_state_dict({k: v.to(self.accelerator.device) for k, v in extra.items()})
        state = json.loads((path / "trainer_state.json").read_text())
        self.step, self.counts, self.skipped = state["step"], state["counts"], state["skipped"]

    def _save_own_weights(self, models: list, weights: list, output_dir: str) -> None:
        for i, role in enumerate(self.roles):  # accelerate saves weights[i] as model[_i].safetensors, in prepare order
            weights[i] = trainable_state(self.accelerator.unwrap_model(self.roles[role]), self.own_names[role])
            bad = first_non_finite(weights[i])
            if bad is not None:
                raise RunError(f"refusing to checkpoint step {self.step}: the {role}'s weight {bad} is not "
                               "finite (the previous checkpoint is intact)")

    def _load_own_weights(self, models: list, input_dir: str) -> None:
        for i, role in enumerate(self.roles):
            path = Path(input_dir) / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")
            state = load_file(str(path))
            missing = self.own_names[role] - set(state)
            if missing:
                raise ConfigError(f"checkpoint {input_dir!r} lacks {len(missing)} of the {role}'s weights (e.g. "
                                  f"{sorted(missing)[0]}); it was written by a run with another model config")
            sharding.load_full(self.accelerator.unwrap_model(self.roles[role]), state)
        models.clear()  # loaded here; accelerate then restores optimizers and RNG states only

    # ------------------------------------------------------------------------------------------- the loop
    def train_step(self) -> tuple[str, dict[str, float]]:
        """One iteration: the method's phase picks the role; only that role's optimizer steps."""
        phase = self.method.phase(self.step)
        self._reshard()  # so the phase's requires_grad below reaches the weights each forward gathers
        # only the updating role's weights take gradients (others may still pass gradients through, as in SiD)
        for role, params in self.params.items():
            for p in params:
                p.requires_grad_(role == phase)
        batch = self.data.sample(self.cfg.train.batch_size // self.world, self.generator)
        with self.accelerator.autocast():
            loss, logs = self.method.loss(phase, batch, self.generator, self.step)
        opt = self.optimizers[phase]
        for group in opt.param_groups:
            group["lr"] = self.method.lr_at(phase, self.step)
        opt.zero_grad(set_to_none=True)
        finite = all_finite(loss, self.world)
        if finite and phase in self.zero_roles:  # the role's engine reduces, clips and skips a non-finite norm
            opt.optimizer.backward(loss)
            opt.step()
            logs[f"grad_norm_{phase}"] = opt.optimizer.grad_norm
            finite = opt.optimizer.applied
        elif finite:
            self.accelerator.backward(loss)
            # sharded weights had their gradients reduce-scattered in backward; the rest are averaged here
            sync_gradients([p for p in self.params[phase] if not sharding.is_sharded(p)], self.world)
            # the gradient norm (inf clip when clipping is off) also tells whether a finite loss gave non-finite
            # gradients; under fp16 the grad scaler owns that decision (an inf while it calibrates is normal)
            max_norm = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else math.inf
            if phase in self.sharded:
                self.accelerator.unscale_gradients()
                norm = sharding.clip_grad_norm_(self.params[phase], max_norm)
            else:
                norm = float(self.accelerator.clip_grad_norm_(self.params[phase], max_norm))
            logs[f"grad_norm_{phase}"] = norm
            finite = math.isfinite(norm) or self.cfg.train.mixed_precision == "fp16"
        if not finite:
            # a non-finite loss or gradient never reaches the weights; too many in a row means the run is broken
            opt.zero_grad(set_to_none=True)
            logs.pop(f"grad_norm_{phase}", None)
            self.skipped += 1
            self.bad_in_a_row += 1
            if self.bad_in_a_row >= MAX_NONFINITE_IN_A_ROW:
                raise RunError(f"{self.bad_in_a_row} non-finite losses or gradients in a row at step {self.step} "
                               f"(phase {phase}); lower the learning rate or check the teacher (the last "
                               "checkpoint holds finite weights)")
        else:
            self.bad_in_a_row = 0
            if phase not in self.zero_roles:  # an engine has stepped already
                opt.step()
            opt.zero_grad(set_to_none=True)  # a role's gradients never outlive its step (one role's at a time)
            self.counts[phase] += 1
            self.method.after_update(phase, self.step)
            if phase == "student" and self.ema is not None:
                self.ema.update(self.models.student)
        self.step += 1
        return phase, logs

    def train(self) -> dict[str, float]:
        tc = self.cfg.train
        if self.resume_from is not None:
            self.load_checkpoint(self.resume_from)
        logs = self.run_dir / "logs.jsonl"
        if self.accelerator.is_main_process and logs.is_file():  # drop what steps lost to a kill had logged
            lines = [line for line in logs.read_text().splitlines(keepends=True) if line.endswith("\n")]
            records = [json.loads(line) for line in lines]
            write_text_atomic(logs, "".join(line for line, r in zip(lines, records)
                                            if r.get("step", 0) <= self.step and not r.get("final")))
        self._log({"step": self.step, "started_from": self.resume_from.name if self.resume_from else None,
                   **({"sharded": self.sharded} if self.sharding is not None else {}),
                   **({"zero_stage": self.zero.stage, "zero_roles": self.zero_roles} if self.zero else {})})
        bar = tqdm(total=tc.steps, initial=self.step, disable=not (tc.progress and self.accelerator.is_main_process),
                   desc=f"{self.cfg.method}", dynamic_ncols=True)
        sums: dict[str, float] = {}
        seen: dict[str, int] = {}  # a key logged by one phase is averaged over that phase's steps only
        t0 = time.time()
        while self.step < tc.steps:
            _, logs = self.train_step()
            for k, v in logs.items():
                sums[k] = sums.get(k, 0.0) + v
                seen[k] = seen.get(k, 0) + 1
            bar.update(1)
            if self.step % tc.log_every == 0 or self.step == tc.steps:
                means = {k: v / seen[k] for k, v in sums.items()}
                bar.set_postfix({k: f"{v:.3g}" for k, v in means.items() if k.startswith("loss")})
                self._log({"step": self.step, **self.counts, "skipped": self.skipped,
                           "seconds": round(time.time() - t0, 2), **means})
                sums, seen = {}, {}
            if tc.sample_every and self.step % tc.sample_every == 0 and self.step < tc.steps:
                self._log({"step": self.step, **self._preview(self.run_dir / "samples" / f"step_{self.step:08d}")})
            if self.step % tc.checkpoint_every == 0 and self.step < tc.steps:
                self.save_checkpoint()
        bar.close()
        for params in self.params.values():  # back to the as-built trainable set (phases toggled it)
            for p in params:
                p.requires_grad_(True)
        return self._finish()

    def _preview(self, out: Path) -> dict[str, float]:
        """Process 0 samples and writes; with a sharded student every process samples (each forward gathers its
        weights), the others into a directory that is then removed."""
        if not self.is_main and "student" not in self.sharded:
            return {}
        scratch = None if self.is_main else Path(tempfile.mkdtemp(prefix="distill_preview_"))
        try:
            with self.accelerator.autocast():  # frozen weights may be in half precision (train.half_frozen)
                metrics = preview(self.models, self.cfg, scratch or out)
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
        return metrics if self.is_main else {}

    def _log(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            with open(self.run_dir / "logs.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def _finish(self) -> dict[str, float]:
        """Final checkpoint, student weights (raw and EMA) and the end-of-run preview/metrics."""
        last = self.save_checkpoint()
        final, tmp = self.run_dir / "final", self.run_dir / ".tmp_final"
        student, names = self.models.student, self.own_names["student"]  # resharded by save_checkpoint
        weights: dict[str, dict[str, torch.Tensor]] = {}
        if self.is_main or "student" in self.sharded:  # gathering a sharded student takes every process
            weights["student.safetensors"] = trainable_state(student, names)
            if self.ema is not None:  # the raw weights may share storage with the student's (CPU): copy them first
                weights["student.safetensors"] = {k: v.clone() for k, v in weights["student.safetensors"].items()}
                self.ema.copy_to(student)  # previews and `sample` use the EMA weights when there are some
                weights["student_ema.safetensors"] = trainable_state(student, names)
        metrics: dict[str, float] = {}
        error: Exception | None = None
        if self.is_main:
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                for name, state in weights.items():
                    save_file(state, str(tmp / name))
            except Exception as e:
                error = e
        if agree(error is None, self.world):  # the other processes must not wait for a process that failed
            try:
                metrics = self._preview(tmp / "samples")
                if self.is_main:
                    metrics = {"step": self.step, **{k: v for k, v in metrics.items() if not math.isnan(v)}}
                    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
                    replace_dir(tmp, final)
                    self._log({"final": True, **metrics})
            except Exception as e:
                error = e
        if not agree(error is None, self.world):
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            if error is not None and not isinstance(error, (OSError, SafetensorError)):  # not a write failure
                raise error
            reason = "process 0 failed" if error is None else first_line(error)
            raise RunError(f"could not write {str(final)!r} ({reason}); checkpoint {last.name} is complete: free "
                           "space and rerun with --resume") from error
        return metrics


def check_parallel(accelerator: Accelerator, batch_size: int) -> None:
    """Data parallelism as this trainer does it: plain processes (CPU gloo or multi-GPU), global batch split evenly."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind not in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        raise ConfigError(f"accelerate distributed type {kind.value} is not supported; use configs/accelerate/"
                          "ddp.yaml, fsdp.yaml, fsdp_zero2.yaml or deepspeed_zero2.yaml (docs/distributed.md)")
    if batch_size % accelerator.num_processes:
        raise ConfigError(f"train.batch_size {batch_size} is the global batch and must divide evenly over the "
                          f"{accelerator.num_processes} processes; choose a multiple of {accelerator.num_processes}")


def agree(ok: bool, world: int) -> bool:
    """Whether ``ok`` holds on every process (a collective: every process must call it)."""
    if world == 1:
        return ok
    flag = torch.tensor([float(ok)])
    if torch.distributed.get_backend() == "nccl":
        flag = flag.cuda()
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def all_finite(loss: torch.Tensor, world: int) -> bool:
    """Whether the loss is finite on every process (so all processes skip, or none does)."""
    return agree(bool(torch.isfinite(loss.detach()).all()), world)


def sync_gradients(params: list[torch.nn.Parameter], world: int, bucket: int = 2**24) -> None:
    """Average gradients over processes (what DDP's reducer does), in flat buckets of ``bucket`` elements."""
    if world == 1:
        return
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    grads = [p.grad for p in params if p.grad is not None]
    while grads:
        size, n = 0, 0
        while n < len(grads) and (n == 0 or size + grads[n].numel() <= bucket):
            size, n = size + grads[n].numel(), n + 1
        flat = _flatten_dense_tensors(grads[:n])
        torch.distributed.all_reduce(flat)
        flat /= world
        for g, r in zip(grads[:n], _unflatten_dense_tensors(flat, grads[:n])):
            g.copy_(r)
        grads = grads[n:]


def broadcast_parameters(params: list[torch.nn.Parameter], world: int) -> None:
    """Every process starts from process 0's weights (seeded builds agree already; this makes it certain)."""
    if world > 1:
        with torch.no_grad():
            for p in params:
                torch.distributed.broadcast(p.data, src=0)


def load_run_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{str(run_dir)!r} is not a run directory (no config.yaml)")
    return parse_config(yaml.safe_load(path.read_text()))


def load_student(run_dir: str | Path, ema: bool = True) -> tuple[Config, Models]:
    """The config and models of a finished run, with the student's trained (EMA if any) weights loaded."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    weights = run_dir / "final" / ("student_ema.safetensors" if ema else "student.safetensors")
    if not weights.is_file():
        weights = run_dir / "final" / "student.safetensors"
    if not weights.is_file():
        raise ConfigError(f"run {str(run_dir)!r} has no trained student (no final/student.safetensors); "
                          "finish or resume the run first")
    from distill_diffusion.methods import METHODS, configure_student

    models = build_models(cfg.model, need_critic=False, seed=cfg.train.seed)
    configure_student(models, METHODS[cfg.method], cfg.method_args)
    state = load_file(str(weights))
    missing = set(trainable_state(models.student)) - set(state)
    if missing:
        raise ConfigError(f"{str(weights)!r} does not match the run's student ({len(missing)} weights missing)")
    bad = first_non_finite(state)
    if bad is not None:  # a NaN never reaches an export or a sample
        raise ConfigError(f"{str(weights)!r} holds a non-finite weight ({bad}); resume from an earlier checkpoint")
    models.student.load_state_dict(state, strict=False)
    return cfg, models
