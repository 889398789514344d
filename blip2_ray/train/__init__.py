"""BLIP-2 pre-training on Ray Train + DeepSpeed: config, worker loop, driver.

The only package (with `serve/`) that joins the model and data code to Ray.
"""

from blip2_ray.train.config import PretrainConfig

__all__ = ["PretrainConfig"]
