"""Data at scale (issue 23): lazily indexed prompt and image sources, the seeded resumable epoch order and its split
between processes, and the on-disk caches (identity, damage, rebuild). Training-level checks use the tiny SD 1.5
pipeline; the memory bound runs in subprocesses so each measures its own peak."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_config
from PIL import Image
from safetensors.torch import load_file

from distill_diffusion.assembly import assemble
from distill_diffusion.data import PromptData, first_prompts
from distill_diffusion.data.cache import Cache, verify
from distill_diffusion.data.images import open_image_source, square_crop
from distill_diffusion.data.prepare import encode_images, encode_prompts
from distill_diffusion.data.sources import open_text_source
from distill_diffusion.data.stream import Feed, _item
from distill_diffusion.draws import ShardedGenerator
from distill_diffusion.errors import ConfigError
from distill_diffusion.trainer import Trainer

PROMPTS = ["a red cube", "", "  a blue sphere  ", "a cat on a mat, photo", "two dogs", "a \"quoted\" word"]


def one_line(error: type[Exception], fn, *args, **kwargs) -> str:  # noqa: ANN001
    with pytest.raises(error) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value), str(info.value)
    return str(info.value)


def write_sources(root: Path) -> dict[str, str]:
    """The same non-blank prompts as every kind of source the toolkit reads."""
    kept = [p.strip() for p in PROMPTS if p.strip()]
    (root / "p.txt").write_text("\n".join(PROMPTS) + "\n\n")
    (root / "p.jsonl").write_text("\n".join(json.dumps({"id": i, "caption": p}) for i, p in enumerate(kept)) + "\n")
    with open(root / "p.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        w.writerows([i, p] for i, p in enumerate(kept))
    with open(root / "p.tsv", "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["prompt", "x"])
        w.writerows([p, i] for i, p in enumerate(kept))
    with tarfile.open(root / "shard-0.tar", "w") as tar:
        for i, p in enumerate(kept):
            data = p.encode() if i % 2 else json.dumps({"caption": p}).encode()
            info = tarfile.TarInfo(f"{i:06d}.{'txt' if i % 2 else 'json'}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = {k: str(root / f"p.{k}") for k in ("txt", "jsonl", "csv", "tsv")}
    out["tar"] = str(root / "shard-0.tar")
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_dict({"caption": kept, "n": list(range(len(kept)))})
    table.to_parquet(str(root / "p.parquet"))
    table.save_to_disk(str(root / "saved"))
    out["parquet"], out["saved"] = str(root / "p.parquet"), str(root / "saved")
    return out


def test_every_prompt_source_reads_the_same_prompts(tmp_path: Path) -> None:
    kept = [p.strip() for p in PROMPTS if p.strip()]
    for kind, spec in write_sources(tmp_path).items():
        source = open_text_source(spec)
        assert [source[i] for i in range(len(source))] == kept, kind
    assert "has no column 'nope'" in one_line(ConfigError, open_text_source, str(tmp_path / "p.csv"), "nope")
    (tmp_path / "multi.csv").write_text('text\n"line one\nline two"\nplain\n')
    multi = open_text_source(str(tmp_path / "multi.csv"))
    assert [multi[i] for i in range(len(multi))] == ["line one\nline two", "plain"]
    (tmp_path / "bad.txt").write_bytes(b"fine\n\xff\xfe broken\n")
    assert "not UTF-8" in one_line(ConfigError, open_text_source, str(tmp_path / "bad.txt"))
    (tmp_path / "p.docx").write_bytes(b"PK")
    assert "unknown kind of file '.docx'" in one_line(ConfigError, open_text_source, str(tmp_path / "p.docx"))


def test_epochs_cover_every_row_once_split_disjointly_between_processes(tmp_path: Path) -> None:
    """Two processes (rank 0 and 1 of 2) with DataLoader workers: their rows never overlap within an epoch, and
    together they read every row of each epoch exactly once; the second epoch is another permutation."""
    n, batch = 40, 5
    (tmp_path / "p.txt").write_text("".join(f"prompt {i}\n" for i in range(n)))
    source = open_text_source(str(tmp_path / "p.txt"))
    per_rank = []
    for rank in (0, 1):
        feed = Feed(source, _item, seed=3, stream="prompts", workers=2, prefetch=2)
        per_rank.append([p for _ in range(2 * n // (2 * batch)) for p in feed.next(batch, rank, 2)])
    epoch = [per_rank[r][k * batch:(k + 1) * batch] for k in range(n // (2 * batch)) for r in (0, 1)]
    first = [p for chunk in epoch for p in chunk]
    assert sorted(first) == sorted(f"prompt {i}" for i in range(n))  # one epoch: every row once
    assert not set(per_rank[0][: n // 2]) & set(per_rank[1][: n // 2])
    second = per_rank[0][n // 2:] + per_rank[1][n // 2:]
    assert sorted(second) == sorted(first) and second != per_rank[0][: n // 2] + per_rank[1][: n // 2]


def test_a_feed_resumes_at_the_saved_row(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("".join(f"p{i}\n" for i in range(23)))
    source = open_text_source(str(tmp_path / "p.txt"))
    straight = Feed(source, _item, seed=0, stream="prompts", workers=2, prefetch=2)
    expected = [straight.next(4, 0, 1) for _ in range(12)]  # crosses two epoch boundaries
    first = Feed(source, _item, seed=0, stream="prompts", workers=2, prefetch=2)
    got = [first.next(4, 0, 1) for _ in range(5)]
    resumed = Feed(source, _item, seed=0, stream="prompts", workers=0, prefetch=2)
    resumed.load_state(first.position)
    got += [resumed.next(4, 0, 1) for _ in range(7)]
    assert got == expected
    other_seed = Feed(source, _item, seed=1, stream="prompts", workers=0, prefetch=2)
    assert [other_seed.next(4, 0, 1) for _ in range(3)] != expected[:3]


def sd15(tmp_path: Path, steps: int, **data) -> object:  # noqa: ANN001
    return make_config("dmd2", "tiny:sd15", args={"critic_updates": 1},
                       train={"steps": steps, "batch_size": 2, "checkpoint_every": 3, "eval_samples": 8},
                       data={"workers": 1, **data})


def test_a_killed_run_continues_the_data_order_bit_identically(tmp_path: Path) -> None:
    """A run stopped at its step-3 checkpoint and resumed to step 6 ends with the weights of a run that never
    stopped: the prompt file's position is part of the checkpoint. Without it (position reset to 0 on resume) the
    weights differ, so the test can tell."""
    (tmp_path / "p.txt").write_text("".join(f"a photo of thing {i}\n" for i in range(9)))
    data = {"prompt_file": str(tmp_path / "p.txt")}
    Trainer(sd15(tmp_path, 6, **data), tmp_path / "straight").train()
    Trainer(sd15(tmp_path, 3, **data), tmp_path / "stopped").train()
    state = json.loads((tmp_path / "stopped/checkpoints/step_00000003/trainer_state.json").read_text())
    assert state["data"] == {"prompts": 6}
    Trainer(sd15(tmp_path, 6, **data), tmp_path / "stopped", resume=True).train()
    straight = load_file(str(tmp_path / "straight/final/student.safetensors"))
    resumed = load_file(str(tmp_path / "stopped/final/student.safetensors"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    # the same resume with the data position dropped must differ
    wrong = Trainer(sd15(tmp_path, 6, **data), tmp_path / "wrong")
    wrong.train()
    restarted = Trainer(sd15(tmp_path, 6, **data), tmp_path / "restarted")
    restarted.load_checkpoint(tmp_path / "stopped/checkpoints/step_00000003")
    restarted.data.load_state_dict({})
    restarted.train()
    other = load_file(str(tmp_path / "restarted/final/student.safetensors"))
    assert any(not torch.equal(straight[k], other[k]) for k in straight)


MEMORY_PROBE = """
import resource, sys, torch
from distill_diffusion.assembly import assemble
from distill_diffusion.config import parse_config
from distill_diffusion.draws import ShardedGenerator
cfg = parse_config({"method": "dmd2", "model": {"teacher": "embedded:digits"}, "train": {"progress": False},
                    "data": {"prompt_file": sys.argv[1], "workers": 2}})
data = assemble(cfg, train=True).data
g = ShardedGenerator("cpu", 0)
for _ in range(3):
    data.sample(64, g)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def test_memory_does_not_grow_with_the_number_of_prompts(tmp_path: Path) -> None:
    """Peak resident memory of the data path for 10,000 and 400,000 prompts (each in its own process, workers
    included) agree within 40 MB. Holding the embeddings, as the data path did before streaming, would add about
    800 MB for the larger file (400,000 x 16 tokens x width 32 in fp32), twice with the per-prompt null copies."""
    peaks = []
    for n in (10_000, 400_000):
        path = tmp_path / f"p{n}.txt"
        with open(path, "w") as f:
            f.writelines(f"a handwritten digit {i % 10}, variation {i}\n" for i in range(n))
        out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(path)], capture_output=True, text=True,
                             check=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
        main, workers = map(int, out.stdout.split()[-2:])
        peaks.append((main / 1024, workers / 1024))
    assert abs(peaks[1][0] - peaks[0][0]) < 40, peaks
    assert abs(peaks[1][1] - peaks[0][1]) < 40, peaks


def test_cached_prompts_give_the_embeddings_encoding_gives(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text("\n".join(f"prompt number {i}" for i in range(7)))
    cfg = sd15(tmp_path, 1, prompt_file=str(tmp_path / "p.txt"))
    encode_prompts(cfg, tmp_path / "cache", batch=3, dtype="float32")
    (tmp_path / "cache" / "cache.json").read_text()
    streamed = assemble(cfg, train=True).data
    cached = assemble(sd15(tmp_path, 1, prompt_cache=str(tmp_path / "cache")), train=True).data
    assert isinstance(cached, PromptData)
    a, b = streamed.sample(4, ShardedGenerator("cpu", 0)), cached.sample(4, ShardedGenerator("cpu", 0))
    assert torch.allclose(a.cond.embeds, b.cond.embeds, atol=1e-6)
    assert torch.equal(a.cond.uncond.embeds, b.cond.uncond.embeds) and torch.equal(a.noise, b.noise)
    # previews and report grids of a run that names only the cache show the prompts it was made from
    assert first_prompts(sd15(tmp_path, 1, prompt_cache=str(tmp_path / "cache")).data, 3) == \
        ["prompt number 0", "prompt number 1", "prompt number 2"]
    # another text encoder (the digits teacher's) is refused in one line, before anything is written
    other = make_config("dmd2", "embedded:digits", data={"prompt_cache": str(tmp_path / "cache")})
    message = one_line(ConfigError, Trainer, other, tmp_path / "run")
    assert "made with another text encoders" in message and not (tmp_path / "run").exists()


def image_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    (root / "imgs" / "nested").mkdir(parents=True)
    for i, (w, h) in enumerate([(20, 12), (9, 30), (16, 16), (48, 40), (33, 17)]):
        folder = root / "imgs" / ("nested" if i % 2 else "")
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        if i == 0:
            (folder / "0.txt").write_text("a red thing")
        if i == 1:
            (folder / "1.json").write_text(json.dumps({"caption": "a json caption"}))
    (root / "imgs" / "metadata.jsonl").write_text(json.dumps({"file_name": "2.png", "text": "from metadata"}) + "\n")
    return root / "imgs"


def test_images_are_resized_and_center_cropped_as_diffusers_scripts_do(tmp_path: Path) -> None:
    """The crop matches torchvision's Resize(size) + CenterCrop(size) (what diffusers' training scripts apply)."""
    from torchvision import transforms

    folder = image_folder(tmp_path)
    source = open_image_source(str(folder), 16)
    assert len(source) == 5
    captions = {f.name: source[i][1] for i, f in enumerate(source.files)}
    assert captions["0.png"] == "a red thing" and captions["1.png"] == "a json caption"
    assert captions["2.png"] == "from metadata" and captions["3.png"] == ""
    reference = transforms.Compose([transforms.Resize(16, interpolation=transforms.InterpolationMode.BICUBIC),
                                    transforms.CenterCrop(16), transforms.ToTensor()])
    for f in source.files:
        img = Image.open(f)
        ours = square_crop(img, 16, f.name)
        assert ours.shape == (3, 16, 16)
        assert torch.allclose((ours + 1) / 2, reference(img.convert("RGB")), atol=1 / 255 + 1e-6), f.name
    (folder / "tiny.png").parent.mkdir(exist_ok=True)
    Image.fromarray(np.zeros((5, 30, 3), dtype=np.uint8)).save(folder / "tiny.png")
    assert "at least 8x8" in one_line(ConfigError, open_image_source, str(folder), 16)


def test_an_image_cache_matches_encoding_and_is_refused_when_damaged_or_foreign(tmp_path: Path) -> None:
    folder = image_folder(tmp_path)
    cfg = make_config("dmd2", "embedded:digits", args={"gan_student_weight": 0.01, "gan_critic_weight": 0.01},
                      data={"real": str(folder), "workers": 0})
    encode_images(cfg, tmp_path / "latents", batch=2, dtype="float32", workers=1)
    cache = Cache(tmp_path / "latents", "images", None, "cache")
    run = assemble(cfg, train=True)
    source = open_image_source(str(folder), 16)
    from distill_diffusion.latents import encode
    direct = encode(run.models, torch.stack([source[i][0] for i in range(len(source))]))
    assert torch.allclose(torch.stack([cache.row(i)["latents"] for i in range(len(cache))]), direct, atol=1e-5)
    assert [cache.caption(i) for i in range(len(cache))] == [source[i][1] for i in range(len(source))]
    cached = make_config("dmd2", "embedded:digits", args={"gan_student_weight": 0.01, "gan_critic_weight": 0.01},
                         data={"real_cache": str(tmp_path / "latents"), "workers": 0})
    batch = assemble(cached, train=True).data.sample(3, ShardedGenerator("cpu", 0))
    assert batch.real.shape == (3, *run.models.sample_shape)
    # made at another resolution, or by another VAE: refused in one line naming which
    manifest = json.loads((tmp_path / "latents/cache.json").read_text())
    for key, value in (("resolution", 32), ("vae", "0123456789abcdef")):
        edited = tmp_path / f"edited_{key}"
        edited.mkdir()
        for f in (tmp_path / "latents").iterdir():
            (edited / f.name).write_bytes(f.read_bytes())
        m = json.loads(json.dumps(manifest))
        m["identity"][key] = value
        (edited / "cache.json").write_text(json.dumps(m))
        foreign = make_config("dmd2", "embedded:digits", args={"gan_student_weight": 0.01, "gan_critic_weight": 0.01},
                              data={"real_cache": str(edited)})
        assert f"made with another {key}" in one_line(ConfigError, assemble, foreign, train=True)
    # a truncated shard is refused at open; a flipped byte is caught by verify; neither is half-read
    shard = tmp_path / "latents" / manifest["shards"][0]["file"]
    raw = shard.read_bytes()
    shard.write_bytes(raw[:-7])
    assert "is damaged" in one_line(ConfigError, assemble, cached, train=True)
    shard.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    assert "SHA-256" in one_line(ConfigError, verify, tmp_path / "latents")


def test_a_killed_cache_build_resumes_and_rebuilds_a_damaged_shard(tmp_path: Path) -> None:
    """A build whose partial manifest lists three shards, one of them damaged, keeps the intact prefix and rebuilds
    the rest; the result is byte-identical to a build that was never interrupted."""
    (tmp_path / "p.txt").write_text("\n".join(f"prompt {i}" for i in range(10)))
    cfg = sd15(tmp_path, 1, prompt_file=str(tmp_path / "p.txt"))
    import distill_diffusion.data.prepare as enc
    shard_bytes = enc.SHARD_BYTES
    enc.SHARD_BYTES = 1  # one row per shard
    try:
        encode_prompts(cfg, tmp_path / "clean", batch=4, dtype="float32")
        partial = tmp_path / "partial"
        encode_prompts(cfg, partial, batch=4, dtype="float32")
        manifest = json.loads((partial / "cache.json").read_text())
        (partial / "cache.json").unlink()  # as if killed before the manifest: the partial record remains
        (partial / ".partial.json").write_text(json.dumps({**manifest, "shards": manifest["shards"][:3]}))
        for f in manifest["shards"][3:]:
            (partial / f["file"]).unlink()
        second = partial / manifest["shards"][1]["file"]
        second.write_bytes(second.read_bytes()[:-3])
        assert "not a finished cache" in one_line(ConfigError, Cache, partial, "prompts", None, "data.prompt_cache")
        encode_prompts(cfg, partial, batch=4, dtype="float32")
    finally:
        enc.SHARD_BYTES = shard_bytes
    clean = json.loads((tmp_path / "clean/cache.json").read_text())
    assert json.loads((partial / "cache.json").read_text())["shards"] == clean["shards"]
    assert "already holds a complete cache" in one_line(ConfigError, encode_prompts, cfg, partial)


def test_the_digits_images_still_build_once_the_cache_commands_are_imported() -> None:
    """Importing `distill_diffusion.data.prepare` (the cache commands; this module does at the top) must not shadow
    anything the data package uses: a submodule named like a function the package imported once did."""
    import distill_diffusion.data.prepare  # noqa: F401

    cfg = make_config("dmd2", "embedded:digits", args={"gan_student_weight": 0.01, "gan_critic_weight": 0.01},
                      data={"real": "digits"})
    batch = assemble(cfg, train=True).data.sample(2, ShardedGenerator("cpu", 0))
    assert batch.real is not None and batch.real.shape[0] == 2


def test_image_shards_and_image_tables_read_like_a_folder(tmp_path: Path) -> None:
    """The same three images as WebDataset shard members and as a `datasets` image column: the same crops and
    captions as the folder source gives."""
    rng = np.random.default_rng(1)
    sizes = ((20, 12), (9, 30), (16, 16))
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    captions = ["first", "second", ""]
    folder = tmp_path / "folder"
    folder.mkdir()
    with tarfile.open(tmp_path / "images-0.tar", "w") as tar:
        for i, (img, cap) in enumerate(zip(images, captions)):
            img.save(folder / f"{i}.png")
            (folder / f"{i}.txt").write_text(cap)
            for name, data in ((f"{i:04d}.png", (folder / f"{i}.png").read_bytes()), (f"{i:04d}.txt", cap.encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_dict({"image": images, "caption": captions}).cast_column("image", datasets.Image())
    table.save_to_disk(str(tmp_path / "table"))
    expected = open_image_source(str(folder), 16)
    for spec in (str(tmp_path / "images-0.tar"), str(tmp_path / "table")):
        source = open_image_source(spec, 16)
        assert len(source) == 3
        for i in range(3):
            assert torch.equal(source[i][0], expected[i][0]) and source[i][1] == expected[i][1] == captions[i], spec
    message = one_line(ConfigError, open_image_source, str(tmp_path / "table"), 16, "nope")
    assert "has no column 'nope'; it has: image, caption" in message


@pytest.mark.parametrize("kind", ["sd3", "flux", "sana", "qwen"])
def test_flow_teachers_train_from_prompt_and_latent_caches(tmp_path: Path, kind: str) -> None:
    """The caches of the flow-matching transformer teachers: prompt rows (SD3's joint sequence and pooled vector,
    Flux's T5 sequence and CLIP vector, SANA's Gemma sequence and Qwen-Image's Qwen2.5-VL sequence with their attention
    masks in the pooled slot) give the conditioning fresh encoding gives; latent rows (the 16-channel KL VAE's shifted
    latents, SANA's AutoencoderDC latents, Qwen-Image's one-frame video VAE latents) are the VAE's encoding."""
    (tmp_path / "p.txt").write_text("\n".join(f"a photo of a cat number {i}" for i in range(5)))
    folder = image_folder(tmp_path)

    def config(**data) -> object:  # noqa: ANN003
        return make_config("dmd2", f"tiny:{kind}", args={"critic_updates": 1, "gan_student_weight": 0.01,
                                                         "gan_critic_weight": 0.01},
                           model={"timesteps": [1000]}, train={"steps": 1, "batch_size": 2},
                           data={"workers": 0, **data})

    encode_prompts(config(prompt_file=str(tmp_path / "p.txt")), tmp_path / "prompts", batch=2, dtype="float32")
    encode_images(config(real=str(folder)), tmp_path / "latents", batch=2, dtype="float32", workers=0)
    streamed = assemble(config(prompt_file=str(tmp_path / "p.txt"), real=str(folder)), train=True)
    cached = assemble(config(prompt_cache=str(tmp_path / "prompts"), real_cache=str(tmp_path / "latents")),
                      train=True)
    a, b = streamed.data.sample(3, ShardedGenerator("cpu", 0)), cached.data.sample(3, ShardedGenerator("cpu", 0))
    for field in ("embeds", "pooled", "mask", "guidance"):
        mine, theirs = getattr(a.cond, field), getattr(b.cond, field)
        assert (mine is None) == (theirs is None), field
        if mine is not None:
            assert torch.allclose(mine, theirs, atol=1e-5), field
    assert (a.cond.mask is not None) == (kind in ("sana", "qwen"))
    assert (a.cond.guidance is not None) == (kind == "flux")
    assert torch.allclose(a.cond.uncond.embeds, b.cond.uncond.embeds, atol=1e-6)
    assert b.real.shape == (3, *cached.models.sample_shape)
    from distill_diffusion.latents import encode

    size = int(cached.models.sample_shape[-1]) * int(cached.models.pipeline.vae_scale_factor)
    source = open_image_source(str(folder), size)
    direct = encode(cached.models, torch.stack([source[i][0] for i in range(len(source))]))
    cache = Cache(tmp_path / "latents", "images", None, "cache")
    assert torch.allclose(torch.stack([cache.row(i)["latents"] for i in range(len(cache))]), direct, atol=1e-5)
