"""Export to diffusers and few-step sampling pipelines."""
