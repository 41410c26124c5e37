"""The one loading step a flow-map student's export needs (MeanFlow, `methods/meanflow.py`).

Its UNet is a stock ``UNet2DConditionModel`` with diffusers' ``class_embed_type="timestep"``: it reads where each step
ends as ``class_labels`` = the interval from the step's timestep to the next one on the scheduler's schedule (-1, one
below the first training timestep, after the last). No stock pipeline passes ``class_labels``, so the export's model
card registers `add_end_time_hook` (its source, printed as it is here: it uses torch alone) on the pipeline. With it
the same export samples at any step count: ``num_inference_steps`` picks the schedule, the hook the intervals.

An SD3 / Flux student's transformer is its stock class; its second-time embedding (a ``TimestepEmbedding`` added to
the transformer's time embedding, `distill_diffusion.two_time`) has no slot there, so it is saved beside it
(``end_time_embed.safetensors``) and `add_end_time_embedding` (printed the same way; torch, diffusers and
safetensors) loads it and adds it through two hooks. The call names the step count through its ``sigmas``.
"""


def add_end_time_hook(pipe):  # noqa: ANN001, ANN201 (printed into model cards as it is)
    """Before each UNet call, pass the interval to the next timestep of ``pipe.scheduler`` as ``class_labels``."""
    import torch

    def hook(unet, args, kwargs):  # noqa: ANN001, ANN202
        sample = args[0] if args else kwargs["sample"]
        t = float(args[1] if len(args) > 1 else kwargs["timestep"])
        schedule = [float(s) for s in pipe.scheduler.timesteps] + [-1.0]
        end = schedule[schedule.index(t) + 1]
        kwargs["class_labels"] = torch.full((len(sample),), t - end, device=sample.device)
        return args, kwargs

    return pipe.unet.register_forward_pre_hook(hook, with_kwargs=True)


def add_end_time_embedding(pipe, path):  # noqa: ANN001, ANN201 (printed into model cards as it is)
    """An SD3 / Flux flow-map student: load its second-time embedding (``end_time_embed.safetensors`` in ``path``)
    beside ``pipe.transformer``'s time embedding, and before each transformer call pass the interval to the next
    timestep of ``pipe.scheduler`` (-1 after the last), in timesteps of 0 .. 1000."""
    import torch
    from diffusers.models.embeddings import TimestepEmbedding, Timesteps
    from safetensors.torch import load_file

    net = pipe.transformer
    state = load_file(f"{path}/end_time_embed.safetensors")
    proj = Timesteps(state["linear_1.weight"].shape[1], flip_sin_to_cos=True, downscale_freq_shift=0)
    embed = TimestepEmbedding(state["linear_1.weight"].shape[1], state["linear_1.weight"].shape[0])
    embed.load_state_dict(state)
    embed.to(net.device, net.dtype)
    scale = 1000.0 if type(net).__name__.startswith(("Flux", "QwenImage")) else 1.0  # they are passed t / 1000
    interval = {}

    def before(module, args, kwargs):  # noqa: ANN001, ANN202
        t = kwargs["timestep"].float() * scale
        schedule = torch.cat([pipe.scheduler.timesteps.float().cpu(), torch.tensor([-1.0])])
        i = int((schedule - float(t.flatten()[0])).abs().argmin())
        interval["value"] = (t - schedule[i + 1].to(t.device)).float()
        return args, kwargs

    def after(module, args, out):  # noqa: ANN001, ANN202
        return out + embed(proj(interval["value"].to(out.device)).to(out.dtype))

    return (net.register_forward_pre_hook(before, with_kwargs=True),
            net.time_text_embed.register_forward_hook(after))
