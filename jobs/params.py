"""The generation parameters of a job, as the API stores them and the worker reads them."""

from __future__ import annotations

from pydantic import BaseModel


class JobParams(BaseModel):
    """Every value resolved (bundle defaults applied, seed chosen), so a job can be reproduced from it."""

    caption: str
    seconds: float
    steps: int
    guidance_scale: float
    image_strength: float
    scheduler: str
    seed: int
    image_guidance: str = "conditional"  # which CFG branch sees the image (melfusion.pipeline.image_rows)
