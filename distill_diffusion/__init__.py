"""distill-diffusion: few-step diffusion distillation."""
