"""Data: grain batching every task uses (`batching`), text corpora and tokenizers, chat
templates, and each workload's sources. Importing the package imports nothing else, so a light
submodule (a chat template's renderer, a tokenizer) does not start grain or JAX."""
