"""Evaluation: known-answer metrics today; FID, CLIP score and the FID-vs-NFE sweep build on this package."""
