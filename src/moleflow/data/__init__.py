"""Datasets: every loader returns a :class:`TaskData` of lazily loaded :class:`Sample` records.

Entry point: :func:`resolve_task` turns a CLI task SPEC (see :mod:`moleflow.data.spec`) into a task.
Loaders: :mod:`~moleflow.data.mvtec` (MVTec AD, MPDD, MVTec 3D-AD RGB), :mod:`~moleflow.data.visa`,
:mod:`~moleflow.data.folder`, :mod:`~moleflow.data.elpv`, :mod:`~moleflow.data.synthetic`.
"""

from moleflow.data.base import ArraySample, FileSample, Sample, TaskData, check_task_name
from moleflow.data.elpv import ELPV_KINDS, load_elpv_task
from moleflow.data.errors import DatasetError
from moleflow.data.folder import load_folder_task
from moleflow.data.io import IMAGE_EXTENSIONS, list_images, read_image, read_mask
from moleflow.data.mvtec import load_mvtec_task
from moleflow.data.spec import parse_limits, resolve_task, resolve_tasks
from moleflow.data.synthetic import SYNTHETIC_KINDS, make_synthetic_task, render_sample
from moleflow.data.visa import load_visa_task

__all__ = [
    "ELPV_KINDS",
    "IMAGE_EXTENSIONS",
    "SYNTHETIC_KINDS",
    "ArraySample",
    "DatasetError",
    "FileSample",
    "Sample",
    "TaskData",
    "check_task_name",
    "list_images",
    "load_elpv_task",
    "load_folder_task",
    "load_mvtec_task",
    "load_visa_task",
    "make_synthetic_task",
    "read_image",
    "read_mask",
    "render_sample",
    "parse_limits",
    "resolve_task",
    "resolve_tasks",
]
