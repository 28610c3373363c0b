"""Loads a bundled example task's JSONL files, named relative to this folder (so the tasks run from any directory)."""

import os

import datasets

HERE = os.path.dirname(os.path.abspath(__file__))


def load(data_files: dict, **_metadata) -> datasets.DatasetDict:
    """``custom_dataset`` of the example tasks: ``dataset_kwargs.data_files`` maps splits to files in this folder."""
    files = {split: os.path.join(HERE, name) for split, name in data_files.items()}
    return datasets.load_dataset("json", data_files=files)
