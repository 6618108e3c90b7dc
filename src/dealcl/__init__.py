"""dealcl: continual low-rank fine-tuning of language models.

The folders follow the data flow: data → prompts → models → methods → train → eval → runs.
"""
__version__ = "0.1.0"
