"""Files in, tensors out: the only package that knows input formats.

    formats.py       event-file readers (MovieLens csv/dat, Amazon csv, RecBole .inter, any csv or Parquet
                     through a column mapping), streamed in Arrow batches, precise errors
    movielens_1m.py  the ML-1M download (GroupLens, else the copy in a PyPI wheel)
    synthetic.py     seeded synthetic interactions at any scale, and synthetic event files
    interactions.py  the events a source provides (streamed or in memory), and the source contract
    sequences.py     the preprocessing rules, and the packed per-user arrays
    streaming.py     the streaming preparation: bounded memory whatever the input's size
    manifest.py      manifest.json: provenance, options, counts, what was dropped
    prepare.py       prepare() and open_prepared(): the arrays under datasets/<name>/, and the CLI
    splits.py        leave-one-out and temporal splits
    loader.py        the sharded, resumable DataLoader of SeqBatch
    batch.py         SeqBatch, the batch type the model consumes
"""
