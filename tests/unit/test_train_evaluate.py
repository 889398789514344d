import torch

from blip2_ray.train.evaluate import caption_names_object, retrieval_recall_at_1


class _Oracle(torch.nn.Module):
    """Image i and text i share a one-hot feature: perfect retrieval."""

    def encode_image(self, px):
        return px

    def image_feats(self, x):
        return x[:, None, :]

    def text_feat(self, ids, mask):
        return torch.nn.functional.one_hot(ids[:, 0], 4).float()


def test_recall_at_1_and_chance():
    px = torch.eye(4)
    ids = torch.arange(4)[:, None]
    r1, chance = retrieval_recall_at_1(_Oracle(), px, ids, torch.ones_like(ids), ["a", "b", "c", "d"])
    assert r1 == 1.0 and chance == 0.25
    r1, _ = retrieval_recall_at_1(_Oracle(), px, ids.flip(0), torch.ones_like(ids), ["a", "b", "c", "d"])
    assert r1 == 0.0


def test_caption_names_object():
    assert caption_names_object("a photo of a red circle", "red", "circle")
    assert not caption_names_object("a red square", "red", "circle")
