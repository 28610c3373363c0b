"""Hydra: every option of every config group composes into the typed job config; typos are clear errors."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from async_batching import BatcherConfig, SamplingParams
from async_batching.hydra_conf import GROUP_SCHEMAS, register_configs
from async_batching.job_config import GenerateConfig, SamplingConfig

REQUIRED = {"model/pretrained": ["model.name=some/checkpoint"], "data/file": ["data.path=prompts.jsonl"]}


def conf_dir(repo_root: str) -> str:
    return os.path.join(repo_root, "conf")


def options(repo_root: str) -> list[tuple[str, str]]:
    found = []
    for group in [*GROUP_SCHEMAS, "experiment"]:
        for name in sorted(os.listdir(os.path.join(conf_dir(repo_root), group))):
            found.append((group, os.path.splitext(name)[0]))
    return found


def compose_job(repo_root: str, overrides: list[str]) -> tuple:
    register_configs()
    with initialize_config_dir(config_dir=conf_dir(repo_root), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return cfg, OmegaConf.to_object(cfg)


def test_every_group_option_composes_into_the_typed_job(repo_root):
    opts = options(repo_root)
    assert {g for g, _ in opts} == {*GROUP_SCHEMAS, "experiment"} and len(opts) >= 20
    for group, name in opts:
        cfg, job = compose_job(repo_root, [f"{group}={name}", *REQUIRED.get(f"{group}/{name}", [])])
        assert isinstance(job, GenerateConfig), (group, name)
        for key, schema in GROUP_SCHEMAS.items():
            assert OmegaConf.get_type(cfg[key]) is schema, (group, name, key)
        job.validate()  # also BatcherConfig.validate and SamplingParams.problems


def test_defaults_are_the_builtin_cpu_job(repo_root):
    _, job = compose_job(repo_root, [])
    assert (job.model.name, job.trainer.accelerator, job.data.path, job.writer.path) == (
        "smollm2", "cpu", None, "predictions.jsonl")
    assert job.sampling.params() == SamplingParams(max_new_tokens=64)
    assert job.batcher == BatcherConfig()


def test_overrides_from_the_readme_apply(repo_root):
    _, job = compose_job(repo_root, ["model=tiny_qwen2", "batcher.max_batch_tokens=8192", "trainer=gpu",
                                     "data.path=prompts.jsonl", "sampling.stop=[END]", "batcher.mode=sync"])
    assert (job.model.name, job.batcher.max_batch_tokens, job.trainer.accelerator, job.data.path) == (
        "tiny:qwen2", 8192, "gpu", "prompts.jsonl")
    assert job.sampling.params().stop == ("END",) and job.batcher.mode == "sync"


def test_decode_window_and_auto_budget_compose_from_hydra(repo_root):
    _, job = compose_job(repo_root, ["batcher.decode_window=8"])
    assert (job.batcher.decode_window, job.batcher.max_batch_tokens) == (8, None)  # None: the engine's auto budget
    _, job = compose_job(repo_root, ["batcher.decode_window=null", "batcher.max_batch_tokens=65536"])
    assert (job.batcher.decode_window, job.batcher.max_batch_tokens) == (None, 65536)
    with pytest.raises(ConfigCompositionException, match="decode_window"):
        compose_job(repo_root, ["batcher.decode_window=wide"])


@pytest.mark.parametrize("override, error, words", [
    (["batcher.max_batch_tokenz=4"], ConfigCompositionException, ["max_batch_tokenz", "BatcherConfig"]),
    (["sampling.temprature=1"], ConfigCompositionException, ["temprature", "SamplingConfig"]),
    (["batcher.max_batch_tokens=lots"], ConfigCompositionException, ["max_batch_tokens", "lots"]),
    (["model=tiny_lama"], ConfigCompositionException, ["tiny_lama", "tiny_llama"]),
    (["trainer.acelerator=gpu"], ConfigCompositionException, ["acelerator"]),
])
def test_a_typo_in_an_override_is_a_clear_error(repo_root, override, error, words):
    with pytest.raises(error) as info:
        compose_job(repo_root, override)
    text = str(info.value) + str(info.value.__cause__ or "")
    for word in words:
        assert word in text


def test_bad_values_are_named_by_validate(repo_root):
    _, job = compose_job(repo_root, ["batcher.mode=asynk"])
    with pytest.raises(ValueError, match="BatcherConfig.mode"):
        job.validate()
    _, job = compose_job(repo_root, ["sampling.top_p=0"])
    with pytest.raises(ValueError, match="top_p"):
        job.validate()
    _, job = compose_job(repo_root, ["on_error=ignore"])
    with pytest.raises(ValueError, match="on_error"):
        job.validate()


def test_sampling_config_mirrors_sampling_params():
    assert [f.name for f in dataclasses.fields(SamplingConfig)] == [f.name for f in dataclasses.fields(SamplingParams)]


def _foreign_app_compose(tmp_path, searchpath: str, overrides: list[str]):
    """Another project's Hydra app: its own primary config, our groups through hydra.searchpath."""
    (tmp_path / "config.yaml").write_text(
        f"defaults:\n  - batcher: throughput\n  - sampling: sample\n  - _self_\nhydra:\n  searchpath:\n    - {searchpath}\n"
        "their_setting: 1\n"
    )
    register_configs()
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_other_hydra_apps_can_pull_our_groups_into_their_search_path(repo_root, tmp_path):
    cfg = _foreign_app_compose(tmp_path, f"file://{conf_dir(repo_root)}", ["batcher.mode=sync"])
    assert OmegaConf.get_type(cfg.batcher) is BatcherConfig and cfg.batcher.max_batch_tokens == 8192
    assert cfg.sampling.temperature == 0.7 and cfg.their_setting == 1
    with pytest.raises(ConfigCompositionException, match="max_batch_tokenz"):
        _foreign_app_compose(tmp_path, f"file://{conf_dir(repo_root)}", ["batcher.max_batch_tokenz=1"])


def test_installed_package_ships_the_config_groups(tmp_path):
    """The installed package (CI: ``pip install -e .``) serves ``pkg://async_batching.conf``; missing, it fails."""
    assert importlib.util.find_spec("async_batching.conf") is not None, (
        "async_batching.conf is not importable: install the package (pip install -e .), which maps conf/ onto it")
    cfg = _foreign_app_compose(tmp_path, "pkg://async_batching.conf", [])
    assert OmegaConf.get_type(cfg.batcher) is BatcherConfig


def test_wheel_holds_every_config_file_and_module(repo_root, tmp_path):
    """A built wheel (what ``pip install .`` installs) ships all of conf/ and every module under plugin/."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "plugin", "conf"):
        copy = shutil.copytree if os.path.isdir(os.path.join(repo_root, name)) else shutil.copy
        copy(os.path.join(repo_root, name), src / name)
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(tmp_path),
                           str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    conf = {f"async_batching/conf/{p.relative_to(src / 'conf').as_posix()}" for p in (src / "conf").rglob("*.yaml")}
    modules = {p.relative_to(src / "plugin").as_posix() for p in (src / "plugin").rglob("*.py")}
    assert len(conf) >= 20 and not conf - shipped, sorted(conf - shipped)
    assert "async_batching/lightning/loop.py" in modules and not modules - shipped, sorted(modules - shipped)
