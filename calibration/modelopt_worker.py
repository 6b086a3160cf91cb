"""Run NVIDIA ModelOpt's ONNX PTQ in ModelOpt's own environment: `python modelopt_worker.py job.json`.

Started by `osx.calibration.quantize` with the ModelOpt environment's Python, which has neither osx
nor plain onnxruntime (ModelOpt pins onnx and pulls onnxruntime-gpu), so this file imports only
numpy and ModelOpt, and reads the calibration shards itself: `.npz` files whose arrays carry a
leading sample axis (osx.calibration.shards).

job.json: {model, output, mode: "fp8"|"int8", shards: [paths], inputs: {graph input name: numpy dtype},
           op_types: [...], nodes_to_exclude: [regexes], nodes_to_quantize: [regexes] | null,
           high_precision: "fp32"|"fp16", external_data: bool}
"""

import json
import sys

import numpy as np


class ShardSamples:
    """The CalibrationDataReader protocol ModelOpt calls (get_next, get_first, rewind), loading one
    shard at a time so a large calibration set never sits in memory whole."""

    def __init__(self, shards, inputs):
        self.shards, self.inputs = shards, inputs
        self.rewind()

    def _samples(self):
        for path in self.shards:
            with np.load(path) as shard:  # cast: an fp16 graph takes the float32 activations as float16
                arrays = {k: shard[k].astype(dtype, copy=False) for k, dtype in self.inputs.items()}
            for i in range(len(next(iter(arrays.values())))):
                yield {k: a[i] for k, a in arrays.items()}

    def get_next(self):
        return next(self._it, None)

    def get_first(self):
        return next(self._samples())

    def rewind(self):
        self._it = self._samples()


def main(job_path):
    from modelopt.onnx.quantization import quantize

    job = json.loads(open(job_path).read())
    quantize(
        job["model"],
        quantize_mode=job["mode"],
        calibration_data_reader=ShardSamples(job["shards"], job["inputs"]),
        calibration_method="max",  # amax calibration: ModelOpt's FP8 default, and deterministic
        calibration_eps=["cpu"],  # ranges only; a GPU is not needed to calibrate
        op_types_to_quantize=job["op_types"],
        nodes_to_exclude=job["nodes_to_exclude"] or None,
        nodes_to_quantize=job["nodes_to_quantize"],
        # The type of everything outside the Q/DQ pairs; TensorRT's strongly typed build keeps it.
        high_precision_dtype=job["high_precision"],
        use_external_data_format=job["external_data"],
        output_path=job["output"],
        log_level="WARNING",
    )


if __name__ == "__main__":
    main(sys.argv[1])
