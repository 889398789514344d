"""blip2_ray: BLIP-2 pre-training, CapFilt, evaluation and serving as a distributed pipeline on Ray.

Layers, from the bottom:
- `blip2_ray.model`: plain PyTorch, no Ray (ViT, Q-Former, objectives, stage 1 and 2, weight I/O).
- `blip2_ray.data`: shard readers and transforms (no models), and the Ray Data pipeline that runs them.
- `blip2_ray.runtime`: what every Ray job shares (start-up, command line, actor pools, user errors,
  atomic files).
- `blip2_ray.train` (Ray Train + DeepSpeed), `blip2_ray.eval` and `blip2_ray.capfilt` (Ray Data actor
  pools), `blip2_ray.serve` (Ray Serve): the packages that join models and data to Ray.
- `blip2_ray.config` and `blip2_ray.errors`: the typed config system and the one user-error type.
See docs/architecture.md for how a batch and a request flow through the files.
"""

__version__ = "0.1.0"
