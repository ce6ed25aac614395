"""seqio tasks over document pages (vlpjax.data.documents, vlpjax.data.kinds.document).

Registered on import:
  documents_udop_joint_text_layout        \
  documents_udop_layout_modeling           } one task per UDOP objective
  documents_udop_visual_text_recognition  /
  documents_udop   a Mixture of the three, equal rates
  documents_qa     document QA ("question: ... context: ..." -> answer)
  documents_udop_qa  a Mixture of the three objectives and QA, equal rates

All over the embedded generator (128 px pages, 64 px images). Users' TFRecords
(schema in `vlpjax.data.kinds.document`) become a task with
`register_document_tfrecord_task`; their records take the same preprocessors
as the embedded ones.
"""
import functools
from typing import Iterable, Mapping, Optional, Union

import seqio

from vlpjax.data import documents
from vlpjax.data.kinds import document
from vlpjax.data.kinds import document_objectives as objectives
from vlpjax.data import tasks
from vlpjax.data.tasks import add_task

UDOP_NAME = "documents_udop"
QA_NAME = "documents_qa"
DEFAULT_PAGE_SIZE = 128
DEFAULT_IMAGE_SIZE = 64


def task_preprocessors(objective: str, image_size: int = DEFAULT_IMAGE_SIZE,
                       normalized_boxes: bool = False, **objective_options):
  """validate -> decode_page -> the objective (`objectives.OBJECTIVES`)."""
  if objective not in objectives.OBJECTIVES:
    raise ValueError(f"objective must be one of {objectives.OBJECTIVES}, got {objective!r}")
  return [functools.partial(document.validate, normalized_boxes=normalized_boxes),
          functools.partial(document.decode_page, image_size=image_size),
          functools.partial(objectives.udop_objective, objective=objective,
                            **objective_options)]


def _generated_source(page_size: int, split_sizes: Optional[Mapping[str, int]]):
  return tasks.generated_source(documents.make_dataset, split_sizes or documents.SPLIT_SIZES,
                                page_size=page_size)


def register_documents_udop(name: str = UDOP_NAME, page_size: int = DEFAULT_PAGE_SIZE,
                            image_size: int = DEFAULT_IMAGE_SIZE,
                            split_sizes: Optional[Mapping[str, int]] = None,
                            vocabulary=None) -> seqio.Mixture:
  """Tasks `{name}_{objective}` for the three UDOP objectives and their mixture `name`."""
  task_names = []
  for objective in objectives.UDOP_OBJECTIVES:
    task_name = f"{name}_{objective}"
    add_task(task_name, source=_generated_source(page_size, split_sizes),
             output_features=document.output_features(vocabulary),
             preprocessors=task_preprocessors(objective, image_size))
    task_names.append(task_name)
  return tasks.add_mixture(name, task_names)


def register_documents_qa(name: str = QA_NAME, page_size: int = DEFAULT_PAGE_SIZE,
                          image_size: int = DEFAULT_IMAGE_SIZE,
                          split_sizes: Optional[Mapping[str, int]] = None,
                          vocabulary=None) -> seqio.Task:
  """Document QA over the generated pages; small `split_sizes` suit tests."""
  return add_task(name, source=_generated_source(page_size, split_sizes),
                  output_features=document.output_features(vocabulary),
                  preprocessors=task_preprocessors(objectives.QA, image_size))


def register_document_tfrecord_task(
    name: str, file_pattern: Mapping[str, Union[str, Iterable[str]]],
    objective: str = objectives.QA, normalized_boxes: bool = False,
    image_size: int = DEFAULT_IMAGE_SIZE,
    num_input_examples: Optional[Mapping[str, int]] = None, vocabulary=None,
    **objective_options) -> seqio.Task:
  """A task over document TFRecords (split -> glob or list of globs).

  `objective` is one of `objectives.OBJECTIVES`; `normalized_boxes` says the
  files hold boxes in [0, 1] rather than pixels (then width/height are not
  read); `objective_options` go to `objectives.udop_objective` (mask_ratio,
  mean_group_length).
  """
  return add_task(
      name, source=document.tfexample_source(file_pattern, num_input_examples,
                                             normalized=normalized_boxes),
      output_features=document.output_features(vocabulary),
      preprocessors=task_preprocessors(objective, image_size, normalized_boxes,
                                       **objective_options))


UDOP_QA_NAME = "documents_udop_qa"


def register_udop_qa_mixture(name: str = UDOP_QA_NAME, qa_rate: float = 1.0,
                             udop_name: str = UDOP_NAME, qa_name: str = QA_NAME
                             ) -> seqio.Mixture:
  """The three UDOP objectives (`register_documents_udop(udop_name)`) and document QA
  (`register_documents_qa(qa_name)`) in one Mixture, QA at `qa_rate` times each objective's
  rate: UDOP's pretraining recipe mixes the self-supervised objectives with supervised tasks."""
  members = [f"{udop_name}_{objective}" for objective in objectives.UDOP_OBJECTIVES]
  return tasks.add_mixture(name, [(m, 1.0) for m in members] + [(qa_name, qa_rate)])


register_documents_udop()
register_documents_qa()
register_udop_qa_mixture()
