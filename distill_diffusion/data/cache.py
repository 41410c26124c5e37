"""On-disk caches of what frozen networks compute from the data: prompt embeddings (the text encoders) and image
latents (the VAE), written once by ``distill-diffusion data encode-prompts`` / ``encode-images`` and read by every
training run after.

    CACHE/cache.json              written last: kind, identity, source, row count, fields, and each shard's rows,
                                  size and SHA-256
    CACHE/shard-00000.safetensors rows [0, R): tensors with one row per item (captions as UTF-8 bytes + offsets)

A shard is written under a temporary name and renamed; a build that is killed leaves ``.partial.json`` listing the
shards already complete, which a rerun of the same command checks (SHA-256) and keeps. Reading memory-maps each
shard (`numpy.memmap` at the tensor's offset in the safetensors file), so a cache of any size costs pages, not
memory. Opening checks each shard's size and header against the manifest (a truncated or swapped file is refused in
one line); ``distill-diffusion data verify`` checks every byte against the recorded SHA-256.

The identity ties a cache to what made it: a fingerprint of the networks' weights (names, shapes, dtypes and a
strided sample of every tensor's values), the tokenizers / VAE configuration, and the resolution. A run whose text
encoders, VAE or resolution differ is refused in one line naming what differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor

from ..errors import ConfigError
from ..files import write_text_atomic

FORMAT = "distill-diffusion cache 1"
MANIFEST, PARTIAL = "cache.json", ".partial.json"
SAMPLE = 4096  # values per tensor in a fingerprint
DTYPES = {"F32": (np.float32, torch.float32), "F16": (np.float16, torch.float16), "BF16": (np.uint16, torch.bfloat16),
          "I64": (np.int64, torch.int64), "U8": (np.uint8, torch.uint8)}


# ---------------------------------------------------------------------------------------------------- identity
def fingerprint(module: torch.nn.Module) -> str:
    """A short hash of a network's weights: every tensor's name, shape and dtype, and a strided sample of its
    values. Two networks that differ anywhere but in a handful of unsampled values get different fingerprints."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() // SAMPLE)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(flat[::step][:SAMPLE].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _tokenizer_identity(tok: Any) -> str:
    probe = tok(["a photo of a cat, 4k"], padding="max_length", max_length=tok.model_max_length, truncation=True)
    return hashlib.sha256(f"{type(tok).__name__}:{len(tok)}:{tok.model_max_length}:{probe['input_ids']}".encode()
                          ).hexdigest()[:16]


def text_identity(text: Any) -> dict:
    """What a prompt cache depends on: the text encoders, tokenizers and the way prompts become conditioning."""
    return {"text_encoders": [fingerprint(e) for e in text.encoders],
            "tokenizers": [_tokenizer_identity(t) for t in text.tokenizers],
            "sdxl": bool(text.sdxl), "image_size": list(text.image_size) if text.sdxl else None}


def vae_identity(vae: torch.nn.Module, resolution: int) -> dict:
    """What a latent cache depends on: the VAE, its latent scaling and the image resolution."""
    c = vae.config
    return {"vae": fingerprint(vae), "scaling_factor": c.get("scaling_factor"),
            "shift_factor": getattr(c, "shift_factor", None), "latents_mean": getattr(c, "latents_mean", None),
            "latents_std": getattr(c, "latents_std", None), "resolution": int(resolution)}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------- writing
class CacheWriter:
    """Rows in, shards out. ``add`` takes a dict of (n, ...) tensors (and optional captions); a shard is written
    whenever ``shard_rows`` rows are waiting; ``finish`` writes the manifest. A rerun with the same identity and
    source keeps the shards a killed build completed (after checking their SHA-256) and skips their rows."""

    def __init__(self, out: Path, kind: str, identity: dict, source: dict, shard_rows: int):
        self.out, self.kind, self.shard_rows = Path(out), kind, shard_rows
        head = {"format": FORMAT, "kind": kind, "identity": identity, "source": source, "shard_rows": shard_rows}
        if (self.out / MANIFEST).is_file():
            raise ConfigError(f"{str(self.out)!r} already holds a complete cache; choose another --out or delete it")
        leftovers = self.out.exists() and any(not p.name.startswith(".") for p in self.out.iterdir())
        if leftovers and not (self.out / PARTIAL).is_file():
            raise ConfigError(f"--out {str(self.out)!r} is not empty and holds no cache being built; choose an empty "
                              "or new directory")
        self.out.mkdir(parents=True, exist_ok=True)
        self.head, self.shards, self.pending, self.fields = head, [], [], None
        partial = self.out / PARTIAL
        if partial.is_file():
            saved = json.loads(partial.read_text())
            if {k: saved.get(k) for k in head} != head:
                raise ConfigError(f"{str(self.out)!r} holds a partial cache built from another source, encoder or "
                                  "shard size; choose another --out or delete it")
            for shard in saved["shards"]:  # keep the complete, intact prefix
                path = self.out / shard["file"]
                if not path.is_file() or path.stat().st_size != shard["bytes"] or _sha256(path) != shard["sha256"]:
                    break
                self.shards.append(shard)
            self.fields = saved.get("fields")

    @property
    def done_rows(self) -> int:
        """Rows already in complete shards (a resumed build starts after them)."""
        return sum(s["rows"] for s in self.shards)

    def add(self, rows: dict[str, Tensor], captions: list[str] | None = None) -> None:
        n = len(next(iter(rows.values())))
        for i in range(n):
            self.pending.append(({k: v[i] for k, v in rows.items()}, None if captions is None else captions[i]))
        while len(self.pending) >= self.shard_rows:
            self._write(self.pending[: self.shard_rows])
            self.pending = self.pending[self.shard_rows:]

    def _write(self, rows: list[tuple[dict[str, Tensor], str | None]]) -> None:
        tensors = {k: torch.stack([r[k] for r, _ in rows]).contiguous() for k in rows[0][0]}
        if rows[0][1] is not None:
            encoded = [c.encode("utf-8") for _, c in rows]
            offsets = np.concatenate([[0], np.cumsum([len(b) for b in encoded])]).astype(np.int64)
            blob = b"".join(encoded) or b"\0"  # safetensors stores no empty tensor
            tensors["caption_bytes"] = torch.from_numpy(np.frombuffer(blob, dtype=np.uint8).copy())
            tensors["caption_offsets"] = torch.from_numpy(offsets)
        fields = {k: [str(v.dtype).removeprefix("torch."), list(v.shape[1:])] for k, v in tensors.items()
                  if not k.startswith("caption_")}
        if self.fields is not None and fields != self.fields:
            raise ValueError(f"shard fields changed from {self.fields} to {fields}")
        self.fields = fields
        name = f"shard-{len(self.shards):05d}.safetensors"
        tmp = self.out / f".tmp_{name}"
        save_file(tensors, str(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # readable as any other file the user writes (safetensors makes it 0600)
        os.replace(tmp, self.out / name)
        self.shards.append({"file": name, "rows": len(rows), "bytes": (self.out / name).stat().st_size,
                            "sha256": _sha256(self.out / name)})
        write_text_atomic(self.out / PARTIAL, json.dumps({**self.head, "fields": self.fields, "shards": self.shards}))

    def finish(self) -> Path:
        if self.pending:
            self._write(self.pending)
            self.pending = []
        if not self.shards:
            raise ConfigError("nothing to cache: the source has no rows")
        manifest = {**self.head, "count": self.done_rows, "fields": self.fields, "shards": self.shards}
        write_text_atomic(self.out / MANIFEST, json.dumps(manifest, indent=1))
        (self.out / PARTIAL).unlink(missing_ok=True)
        return self.out / MANIFEST


# ---------------------------------------------------------------------------------------------------- reading
def _header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError("shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise ValueError("header length out of range")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


def read_manifest(path: str | Path, kind: str, what: str) -> dict:
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        extra = " (a build was interrupted: rerun the same encode command to finish it)" \
            if (path / PARTIAL).is_file() else ""
        raise ConfigError(f"{what} {str(path)!r} is not a finished cache (no {MANIFEST}){extra}; make one with "
                          "`distill-diffusion data encode-prompts` or `encode-images`")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ConfigError(f"{what} {str(manifest_path)!r} is damaged (not JSON); rebuild the cache") from None
    if manifest.get("format") != FORMAT or manifest.get("kind") != kind:
        raise ConfigError(f"{what} {str(path)!r} is a {manifest.get('kind')!r} cache of format "
                          f"{manifest.get('format')!r}; expected a {kind!r} cache of {FORMAT!r}")
    return manifest


def check_identity(manifest: dict, identity: dict, path: Path, what: str) -> None:
    saved = manifest["identity"]
    for key in sorted(set(saved) | set(identity)):
        if saved.get(key) != identity.get(key):
            raise ConfigError(f"{what} {str(path)!r} was made with another {key.replace('_', ' ')} "
                              f"({saved.get(key)} vs this run's {identity.get(key)}); rebuild it for this teacher "
                              "with `distill-diffusion data encode-...`")


class Cache:
    """A finished cache, checked (manifest, identity, every shard's size and header) and memory-mapped lazily: each
    process maps the shards it reads, so the object is cheap to fork into DataLoader workers."""

    def __init__(self, path: str | Path, kind: str, identity: dict | None, what: str):
        self.path = Path(path)
        self.manifest = m = read_manifest(self.path, kind, what)
        if identity is not None:
            check_identity(m, identity, self.path, what)
        self.layout: list[dict[str, tuple[int, str, list[int]]]] = []
        for shard in m["shards"]:
            file = self.path / shard["file"]
            size = file.stat().st_size if file.is_file() else -1
            if size != shard["bytes"]:
                found = "missing" if size < 0 else f"{size} bytes, expected {shard['bytes']}"
                raise ConfigError(f"{what} shard {str(file)!r} is damaged ({found}); rebuild the cache")
            try:
                base, header = _header(file)
            except (ValueError, json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"{what} shard {str(file)!r} is damaged ({e}); rebuild the cache") from None
            layout = {}
            for name, info in header.items():
                begin, end = info["data_offsets"]
                if info["dtype"] not in DTYPES or base + end > size:
                    raise ConfigError(f"{what} shard {str(file)!r} is damaged (tensor {name}); rebuild the cache")
                layout[name] = (base + begin, info["dtype"], info["shape"])
            rows = {v[2][0] for k, v in layout.items() if not k.startswith("caption_")}
            if rows != {shard["rows"]} or set(m["fields"]) - set(layout):
                raise ConfigError(f"{what} shard {str(file)!r} does not match {MANIFEST} (rows or tensors); rebuild "
                                  "the cache")
            self.layout.append(layout)
        self.bounds = np.cumsum([0] + [s["rows"] for s in m["shards"]])
        self.fields = [k for k in m["fields"]]
        self.has_captions = "caption_offsets" in self.layout[0]
        self._maps: dict[tuple[int, str], np.ndarray] = {}
        self._pid = None

    def __len__(self) -> int:
        return int(self.bounds[-1])

    def _map(self, shard: int, name: str) -> np.ndarray:
        if self._pid != os.getpid():  # a forked worker maps its own views
            self._maps, self._pid = {}, os.getpid()
        key = (shard, name)
        if key not in self._maps:
            offset, dtype, shape = self.layout[shard][name]
            self._maps[key] = np.memmap(self.path / self.manifest["shards"][shard]["file"], dtype=DTYPES[dtype][0],
                                        mode="r", offset=offset, shape=tuple(shape))
        return self._maps[key]

    def _tensor(self, shard: int, name: str, rows: Any) -> Tensor:
        array = np.array(self._map(shard, name)[rows])  # a copy: the map stays read-only
        t = torch.from_numpy(array)
        return t.view(torch.bfloat16) if self.layout[shard][name][1] == "BF16" else t

    def row(self, i: int) -> dict[str, Tensor]:
        shard = int(np.searchsorted(self.bounds, i, side="right") - 1)
        j = int(i - self.bounds[shard])
        return {name: self._tensor(shard, name, j) for name in self.fields}

    def caption(self, i: int) -> str:
        shard = int(np.searchsorted(self.bounds, i, side="right") - 1)
        j = int(i - self.bounds[shard])
        start, end = self._map(shard, "caption_offsets")[j:j + 2]
        return bytes(self._map(shard, "caption_bytes")[start:end]).decode("utf-8")


def verify(path: str | Path) -> dict:
    """Every shard of a finished cache checked against its recorded SHA-256; the manifest, or a one-line error."""
    path = Path(path)
    kind = "prompts"
    if (path / MANIFEST).is_file():
        try:
            kind = json.loads((path / MANIFEST).read_text(encoding="utf-8")).get("kind")
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass  # read_manifest names the damage
    manifest = read_manifest(path, kind, "cache")
    for shard in manifest["shards"]:
        file = path / shard["file"]
        if not file.is_file() or file.stat().st_size != shard["bytes"] or _sha256(file) != shard["sha256"]:
            raise ConfigError(f"cache shard {str(file)!r} is damaged (its SHA-256 differs from {MANIFEST}); rebuild "
                              "the cache")
    return manifest
