"""Task or text: the one place that chooses what a run trains and evaluates on.

An experiment with a `task` section trains on that synthetic task, else on the `data` corpus.
Callers ask here instead of repeating the choice: `make_source` for batches (through the one
pipeline), `batch_format` for what the batches look like when no data may be built (plan,
memory checks, config properties).
"""

from __future__ import annotations

import grain

from lime_jax.data import pipeline
from lime_jax.data.pipeline import Batch, BatchFormat, Source
from lime_jax.data.tasks import TaskConfig, TaskSource
from lime_jax.data.tasks import batch_format as task_batch_format
from lime_jax.data.text import DataConfig, TextSource
from lime_jax.data.text import batch_format as text_batch_format
from lime_jax.data.tokenizers import Tokenizer


def make_source(data_cfg: DataConfig, task_cfg: TaskConfig | None, tokenizer: Tokenizer) -> Source:
  """The task's rows when there is a task config, else the corpus's (tokenized by `tokenizer`)."""
  if task_cfg is not None:
    return TaskSource(task_cfg)
  return TextSource(data_cfg, tokenizer)


def batch_format(data_cfg: DataConfig, task_cfg: TaskConfig | None) -> BatchFormat:
  """Section, global batch size, T and fields of the batches, from the configs alone."""
  if task_cfg is not None:
    return task_batch_format(task_cfg)
  return text_batch_format(data_cfg)


def train_iterator(data_cfg: DataConfig, task_cfg: TaskConfig | None, tokenizer: Tokenizer, *,
                   process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
  """Endless resumable training batches of this process's share (see pipeline.train_iterator)."""
  return pipeline.train_iterator(make_source(data_cfg, task_cfg, tokenizer),
                                 process_index=process_index, process_count=process_count)


def eval_batches(data_cfg: DataConfig, task_cfg: TaskConfig | None,
                 tokenizer: Tokenizer) -> list[Batch]:
  """The fixed evaluation batches: the task's test split, else the corpus's validation batches."""
  return pipeline.eval_batches(make_source(data_cfg, task_cfg, tokenizer))
