"""One interface over every backend: `prefill(input_ids, attention_mask)` then `step(next_ids)`.

Runners keep the KV cache between calls (on the device, for GPU backends) and derive position_ids
from the attention mask, so left-padded batches work the same everywhere. Logits come back as fp32
torch tensors on the CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch


class DecodeRunner:
    """Holds the attention mask and positions; subclasses run the model and hold the cache."""

    name = "runner"

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.reset(input_ids.shape[0])
        self.mask = attention_mask.long()
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)  # left padding: first real token is 0
        self.next_position = positions[:, -1:] + 1
        return self.forward(input_ids.long(), self.mask, positions)

    def step(self, next_ids: torch.Tensor) -> torch.Tensor:
        """Feed one token per row ([B, 1]); returns logits [B, 1, V]."""
        self.mask = torch.cat([self.mask, torch.ones_like(next_ids)], dim=1)
        positions = self.next_position
        self.next_position = positions + 1
        return self.forward(next_ids.long(), self.mask, positions)

    def reset(self, batch: int) -> None:
        raise NotImplementedError

    def forward(self, input_ids, attention_mask, position_ids) -> torch.Tensor:
        raise NotImplementedError


class HFRunner(DecodeRunner):
    """A Hugging Face model run by its own code and cache (the reference; wrap in `surgery.masked`)."""

    name = "torch-reference"

    def __init__(self, model):
        self.model = model
        self.device = next(model.parameters()).device

    def reset(self, batch: int) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config)

    @torch.no_grad()
    def forward(self, input_ids, attention_mask, position_ids):
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                         position_ids=position_ids.to(self.device), cache=self.cache, use_cache=True)
        self.cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
        return out.logits.float().cpu()


class TorchRunner(DecodeRunner):
    """The physically skipped model (`surgery.SkippedModel`) in PyTorch, with flat per-layer KV tensors."""

    name = "torch-skipped"

    def __init__(self, skipped_model):
        from exporter.onnx_export import kv_shape

        self.model = skipped_model
        self.param = next(skipped_model.parameters())
        self._kv_shape = kv_shape

    def reset(self, batch: int) -> None:
        shape = self._kv_shape(self.model.config, batch, 0)
        self.past = [torch.zeros(shape, dtype=self.param.dtype, device=self.param.device)
                     for _ in range(2 * len(self.model.kept_attention))]

    @torch.no_grad()
    def forward(self, input_ids, attention_mask, position_ids):
        dev = self.param.device
        logits, *self.past = self.model(input_ids.to(dev), attention_mask.to(dev), position_ids.to(dev), *self.past)
        return logits.float().cpu()


class OrtRunner(DecodeRunner):
    """An exported ONNX graph in ONNX Runtime (CPU by default); presents are fed back as pasts."""

    name = "onnxruntime"

    def __init__(self, onnx_path: Path, providers: list[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(onnx_path), options, providers=providers or ["CPUExecutionProvider"])
        self.past_inputs = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def reset(self, batch: int) -> None:
        import numpy as np

        dtypes = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
        self.past = {}
        for inp in self.past_inputs:
            _, heads, _, dim = inp.shape
            # bfloat16 pasts have no numpy dtype; such graphs are run through OrtValue elsewhere
            self.past[inp.name] = np.zeros((batch, heads, 0, dim), dtype=dtypes.get(inp.type, np.float32))

    def forward(self, input_ids, attention_mask, position_ids):
        feeds = {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy(),
                 "position_ids": position_ids.numpy(), **self.past}
        outputs = dict(zip(self.output_names, self.session.run(None, feeds)))
        self.past = {name.replace("present.", "past_key_values.", 1): value
                     for name, value in outputs.items() if name.startswith("present.")}
        return torch.from_numpy(outputs["logits"]).float()


class TrtRunner(DecodeRunner):
    """A TensorRT / TensorRT-RTX engine through Polygraphy's TrtRunner; the KV cache stays on the GPU.

    Profile 0 (`prefill`, empty past) serves prefill and profile 1 (`decode`, one token) serves steps,
    as exporter/tensorrt.py builds them. Needs a CUDA GPU the engine was built for; not run in this
    project's CI (no GPU), so it is checked by `pytest -m gpu` / scripts/gpu_check.sh on users' GPUs.
    """

    name = "tensorrt"

    def __init__(self, engine_path: Path, backend: str = "tensorrt"):
        from exporter.tensorrt import open_runner

        if not torch.cuda.is_available():
            from exporter.errors import UserError

            raise UserError(f"running {engine_path} needs a CUDA GPU; none is visible to PyTorch")
        self.runner = open_runner(Path(engine_path), backend)
        self.device = torch.device("cuda")
        dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
        self.past_meta = {}  # name -> (heads, head_dim, dtype)
        for name, (dtype, shape) in self.runner.get_input_metadata().items():
            if name.startswith("past_key_values."):
                self.past_meta[name] = (shape[1], shape[3], dtypes[str(dtype)])  # Polygraphy DataType: 'float16'
        self.profile = 0

    def reset(self, batch: int) -> None:
        self.past = {name: torch.zeros((batch, heads, 0, dim), dtype=dtype, device=self.device)
                     for name, (heads, dim, dtype) in self.past_meta.items()}

    @torch.no_grad()
    def forward(self, input_ids, attention_mask, position_ids):
        profile = 0 if input_ids.shape[1] > 1 or attention_mask.shape[1] == input_ids.shape[1] else 1
        if profile != self.profile:
            self.runner.set_profile(profile)
            self.profile = profile
        feeds = {"input_ids": input_ids.to(self.device), "attention_mask": attention_mask.to(self.device),
                 "position_ids": position_ids.to(self.device), **self.past}
        outputs = self.runner.infer(feeds, copy_outputs_to_host=False)
        # Polygraphy reuses its output buffers between calls: copy the presents before feeding them back.
        self.past = {name.replace("present.", "past_key_values.", 1): value.clone()
                     for name, value in outputs.items() if name.startswith("present.")}
        return outputs["logits"].float().cpu()

    def close(self) -> None:
        self.runner.deactivate()
