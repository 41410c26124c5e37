"""The training loop: one readable loop on accelerate that knows no method.

Each step the method names the role that updates (``method.phase(step)``) and gives its loss; the trainer owns
devices, precision, one optimizer per trainable role, clipping, the student's EMA, checkpoints, logs and previews.
What the run is comes from assembly (`distill_diffusion.assembly`); where and in which files it is written, from the
run directory module (`distill_diffusion.rundir`); what processes do together, from `distill_diffusion.collectives`.
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
from accelerate import Accelerator
from safetensors import SafetensorError
from tqdm.auto import tqdm

from . import rundir, sharding, zero
from .assembly import assemble
from .collectives import agree, all_finite, broadcast_parameters, check_parallel, sync_gradients
from .config import Config
from .draws import ShardedGenerator
from .ema import EMA
from .errors import ConfigError, RunError, first_line
from .lora import own_parameters
from .memory import HALF, cast_frozen, check_optimizer, make_optimizer, set_attention
from .preview import preview

MAX_NONFINITE_IN_A_ROW = 10


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path | None = None, resume: bool = False, pipeline: Any = None):
        """``run_dir``: where the run is written; None trains in memory (`train_step` only: no checkpoints, logs or
        final weights). ``pipeline``: the teacher as a diffusers pipeline already in memory."""
        self.cfg = cfg
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.resume_from, damaged = (None, []) if self.run_dir is None else rundir.prepare(cfg, self.run_dir, resume)
        self.set_aside: list[str] = []  # damaged checkpoints moved aside (names), by the main process
        tc = cfg.train
        self.sharding = sharding.requested()  # an accelerate FSDP launch (read before accelerate sees it)
        self.zero = zero.requested()  # or a DeepSpeed ZeRO-1/2 launch
        if self.zero is not None:
            zero.check(cfg)
        self.accelerator = Accelerator(mixed_precision=tc.mixed_precision)
        device = self.accelerator.device
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        check_parallel(self.accelerator, tc.batch_size)

        # 1. the run: roles, method and data (distill_diffusion.assembly), then precision and memory settings
        self.run = assemble(cfg, train=True, pipeline=pipeline, device=device)
        self.models, self.method, self.data = self.run.models, self.run.method, self.run.data
        set_attention(self.models, tc.attention, device)
        check_optimizer(tc.optimizer)
        half = HALF.get(tc.mixed_precision)
        if half is not None and tc.half_frozen:  # after assembly: prompts and real images encode in fp32
            cast_frozen(self.models, half)
        roles = self.models.trainable()
        to_shard = [] if self.sharding is None else sharding.roles_to_shard(roles, tc.optimizer,
                                                                            self.run.needs.copies_student, cfg.method)
        # the run directory is written only once everything above has been accepted
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if self.is_main:  # one writer: two through the same temporary name race (FileNotFound)
                cfg.save(self.run_dir / "config.yaml")  # atomically
                self.set_aside = rundir.set_aside(damaged, self.resume_from)

        # 2. one optimizer per trainable role
        for module in roles.values():
            net = sharding.network(module)
            if tc.gradient_checkpointing and hasattr(net, "enable_gradient_checkpointing"):
                net.enable_gradient_checkpointing()
        # data parallelism without DDP wrappers: roles may share one UNet (LoRA adapters) and methods call them
        # through Models, so the trainer averages each updating role's gradients itself (``sync_gradients``)
        self.roles = {r: self.accelerator.prepare_model(m, evaluation_mode=True) for r, m in roles.items()}
        for module in self.roles.values():  # every step already runs under accelerator.autocast(); accelerate's own
            if hasattr(module, "_original_forward"):  # per-role autocast wrapper would stop a method from running a
                module.forward = module._original_forward  # role in full precision (DMD2's critic, as the reference)
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
        # one seed on every process; per-sample draws are sliced per process (distill_diffusion.draws)
        self.generator = ShardedGenerator(device, tc.seed, self.rank, self.world)
        self.step = 0
        self.counts = {r: 0 for r in roles}
        self.skipped = 0
        self.bad_in_a_row = 0

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
        final, tmp = rundir.checkpoint_paths(self.run_dir, self.step)
        if self.is_main:
            rundir.clear_stale(self.run_dir)
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
        if agree(error is None, self.world) and self.is_main:
            try:
                rundir.write_trainer_state(tmp, self.generator.get_state(), ema, self.method.state_dict(),
                                           {"step": self.step, "counts": self.counts, "skipped": self.skipped,
                                            "data": self.data.state_dict()})
            except Exception as e:
                error = e
        if not agree(error is None, self.world):
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(error, RunError):  # refused before writing (non-finite weights): already one line
                raise error
            previous = rundir.latest_checkpoint(self.run_dir)
            kept = f"{previous.name} is intact" if previous else "there is no earlier checkpoint"
            reason = "another process failed to write its part" if error is None else first_line(error)
            raise RunError(f"could not write checkpoint {final.name} in {str(final.parent)!r} ({reason}); {kept}: "
                           "free space and rerun with --resume") from error
        if self.is_main:
            rundir.publish_checkpoint(tmp, final, self.run_dir, self.cfg.train.keep_checkpoints)
        self.accelerator.wait_for_everyone()
        return final

    def load_checkpoint(self, path: Path) -> None:
        self.accelerator.load_state(str(path))
        generator_state, ema, method_state, counters = rundir.read_trainer_state(path)
        self.generator.set_state(generator_state)
        if self.ema is not None:
            if ema is None:
                raise ConfigError(f"checkpoint {str(path)!r} holds no EMA weights; it was written with "
                                  "train.ema_decay 0")
            self.ema.shadow = {k: sharding.like(ema[k], v) for k, v in self.ema.shadow.items()}
        if method_state:
            self.method.load_state_dict({k: v.to(self.accelerator.device) for k, v in method_state.items()})
        self.step, self.counts, self.skipped = counters["step"], counters["counts"], counters["skipped"]
        self.data.load_state_dict(counters.get("data", {}))  # streamed sources continue at the saved row

    def _save_own_weights(self, models: list, weights: list, output_dir: str) -> None:
        for i, role in enumerate(self.roles):  # accelerate saves weights[i] as model[_i].safetensors, in prepare order
            module = self.accelerator.unwrap_model(self.roles[role])
            weights[i] = rundir.checked_role_weights(module, self.own_names[role], role, self.step)

    def _load_own_weights(self, models: list, input_dir: str) -> None:
        for i, role in enumerate(self.roles):
            state = rundir.read_role_weights(input_dir, i, self.own_names[role], role)
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
        """Train to ``train.steps`` (from the latest checkpoint when resuming), then write the final weights; the
        final known-answer metrics (mixture teachers) or {}."""
        if self.run_dir is None:
            raise ValueError("Trainer.train writes a run directory: give run_dir (train_step trains in memory)")
        tc = self.cfg.train
        if self.resume_from is not None:
            self.load_checkpoint(self.resume_from)
        if self.is_main:  # drop what steps lost to a kill had logged
            rundir.trim_log(self.run_dir, self.step)
        self._log({"step": self.step, "started_from": self.resume_from.name if self.resume_from else None,
                   **({"set_aside": self.set_aside} if self.set_aside else {}),
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
            # a wall-clock budget (the leaderboard's equal budget per method): every process stops at the same step
            if tc.max_seconds and self.step < tc.steps and not agree(time.time() - t0 < tc.max_seconds, self.world):
                self._log({"step": self.step, "stopped": f"train.max_seconds {tc.max_seconds:g} reached"})
                break
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
        if self.is_main:
            rundir.append_log(self.run_dir, record)

    def _finish(self) -> dict[str, float]:
        """Final checkpoint, student weights (raw and EMA) and the end-of-run preview/metrics."""
        last = self.save_checkpoint()
        final, tmp = self.run_dir / "final", self.run_dir / ".tmp_final"
        student, names = self.models.student, self.own_names["student"]  # resharded by save_checkpoint
        weights: dict[str, dict[str, torch.Tensor]] = {}
        if self.is_main or "student" in self.sharded:  # gathering a sharded student takes every process
            raw = rundir.trainable_state(student, names)
            if self.ema is not None:  # the raw weights may share storage with the student's (CPU): copy them first
                raw = {k: v.clone() for k, v in raw.items()}
                self.ema.copy_to(student)  # previews and `sample` use the EMA weights when there are some
                weights[rundir.STUDENT_EMA] = rundir.trainable_state(student, names)
            weights[rundir.STUDENT] = raw
        metrics: dict[str, float] = {}
        error: Exception | None = None
        if self.is_main:
            try:
                rundir.write_final(tmp, weights)
            except Exception as e:
                error = e
        if agree(error is None, self.world):  # the other processes must not wait for a process that failed
            try:
                metrics = self._preview(tmp / "samples")
                if self.is_main:
                    metrics = {"step": self.step, **{k: v for k, v in metrics.items() if not math.isnan(v)}}
                    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
                    rundir.publish(tmp, final)
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
