"""CapFilt: caption web images with a generative model, keep the captions a retrieval model ranks best."""
