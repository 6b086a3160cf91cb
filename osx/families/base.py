"""What a model family declares (the role optimum's per-model OnnxConfig plays), torch-free.

One `Family` object per family names everything generic code needs to know about it: its components
and their I/O specs, where each component's weights come from, the dtype policy, which components are
quantizable, how many denoiser passes a guided step takes and whether they share a batch, the export
forward adapter, the sampler kind and its defaults, the prompt handling and the reference dtype. Export,
validation, calibration, the planner, the engine build, the manifest, the bundle tools and the runtime read
it; none of them names a family. Code that belongs to one family (torch modules, a NumPy sampler) is
named here by dotted path ("package.module:attribute") and imported only by the stage that runs it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from osx.components import ComponentSpec
from osx.errors import OsxError

REFERENCE_DTYPES = ("bf16", "fp32")


def resolve(path: str) -> Any:
    """"package.module:attribute" -> the attribute (imported on first use)."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class WeightSource:
    """Where one checkpoint part comes from: a file or folder of a checkpoint directory, recognised by
    its tensor names (after wrapper prefixes such as "module.") where they can be read without loading
    the weights, else (pickles) by words in its file name. osx.export.checkpoint.find_parts reads these;
    the first source of a family whose rule matches wins, so a stricter rule goes before a looser one."""

    part: str  # "denoiser", "vae", "t5", ... (also the --PART option of `osx export` and `osx calibrate`)
    description: str  # for messages: "denoiser (STDiT3) weights"
    key_prefixes: tuple[str, ...]  # a state dict with a key starting with any of these ...
    name_hints: tuple[str, ...]  # (lower-case words of the file name, when the tensor names cannot be read)
    folder_file: str | None = None  # a file the part's folder must hold (T5: spiece.model)
    unused_prefixes: tuple[str, ...] = ()  # keys the released file holds that the module does not use
    requires: tuple[str, ...] = ()  # ... and with a key starting with each of these is this part
    required: bool = True  # False: an optional part (found and checked like the others; missing is no error)
    released_name: str | None = None  # the file or folder it ships as, for hints

    @property
    def option(self) -> str:
        """The command-line option naming this part's path."""
        return "--" + self.part.replace("_", "-")

    def matches(self, keys: list[str]) -> bool:
        return any(k.startswith(self.key_prefixes) for k in keys) and all(
            any(k.startswith(r) for k in keys) for r in self.requires)


@dataclass(frozen=True)
class ComponentDecl:
    name: str  # the manifest's component name
    module: str  # the attribute of the family's torch reference model that exports it
    weights: str  # the WeightSource.part its weights come from
    in_pipeline: bool = True  # text-to-video runs it (False: exported on request, e.g. the VAE encoder)
    quantizable: bool = False  # INT8/FP8 from calibrated Q/DQ graphs
    never_fp16: str | None = None  # why it must not run in float16 (None: it may)
    no_bf16: str | None = None  # why its ONNX graph cannot be bfloat16 at opsets 18-20 (Conv has none before 22)
    ort_fusions: bool = False  # transformer blocks: onnxruntime's GELU/norm/attention fusions apply (export.ort_optimize)
    depth: tuple[str, ...] = ()  # config fields ("section.field") counting its blocks: validation of a model
    #                              too large to run whole cuts them (osx.export.exporter.validation_config)
    blocks: tuple[tuple[str, ...], ...] = ()  # per depth field, the module lists of the blocks it counts: export
    #                                          traces a few and repeats the last to full depth (osx.export.repeat)
    # an optional set of components (not in the pipeline) exported only with `osx export --with-SET` and
    # planned with the family planner's `with_SET` option (Open-Sora v2.0: "t2i", Flux.1-dev and its decoder)
    optional_set: str | None = None
    # layers (torch module paths, osx.calibration.quantize.layer_groups) that int8/fp8 keep in full precision,
    # with why: calibration cannot give them ranges
    full_precision: tuple[tuple[str, str], ...] = ()
    # onnxruntime's static INT8 quantizes only the layers inside its repeated (numbered) blocks: the embedders
    # and the final layer stay fp32 (osx.calibration.quantize.outside_blocks; measured on v1.2's STDiT3)
    static_int8_blocks_only: bool = False


@dataclass(frozen=True)
class SamplerDecl:
    kind: str  # the runtime's NumPy sampler (osx.runtime sampler registry)
    guidance_passes: int  # denoiser passes per guided step: 2 (cond, uncond), 3 (text, image, none)
    cfg_batching: bool = True  # the passes may share one batched call
    defaults: Any = None  # the family's sampler settings dataclass, recorded in the manifest's `scheduler`


@dataclass(frozen=True)
class TokenizerDecl:
    """The tokenizer of one text encoder: the bundle file (tokenizers' JSON) and the token it pads with.
    Its length is the encoder's `input_ids` length (the component spec)."""

    encoder: str  # the text-encoder component whose input_ids it makes
    file: str = "tokenizer.json"
    pad_token: str = "<pad>"


@dataclass(frozen=True)
class PromptDecl:
    kind: str  # the runtime's prompt preparation ("aesthetic-score", ...)
    tokenizers: tuple[TokenizerDecl, ...] = (TokenizerDecl("text_encoder"),)  # one per text encoder

    @property
    def text_encoders(self) -> tuple[str, ...]:
        return tuple(t.encoder for t in self.tokenizers)

    @property
    def tokenizer_file(self) -> str:
        """The first text encoder's tokenizer file (the manifest's `tokenizer.file`)."""
        return self.tokenizers[0].file


@dataclass(frozen=True)
class Family:
    name: str
    configs: dict[str, Any]  # model name -> its config (released sizes, tiny test sizes, ...)
    config_from_dict: Callable[[dict], Any]  # the manifest's model.config back to the config
    components: tuple[ComponentDecl, ...]  # in export order
    component_specs: Callable[[Any], dict[str, ComponentSpec]]  # config -> the specs at the full ranges
    weights: tuple[WeightSource, ...]
    sampler: SamplerDecl
    prompt: PromptDecl
    reference: str  # "module:function": config, checkpoint parts or None -> the torch reference model
    forward_adapter: str | None = None  # "module:function": (component, module) -> what torch.onnx.export traces
    # "module" providing part_factories(config) -> {part: module factory}, random_init_std(config) -> {part: std
    # or None} and tokenizers(config, {part: path} or None) -> {text encoder: tokenizers.Tokenizer}
    export_parts: str | None = None
    reference_dtype: str = "bf16"  # the dtype the reference rounds its conditioning to; "fp32" available
    # what `osx generate` conditions on ("image", "video"), through the components not in the text-to-video
    # pipeline (the VAE encoder): exported and planned by default where this is not empty
    references: tuple[str, ...] = ()
    # "module:function" pairs (make_plan, suggest_fits) of the family's own memory planner, with the signatures
    # of osx.profiles.planner.make_plan and osx.profiles.fit.suggest_fits; None: those generic ones
    planner: tuple[str, str] | None = None
    # "module": the calibration capture adapter (protocol: osx.calibration.capture) that runs the torch reference
    # and records what the quantizable components are fed; None: no int8/fp8 for this family
    calibration: str | None = None
    extras: dict = field(default_factory=dict)

    def component(self, name: str) -> ComponentDecl:
        for c in self.components:
            if c.name == name:
                return c
        raise OsxError(f"{self.name} has no component {name!r}", hint=f"it has {', '.join(self.names())}")

    def names(self, pipeline_only: bool = False) -> tuple[str, ...]:
        return tuple(c.name for c in self.components if c.in_pipeline or not pipeline_only)

    def optional_set(self, name: str) -> tuple[str, ...]:
        """The components exported only with --with-NAME (ComponentDecl.optional_set)."""
        return tuple(c.name for c in self.components if c.optional_set == name)

    @property
    def optional_sets(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(c.optional_set for c in self.components if c.optional_set))

    @property
    def never_fp16(self) -> dict[str, str]:
        return {c.name: c.never_fp16 for c in self.components if c.never_fp16}

    @property
    def quantizable(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.components if c.quantizable)

    def weight_source(self, part: str) -> WeightSource:
        for w in self.weights:
            if w.part == part:
                return w
        raise OsxError(f"{self.name} has no weights part {part!r}", hint=f"its parts: {', '.join(w.part for w in self.weights)}")
