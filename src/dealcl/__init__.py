"""dealcl: continual low-rank fine-tuning of language models."""
