"""Weight I/O: everything between files on disk and the network of `blip2_ray.model`.

Loading (weight sources, checkpoint files, rename tables, the stage builders, partitioned reads under ZeRO-3),
converting (LAVIS / HF / BERT / CLIP layouts, `convert.py`), exporting (the HF format, streamed from a training
engine) and the tokenizers a config names. Plain PyTorch and transformers, no Ray. This package depends on
`blip2_ray.model`, never the reverse.
"""
