"""The stand-in `model.py` fcx serve puts beside model.onnx, for Triton's python backend: it runs model.onnx in
onnxruntime the way Triton's onnxruntime backend would (one session per instance, the config's thread parameters,
every request of a dynamic batch in one run), since the onnxruntime backend cannot be installed where fcx serve runs
the server from the nvidia-pytriton wheel. It runs inside the server's own environment (numpy < 2), so it imports
nothing from fcexport; imports are inside the methods so this module can be read anywhere.
"""

import json
import os


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        parameters = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(parameters.get("intra_op_thread_count") or 0)
        options.inter_op_num_threads = int(parameters.get("inter_op_thread_count") or 0)
        if parameters.get("execution_mode") == "1":
            options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input_name = config["input"][0]["name"]
        self.output_names = [output["name"] for output in config["output"]]  # the logits, then any other outputs

    def execute(self, requests):
        import numpy as np
        import triton_python_backend_utils as pb_utils

        arrays = [pb_utils.get_input_tensor_by_name(r, self.input_name).as_numpy() for r in requests]
        try:
            found = self.session.run(self.output_names, {self.input_name: np.concatenate(arrays)})
        except Exception as exc:  # every request of the batch gets the reason
            error = pb_utils.TritonError(f"onnxruntime could not run the model: {str(exc).splitlines()[0][:300]}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        responses, start = [], 0
        for array in arrays:
            parts = [pb_utils.Tensor(name, values[start : start + len(array)]) for name, values in zip(self.output_names, found)]
            responses.append(pb_utils.InferenceResponse(output_tensors=parts))
            start += len(array)
        return responses
