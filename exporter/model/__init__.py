"""The base model and its skipped form: the family table, loading, tokenizers, the serving checkpoint, removal."""
