"""A Python-based Triton backend named ``onnxruntime``: ONNX Runtime on CPU, batched.

Why: the CPU Triton server from the ``nvidia-pytriton`` wheel has only the Python
backend, not Triton's native C++ onnxruntime backend. Triton treats
``<backend-dir>/onnxruntime/model.py`` as a *Python-based backend* (one shared
``model.py`` for every model whose config says ``backend: "onnxruntime"``), so the
project's model repository loads here unchanged and natively in NGC images.

What it does, per model instance:
- ``initialize`` parses the model config once, caches numpy dtypes and reshapes,
  and opens ``<model dir>/<version>/<default_model_filename or model.onnx>``.
- ``execute`` receives the requests the dynamic batcher grouped, concatenates each
  input along the batch axis, makes ONE ONNX Runtime call and splits the outputs
  back, so Triton's ``nv_inference_exec_count`` < ``nv_inference_count``.
- It returns exactly one response per request, in order; failures become
  ``pb_utils.TritonError`` inside the responses, never an exception out of execute.
"""

import glob
import json
import os
import sys


def _add_site_packages():
    """Put the serving venv's site-packages on sys.path (before numpy/onnxruntime).

    The stub's embedded interpreter ignores PYTHONPATH and the venv's site-packages,
    but it sees the environment. The launcher sets GENSERVE_TRITON_SITE_PACKAGES;
    otherwise try $VIRTUAL_ENV and then the first PATH entries (the launcher puts
    the venv's bin first), matching this interpreter's python version.
    """
    candidates = [p for p in os.environ.get("GENSERVE_TRITON_SITE_PACKAGES", "").split(os.pathsep) if p]
    pyver = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    prefixes = [os.environ.get("VIRTUAL_ENV", "")]
    prefixes += [os.path.dirname(p) for p in os.environ.get("PATH", "").split(os.pathsep)[:3] if p]
    for prefix in filter(None, prefixes):
        candidates += glob.glob(os.path.join(prefix, "lib", pyver, "site-packages"))
    for path in candidates:
        if os.path.isdir(path):
            if path not in sys.path:
                sys.path.insert(0, path)
            return path
    return None


_SITE_PACKAGES = _add_site_packages()


def _exit_with_parent(poll_s: float = 0.5):
    """The stub process outlived a tritonserver killed with SIGKILL (it ignores SIGTERM and
    held its /dev/shm region): once its parent is gone, it removes the shared-memory region
    named on its command line and exits. Started once per stub process."""
    import threading
    import time

    parent = os.getppid()
    try:
        with open("/proc/self/cmdline", "rb") as f:
            args = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        args = []
    regions = [os.path.join("/dev/shm", a.lstrip("/")) for a in args[1:]
               if a.startswith("/") and os.path.exists(os.path.join("/dev/shm", a.lstrip("/")))]

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        for region in regions:
            try:
                os.unlink(region)
            except OSError:
                pass
        os._exit(0)

    threading.Thread(target=watch, name="genserve-parent-watch", daemon=True).start()


_WATCHING = False

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402


def _param(config, key, default=""):
    """A string parameter from the model config (``parameters { key: ... }``)."""
    return config.get("parameters", {}).get(key, {}).get("string_value", default)


class TritonPythonModel:
    """One ONNX Runtime session per Triton model instance (KIND_CPU)."""

    def initialize(self, args):
        global _WATCHING
        if not _WATCHING:
            _exit_with_parent()
            _WATCHING = True
        config = json.loads(args["model_config"])
        self.name = args["model_name"]
        self.batching = int(config.get("max_batch_size", 0)) > 0

        # args["model_repository"] is this model's directory (<repo>/<model>).
        filename = config.get("default_model_filename") or "model.onnx"
        path = os.path.join(args["model_repository"], args["model_version"], filename)

        options = ort.SessionOptions()
        # Same parameter names as Triton's native onnxruntime backend; the env var
        # lets a crowded machine (or a test) cap threads without editing configs.
        intra = _param(config, "intra_op_thread_count") or os.environ.get("GENSERVE_ORT_THREADS", "0")
        inter = _param(config, "inter_op_thread_count", "0")
        options.intra_op_num_threads = int(intra)
        options.inter_op_num_threads = int(inter)
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])

        # Cache per-tensor facts once: numpy dtype and the graph-side shape (reshape),
        # keyed by tensor name. Triton hands python backends tensors in the config's
        # dims (plus the batch dim); the graph wants reshape.shape, e.g. [N,1] -> [N].
        def facts(tensor):
            dtype = pb_utils.triton_string_to_numpy(tensor["data_type"])
            reshape = tensor.get("reshape")
            graph_dims = list(reshape.get("shape", [])) if reshape is not None else None
            return dtype, list(tensor["dims"]), graph_dims

        self.inputs = {t["name"]: facts(t) for t in config["input"]}
        self.outputs = {t["name"]: facts(t) for t in config["output"]}
        graph_outputs = {o.name for o in self.session.get_outputs()}
        missing = set(self.outputs) - graph_outputs
        if missing:
            raise pb_utils.TritonModelException(f"{path}: graph has no output(s) {sorted(missing)}")
        pb_utils.Logger.log_info(
            f"genserve onnxruntime backend: {self.name} v{args['model_version']} from {path} "
            f"(site-packages {_SITE_PACKAGES}, ort {ort.__version__}, intra_op_threads {intra})"
        )

    def _feeds(self, request):
        """The request's inputs as numpy arrays in the graph's shapes."""
        feeds = {}
        # One pass over the request's tensors: get_input_tensor_by_name scans them per name, which
        # is quadratic for a graph with adapter slots (hundreds of inputs).
        given = {t.name(): t for t in request.inputs()}
        for name, (dtype, _, graph_dims) in self.inputs.items():
            tensor = given.get(name)
            if tensor is None:
                raise ValueError(f"missing input '{name}'")
            array = tensor.as_numpy()
            if array.dtype != dtype:
                raise ValueError(f"input '{name}' has dtype {array.dtype}, expected {np.dtype(dtype)}")
            if graph_dims is not None:
                lead = [array.shape[0]] if self.batching else []
                array = array.reshape(lead + graph_dims)
            feeds[name] = array
        return feeds

    def _wanted(self, request):
        """The outputs the client asked for (all of them when it named none): a U-Net's
        DeepCache features are fetched only by callers that cache, and not copied otherwise."""
        names = set(request.requested_output_names() or ())
        return [n for n in self.outputs if n in names] or list(self.outputs)

    def _run(self, feeds, names):
        """One ONNX Runtime call for `names`; outputs in the config's dims and dtypes."""
        arrays = self.session.run(names, feeds)
        result = {}
        for name, array in zip(names, arrays):
            dtype, dims, graph_dims = self.outputs[name]
            if graph_dims is not None:  # undo an output reshape: graph shape -> config dims
                lead = [array.shape[0]] if self.batching else []
                array = array.reshape(lead + dims)
            result[name] = np.ascontiguousarray(array, dtype=dtype)
        return result

    @staticmethod
    def _response(outputs):
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor(name, array) for name, array in outputs.items()]
        )

    @staticmethod
    def _error(exc):
        return pb_utils.InferenceResponse(
            output_tensors=[], error=pb_utils.TritonError(f"{type(exc).__name__}: {exc}")
        )

    def execute(self, requests):
        # Parse every request first: a malformed one gets its own error response
        # and does not spoil the batch for the others.
        responses = [None] * len(requests)
        good = []  # (index, feeds, wanted outputs)
        for i, request in enumerate(requests):
            try:
                good.append((i, self._feeds(request), self._wanted(request)))
            except Exception as exc:  # noqa: BLE001 - any failure becomes a response
                responses[i] = self._error(exc)

        if good and self.batching and len(good) > 1:
            try:
                sizes = [feeds[next(iter(feeds))].shape[0] for _, feeds, _ in good]
                batch = {
                    name: np.concatenate([feeds[name] for _, feeds, _ in good], axis=0)
                    for name in self.inputs
                }
                union = {n for _, _, wanted in good for n in wanted}
                outputs = self._run(batch, [n for n in self.outputs if n in union])
                splits = np.cumsum(sizes)[:-1]
                per_request = {name: np.split(array, splits) for name, array in outputs.items()}
                for k, (i, _, wanted) in enumerate(good):
                    responses[i] = self._response({name: per_request[name][k] for name in wanted})
                return responses
            except Exception as exc:  # noqa: BLE001
                # One bad request (e.g. a label the graph rejects) fails the whole
                # batch: retry one by one so each gets its own result or error.
                pb_utils.Logger.log_warn(f"{self.name}: batch of {len(good)} failed ({exc}); "
                                         "running its requests one by one")

        for i, feeds, wanted in good:
            try:
                responses[i] = self._response(self._run(feeds, wanted))
            except Exception as exc:  # noqa: BLE001
                responses[i] = self._error(exc)
        return responses

    def finalize(self):
        self.session = None
