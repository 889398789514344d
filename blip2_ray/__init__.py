"""blip2_ray: BLIP-2 pre-training, CapFilt, evaluation and serving as a distributed pipeline on Ray.

Layers: `blip2_ray.model` (plain PyTorch, no Ray), `blip2_ray.data` (readers and transforms, no models),
`blip2_ray.train` and `blip2_ray.serve` (the only places that join them to Ray).
"""

__version__ = "0.1.0"
