"""Shard I/O, the first stage of the data flow: raw text in webdataset shards, read back as documents.

``make_shards`` builds shards, ``urls`` opens shard specs (files, http, ``pipe:``), ``shard_reader`` turns tar
samples into :class:`~.documents.Document` records with counted skips, ``inspection`` counts what a pass reads.
"""
