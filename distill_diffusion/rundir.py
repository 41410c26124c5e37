"""The run directory: what a run writes, how a resumed run checks and finds its place, and how a finished run loads.

    RUN/config.yaml            the resolved config (resume refuses a different one)
    RUN/logs.jsonl             one line per log interval
    RUN/checkpoints/step_N/    accelerate state: model[_i].safetensors (each trainable role's own weights, in the
                               trainer's role order), optimizer[_i].bin; plus rng.safetensors, ema.safetensors,
                               method.safetensors (a method's own tensors) and trainer_state.json, written last
    RUN/final/                 student.safetensors (+ student_ema.safetensors), metrics.json, samples/
    RUN/samples/               periodic previews

Every directory is built under a temporary name and renamed into place (`distill_diffusion.files`), so a kill leaves
the previous complete version. The trainer decides when to write; this module decides what and where.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch
import yaml
from accelerate.utils import load as accelerate_load
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import sharding
from .assembly import Run, assemble
from .config import Config, parse_config
from .errors import ConfigError, RunError, first_line
from .files import check_out_dir, first_non_finite, remove_dir, replace_dir, write_text_atomic
from .lora import own_parameters

CHECKPOINT_PREFIX = "step_"
STATE_FILE = "trainer_state.json"  # written last: marks a checkpoint complete
STUDENT, STUDENT_EMA = "student.safetensors", "student_ema.safetensors"
# config sections a resumed run may change: how long it runs and how it reports, never what it computes
RESUMABLE_KEYS = {"steps", "max_seconds", "checkpoint_every", "keep_checkpoints", "log_every", "sample_every",
                  "eval_samples", "progress", "attention"}  # attention kernels compute the same function


# ------------------------------------------------------------------------------------------------ starting, resuming
def prepare(cfg: Config, run_dir: Path, resume: bool) -> tuple[Path | None, list[tuple[Path, str]]]:
    """Check that ``run_dir`` can take this run (nothing is written): (the checkpoint to resume from, if any: the
    newest intact one; the damaged newer ones, which `set_aside` moves away once the run is accepted)."""
    check_out_dir(run_dir)
    empty = not run_dir.exists() or not any(run_dir.iterdir())
    if resume and empty:  # killed before anything was written (or never started): --resume is safe to pass always
        return None, []
    if resume:
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"cannot resume: {str(run_dir)!r} holds no run (no config.yaml)")
        # parsed first, so a key added since the run was saved compares at its default
        check_same_config(read_saved_config(saved).to_dict(), cfg.to_dict())
        return intact_checkpoint(run_dir)
    if not empty:
        raise ConfigError(f"run directory {str(run_dir)!r} is not empty; pass --resume to continue it or choose "
                          "another --out")
    return None, []


def check_same_config(saved: dict, current: dict) -> None:
    """A resumed run computes what the saved one computed: only `RESUMABLE_KEYS` of ``train`` and ``eval`` may
    differ."""
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


def load_run_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{str(run_dir)!r} is not a run directory (no config.yaml)")
    return read_saved_config(path)


def read_saved_config(path: Path) -> Config:
    """A run's ``config.yaml``; a damaged one is refused in one line naming it."""
    try:
        return parse_config(yaml.safe_load(path.read_text(encoding="utf-8")))
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"run config {str(path)!r} is damaged ({first_line(e)}); restore it from a copy") from None
    except ConfigError as e:
        raise ConfigError(f"run config {str(path)!r}: {e}") from None


def append_log(run_dir: Path, record: dict) -> None:
    with open(run_dir / "logs.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def trim_log(run_dir: Path, step: int) -> None:
    """Drop the log lines of steps after ``step`` (lost to a kill) and the final record, before training resumes."""
    logs = run_dir / "logs.jsonl"
    if logs.is_file():
        lines = [line for line in logs.read_text().splitlines(keepends=True) if line.endswith("\n")]
        records = [json.loads(line) for line in lines]
        write_text_atomic(logs, "".join(line for line, r in zip(lines, records)
                                        if r.get("step", 0) <= step and not r.get("final")))


# ------------------------------------------------------------------------------------------------ checkpoints
def checkpoints(run_dir: Path) -> list[Path]:
    """The published checkpoints of a run, oldest first (`checkpoint_problem` tells whether one is intact)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    # published only whole (renamed into place), so one without its state file was damaged since: resume finds it
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
            and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(done, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def checkpoint_problem(path: Path) -> str | None:
    """What is wrong with checkpoint ``path`` (a file missing, of another size than written, unreadable, or holding a
    non-finite number), as ``file: reason``; None when every file loads. Files are read one tensor at a time."""
    if not (path / STATE_FILE).is_file():
        return f"{STATE_FILE}: missing"
    try:
        counters = json.loads((path / STATE_FILE).read_text())
        manifest = counters.get("files")
        int(counters["step"])
    except Exception as e:  # noqa: BLE001 (any damage: bad bytes, bad JSON, missing keys)
        return f"{STATE_FILE}: {first_line(e)}"
    for name, size in (manifest or {}).items():  # checkpoints written before the manifest have none
        file = path / name
        if not file.is_file():
            return f"{name}: missing"
        if file.stat().st_size != size:
            return f"{name}: {file.stat().st_size} bytes, written as {size}"
    for file in sorted(path.iterdir()):
        if file.name == STATE_FILE:
            continue
        try:
            bad = _non_finite_in(file)
        except Exception as e:  # noqa: BLE001 (safetensors, zip and pickle each word damage their own way)
            return f"{file.name}: unreadable ({first_line(e)})"
        if bad is not None:
            return f"{file.name}: {bad} is not finite"
    return None


def _non_finite_in(file: Path) -> str | None:
    if file.suffix == ".safetensors":
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                if first_non_finite({key: f.get_tensor(key)}) is not None:
                    return key
        return None
    if file.suffix in (".bin", ".pkl", ".pt"):  # accelerate's optimizer and RNG states, read as accelerate reads them
        return _first_non_finite_nested(accelerate_load(str(file), map_location="cpu"))
    return None


def _first_non_finite_nested(value: object, name: str = "") -> str | None:
    if isinstance(value, torch.Tensor):
        return (name or "a tensor") if first_non_finite({name: value}) is not None else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list | tuple) else ()
    for key, item in items:
        bad = _first_non_finite_nested(item, f"{name}.{key}" if name else str(key))
        if bad is not None:
            return bad
    return None


def intact_checkpoint(run_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(the newest checkpoint whose files all load, the damaged newer ones with what is wrong). A run whose every
    checkpoint is damaged is refused in one line, and nothing is changed."""
    damaged: list[tuple[Path, str]] = []
    found = checkpoints(run_dir)
    for path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, damaged
        damaged.append((path, problem))
    if damaged:
        path, problem = damaged[0]
        raise RunError(f"cannot resume {str(run_dir)!r}: every checkpoint is damaged (the newest, {path.name}: "
                       f"{problem}); nothing was changed: restore a checkpoint or start a new --out directory")
    return None, damaged


def set_aside(damaged: list[tuple[Path, str]], resumed: Path) -> list[str]:
    """Rename each damaged checkpoint to ``damaged_step_N`` beside it (kept, never deleted; `checkpoints` no longer
    lists it) and say so in one line each; the new names."""
    names = []
    for path, problem in damaged:
        aside = path.with_name(f"damaged_{path.name}")
        n = 1
        while aside.exists():
            n += 1
            aside = path.with_name(f"damaged_{path.name}.{n}")
        os.replace(path, aside)
        names.append(aside.name)
        print(f"distill-diffusion: checkpoint {path.name} is damaged ({problem}); moved aside to "
              f"{str(aside)!r}; resuming from {resumed.name}", file=sys.stderr)
    return names


def checkpoint_paths(run_dir: Path, step: int) -> tuple[Path, Path]:
    """(where checkpoint ``step`` is published, the temporary directory it is written in)."""
    final = run_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:08d}"
    return final, final.with_name(f".tmp_{final.name}")


def clear_stale(run_dir: Path) -> None:
    """Remove what an earlier kill left half-written under ``checkpoints/``."""
    root = run_dir / "checkpoints"
    for stale in root.iterdir() if root.is_dir() else []:
        if stale.name.startswith((".tmp_", ".old_")):
            shutil.rmtree(stale, ignore_errors=True)


def publish_checkpoint(tmp: Path, final: Path, run_dir: Path, keep: int) -> None:
    """Rename the complete ``tmp`` into place, then drop all but the newest ``keep`` checkpoints."""
    replace_dir(tmp, final)
    for old in checkpoints(run_dir)[:-keep]:
        remove_dir(old)


def trainable_state(module: torch.nn.Module, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """The weights a role trains (frozen parts such as the mixture teacher inside a residual MLP, a shared base and
    other roles' adapters are left out); ``names`` (the trainer's, fixed at build) or the module's own parameters."""
    names = set(own_parameters(module)) if names is None else names
    # full tensors: gathering a sharded role's weights is a collective, so every process calls this
    return {k: sharding.full(v.detach()).cpu().contiguous() for k, v in module.state_dict().items() if k in names}


def role_weights_file(directory: str | Path, index: int) -> Path:
    """accelerate's name for the ``index``-th prepared model's weights."""
    return Path(directory) / ("model.safetensors" if index == 0 else f"model_{index}.safetensors")


def checked_role_weights(module: torch.nn.Module, names: set[str], role: str, step: int) -> dict[str, torch.Tensor]:
    """A role's own weights for a checkpoint; a non-finite one is refused, so a NaN never reaches a checkpoint."""
    state = trainable_state(module, names)
    bad = first_non_finite(state)
    if bad is not None:
        raise RunError(f"refusing to checkpoint step {step}: the {role}'s weight {bad} is not finite (the previous "
                       "checkpoint is intact)")
    return state


def read_role_weights(directory: str | Path, index: int, names: set[str], role: str) -> dict[str, torch.Tensor]:
    """The ``role``'s weights from a checkpoint, which must hold every one of ``names``."""
    state = load_file(str(role_weights_file(directory, index)))
    missing = names - set(state)
    if missing:
        raise ConfigError(f"checkpoint {str(directory)!r} lacks {len(missing)} of the {role}'s weights (e.g. "
                          f"{sorted(missing)[0]}); it was written by a run with another model config")
    return state


def write_trainer_state(tmp: Path, generator_state: torch.Tensor, ema: dict[str, torch.Tensor] | None,
                        method_state: dict[str, torch.Tensor], counters: dict) -> None:
    """What a checkpoint holds beside accelerate's state; ``trainer_state.json`` last."""
    save_file({"generator": generator_state}, str(tmp / "rng.safetensors"))
    if ema is not None:
        save_file(ema, str(tmp / "ema.safetensors"))
    if method_state:
        save_file({k: v.detach().cpu().contiguous() for k, v in method_state.items()}, str(tmp / "method.safetensors"))
    # every file's size, so resume can tell a truncated or missing file (`checkpoint_problem`)
    files = {f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.is_file() and f.name != STATE_FILE}
    (tmp / STATE_FILE).write_text(json.dumps({**counters, "files": files}))


def read_trainer_state(path: Path) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None, dict[str, torch.Tensor],
                                            dict]:
    """(generator state, EMA weights or None, the method's tensors, counters) of checkpoint ``path``."""
    generator_state = load_file(str(path / "rng.safetensors"))["generator"].to(torch.uint8)
    ema = load_file(str(path / "ema.safetensors")) if (path / "ema.safetensors").is_file() else None
    method = load_file(str(path / "method.safetensors")) if (path / "method.safetensors").is_file() else {}
    return generator_state, ema, method, json.loads((path / STATE_FILE).read_text())


# ------------------------------------------------------------------------------------------------ a finished run
def write_final(tmp: Path, weights: dict[str, dict[str, torch.Tensor]]) -> None:
    """A fresh ``tmp`` holding the final weight files (`STUDENT`, `STUDENT_EMA`); `publish` renames it to final/."""
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, state in weights.items():
        save_file(state, str(tmp / name))


def publish(tmp: Path, final: Path) -> None:
    replace_dir(tmp, final)


def load_finished_run(run_dir: str | Path, ema: bool = True) -> Run:
    """A finished run assembled to sample: its config and models, with the student's trained (EMA if any) weights."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    weights = run_dir / "final" / (STUDENT_EMA if ema else STUDENT)
    if not weights.is_file():
        weights = run_dir / "final" / STUDENT
    if not weights.is_file():
        raise ConfigError(f"run {str(run_dir)!r} has no trained student (no final/{STUDENT}); finish or resume the "
                          "run first")
    try:
        state = load_file(str(weights))
    except Exception as e:  # noqa: BLE001 (safetensors words each kind of damage its own way)
        raise ConfigError(f"{str(weights)!r} is damaged ({first_line(e)}); export again from the run's newest "
                          "checkpoint (--resume finishes it) or restore a copy") from None
    run = assemble(cfg, train=False)
    student = run.models.student
    missing = set(trainable_state(student)) - set(state)
    if missing:
        raise ConfigError(f"{str(weights)!r} does not match the run's student ({len(missing)} weights missing)")
    bad = first_non_finite(state)
    if bad is not None:  # a NaN never reaches an export or a sample
        raise ConfigError(f"{str(weights)!r} holds a non-finite weight ({bad}); resume from an earlier checkpoint")
    student.load_state_dict(state, strict=False)
    return run
