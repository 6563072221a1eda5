"""The model: plain nn.Modules and tensor functions, no processes, files or RPC.

- ``config``: ModelConfig (defaults = generative-recommenders' ML-1M HSTU) and its Enums.
- ``recommender``: GenerativeRecommender (item table -> encoder -> loss), ``encode_histories`` and
  ``score_items`` for evaluation and serving.
- ``hstu``, ``sasrec``: the two encoders; ``embeddings``: the item table and the shared input layer.
- ``loss``: shared-pool sampled softmax; ``metrics``: HR/NDCG/MRR; ``jagged``: index helpers.
- ``ops``: the HSTU attention op (PyTorch reference + Triton kernel).
"""
