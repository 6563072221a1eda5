"""Files in, tensors out: the only package that knows input formats.

    formats.py       rating-file readers (MovieLens csv/dat, Amazon csv, RecBole .inter), precise errors
    movielens_1m.py  the ML-1M download (GroupLens, else the copy in a PyPI wheel)
    synthetic.py     seeded synthetic interactions at any scale
    interactions.py  the interactions table every source returns, and the source contract
    sequences.py     per-user chronological sequences over dense ids (the preprocessing rules)
    manifest.py      manifest.json: provenance, counts, what was dropped
    prepare.py       prepare(): the Parquet cache under datasets/<name>/, and its CLI
    splits.py        leave-one-out splits
    loader.py        the sharded, resumable DataLoader of SeqBatch
    batch.py         SeqBatch, the batch type the model consumes
"""
