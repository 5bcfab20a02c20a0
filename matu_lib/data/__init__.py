"""Data for the MaTU workbook: an offline 31-task suite, a captioned pretraining corpus, client partitions,
and loaders for the real 224 px benchmark datasets (GPU users)."""

from .corpus import corpus_vocabulary_coverage, make_corpus
from .partition import ClientShard, Manifest, partition
from .real import REAL_TASKS, DatasetNotAvailable, RealTaskInfo, load_real_task
from .suite import (
    SUITE_VERSION,
    TaskData,
    TaskSpec,
    build_task,
    default_data_dir,
    get_task,
    list_families,
    list_tasks,
    load_suite,
    load_task,
)

__all__ = [
    "SUITE_VERSION",
    "TaskData",
    "TaskSpec",
    "build_task",
    "default_data_dir",
    "get_task",
    "list_families",
    "list_tasks",
    "load_suite",
    "load_task",
    "make_corpus",
    "corpus_vocabulary_coverage",
    "ClientShard",
    "Manifest",
    "partition",
    "REAL_TASKS",
    "RealTaskInfo",
    "DatasetNotAvailable",
    "load_real_task",
]
