"""Notebook 01's data preparation, one module per stage.

``sources`` reads rows (JSON Lines, JSON, Parquet, Hub datasets), ``filters`` judges and truecases them,
``template`` renders and tokenizes them, ``pipeline`` streams them through all of it with an account of every row,
``stats`` counts tokens and packed sequences, ``output`` writes the result atomically. ``utils.prepare_data`` is the
command line.
"""
