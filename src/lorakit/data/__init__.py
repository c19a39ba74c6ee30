"""The data layer: a run's files to batches, one way: read -> split -> encode -> batch (pipeline.py).

Reading files into records with counts and errors that name file, line and field (readers.py), one module per task
format (classification.py, prompts.py, conversations.py with chat_template.py), splitting (splitting.py), the examples
handed on (examples.py), batching and packing (collate.py), and `lorakit data`'s preview of what training will see
(preview.py).

Imports only `lorakit.errors` and `lorakit.config`: it takes a tokenizer and whether the model is an
encoder-decoder as arguments, and knows nothing of loading models, the engine or training.
"""
from .classification import ClassificationData
from .conversations import ChatData, Conversation, Message
from .examples import IGNORE, EncodedExample, PromptExample, TextExample
from .pipeline import Encoded, Records, Splits, batcher, encode, encode_examples, load_splits, read, read_file, split
from .prompts import InstructionData, SummarizationData, format_prompt
from .readers import LoadStats, iter_records
from ..errors import DataError

__all__ = ["ClassificationData", "ChatData", "Conversation", "Message", "IGNORE", "EncodedExample", "PromptExample",
           "TextExample", "Encoded", "Records", "Splits", "batcher", "encode", "encode_examples", "load_splits", "read",
           "read_file", "split", "InstructionData", "SummarizationData", "format_prompt", "LoadStats", "iter_records",
           "DataError"]
