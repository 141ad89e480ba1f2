"""Data: registry, loading, conversion to messages, chat templates, tokenization, collation."""
