"""Zero-shot evaluation: caption metrics (BLEU, CIDEr-D), VQAv2 accuracy, image-text retrieval."""
