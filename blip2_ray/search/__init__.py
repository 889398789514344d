"""Image search: a FAISS index of a collection's Q-Former ITC features, built by a Ray Data job (`job.py`)
and searched by the serving app's /v1/search. Everything but `job.py` is Ray-free."""
