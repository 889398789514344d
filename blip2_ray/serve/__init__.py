"""Ray Serve application: HTTP API for captioning, VQA, embeddings, matching and OpenAI-style chat."""
