"""llmcore: a from-scratch GPT stack (tokenizer, shards, model, training, evaluation).

Imports torch, numpy, sentencepiece and pydantic only; never parsl or mlflow.
"""

__version__ = "0.1.0"
