"""osx.runtime: run a bundle without torch (numpy, onnxruntime / TensorRT, tokenizers, a video writer).

    from osx.runtime import Pipeline, write_video
    pipe = Pipeline.load("bundles/tiny")
    write_video(pipe.generate("a red fox in the snow", seed=7), "fox.mp4", fps=24)
"""

from osx.runtime.backends import BACKENDS, Backend, OrtBackend, create_backend
from osx.runtime.pipeline import GenerationCancelled, Pipeline, Request
from osx.runtime.prompt import EmptyPromptWarning, prepare_prompt
from osx.runtime.tokenizer import PromptTruncatedWarning, TextTokenizer
from osx.runtime.video import read_video_info, to_uint8_frames, write_preview, write_video

__all__ = [
    "BACKENDS", "Backend", "OrtBackend", "create_backend", "GenerationCancelled", "Pipeline", "Request",
    "EmptyPromptWarning", "prepare_prompt", "PromptTruncatedWarning", "TextTokenizer",
    "read_video_info", "to_uint8_frames", "write_preview", "write_video",
]
