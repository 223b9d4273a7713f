"""Corpus builder, manifests, audio loading, token cache."""
