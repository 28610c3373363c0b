"""Shared pieces of the Lightning tests."""

from __future__ import annotations

import os
import textwrap

import lightning as L

# A user's predict job on two CPU processes (gloo), run as a script: ``strategy`` is the Trainer's strategy expression
# (names from lightning.pytorch.strategies and async_batching.lightning are imported); rank 0 writes the callback's
# summary, plus the ``NCCL_NVLS_ENABLE`` its process saw.
PREDICT_SCRIPT = """
import json, os, sys
sys.path.insert(0, {plugin!r})
import lightning as L
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader
from async_batching import SamplingParams
from async_batching.lightning import ContinuousBatching, JsonlPredictionWriter, TensorParallelStrategy
from async_batching.models import tiny_model


class UserModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = tiny_model("llama")

    def predict_step(self, batch, batch_idx):
        raise AssertionError("replaced by ContinuousBatching")


if __name__ == "__main__":
    prompts_path, out_path, summary_path = sys.argv[1:]
    prompts = json.load(open(prompts_path))
    cb = ContinuousBatching(SamplingParams(max_new_tokens={new}), max_num_seqs=4, num_blocks=128, log_summary=False)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy={strategy},
                        callbacks=[cb, JsonlPredictionWriter(out_path)], logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.predict(UserModule(), DataLoader(prompts, batch_size=3, collate_fn=lambda rows: {{"input_ids": rows}}),
                    return_predictions=False)
    if trainer.is_global_zero:
        json.dump(dict(cb.summary, nvls=os.environ.get("NCCL_NVLS_ENABLE"),
                       symm_multicast_off=os.environ.get("TORCH_SYMM_MEM_DISABLE_MULTICAST"),
                       nvshmem_nvls_off=os.environ.get("NVSHMEM_DISABLE_NVLS")), open(summary_path, "w"))
"""


def write_predict_script(path, repo_root: str, strategy: str, new_tokens: int) -> None:
    """``PREDICT_SCRIPT`` with its strategy and token budget, written to ``path``."""
    path.write_text(textwrap.dedent(PREDICT_SCRIPT.format(plugin=os.path.join(repo_root, "plugin"), new=new_tokens,
                                                          strategy=strategy)))


class KillAfter(L.Callback):
    """Dies like a killed job (KeyboardInterrupt, what Lightning sees on Ctrl-C / SIGINT) after ``n`` rows are written."""

    def __init__(self, n):
        self.n = n

    def on_generation_result(self, trainer, pl_module, record):
        self.n -= 1
        if self.n == 0:
            raise KeyboardInterrupt
