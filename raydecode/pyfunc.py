"""The MLflow pyfunc flavour of a registered raydecode model (imported only where models are logged or loaded).

``mlflow.pyfunc.load_model("models:/raydecode-duala-subj08@champion")`` rebuilds the decoder from its package
(:func:`raydecode.tracking.load_adapted`: no Ray, no DeepSpeed); ``predict({"betas": (B, V), "subject": (B,)})``
returns the method's predictions (``brain`` retrieval embeddings, ...) as numpy arrays, and
``unwrap_python_model().decoder`` is the torch model.
"""

from __future__ import annotations

import warnings

import mlflow.pyfunc

from raydecode.tracking import load_adapted

with warnings.catch_warnings():  # mlflow asks for type hints to infer a signature; inputs are dicts of arrays
    warnings.simplefilter("ignore", UserWarning)

    class DecoderModel(mlflow.pyfunc.PythonModel):
        def load_context(self, context):
            self.loaded = load_adapted(context.artifacts["package"])
            self.decoder = self.loaded.model

        def predict(self, context, model_input, params=None):
            import numpy as np
            import torch

            batch = {k: torch.as_tensor(np.asarray(model_input[k])) for k in ("betas", "subject")}
            batch["betas"] = batch["betas"].float()
            batch["subject"] = batch["subject"].long()
            with torch.no_grad():
                out = self.loaded.spec.predict(self.decoder, batch)
            return {k: v.numpy() for k, v in out.items()}
