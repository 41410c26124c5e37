"""The one loading step a flow-map student's export needs (MeanFlow, `methods/meanflow.py`).

Its UNet is a stock ``UNet2DConditionModel`` with diffusers' ``class_embed_type="timestep"``: it reads where each step
ends as ``class_labels`` = the interval from the step's timestep to the next one on the scheduler's schedule (-1, one
below the first training timestep, after the last). No stock pipeline passes ``class_labels``, so the export's model
card registers `add_end_time_hook` (its source, printed as it is here: it uses torch alone) on the pipeline. With it
the same export samples at any step count: ``num_inference_steps`` picks the schedule, the hook the intervals.
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
