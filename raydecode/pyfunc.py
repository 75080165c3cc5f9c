"""The MLflow pyfunc flavour of a registered raydecode model (imported only where models are logged or loaded).

``mlflow.pyfunc.load_model("models:/raydecode-duala-subj08@champion")`` rebuilds the decoder from its package
(:func:`raydecode.checkpoint.load_adapted`: no Ray, no DeepSpeed); ``predict({"betas": (B, V), "subject": (B,)})``
returns the method's predictions (``brain`` retrieval embeddings, ...) as numpy arrays, and
``unwrap_python_model().decoder`` is the torch model.
"""

from __future__ import annotations

import mlflow.pyfunc

from raydecode.checkpoint import load_adapted
from raydecode.methods.spec import Reconstructs


class DecoderModel(mlflow.pyfunc.PythonModel):
    # inputs are dicts of arrays with no MLflow schema: no type-hint validation (MLflow warns on every import
    # of a model without hints; its own ChatModel opts out the same way)
    _skip_type_hint_validation = True

    def load_context(self, context):
        self.loaded = load_adapted(context.artifacts["package"])
        self.decoder = self.loaded.model

    def predict(self, context, model_input, params=None):
        """Inputs: the method's columns (``betas`` or ``bold``, and ``subject``; MindEye2 and Duala also take
        ``betas_repeats`` (N, 3, voxels): their outputs averaged over an image's repetitions). Methods that reconstruct
        images return ``image`` (uint8, one ``seed`` per row, default 0, 1, ...; ``params``: steps, guidance);
        the others their predictions (``brain`` retrieval embeddings, ...)."""
        import numpy as np
        import torch

        spec = self.loaded.spec
        params = params or {}
        batch = {}
        for k in (c for c in spec.columns if c in model_input and c != "image_id"):
            v = torch.as_tensor(np.asarray(model_input[k]))
            batch[k] = v.float() if v.is_floating_point() else v.long()
        with torch.no_grad():
            own = spec.get(Reconstructs)
            if own is not None and params.get("reconstruct", True):
                n = len(batch["subject"])
                seeds = np.asarray(model_input["seed"]) if "seed" in model_input else np.arange(n)
                images = own.reconstruct(self.decoder, batch, seeds, params.get("steps"), params.get("guidance"))
                return {"image": images.numpy()}
            out = spec.predict(self.decoder, batch)
        return {k: v.numpy() for k, v in out.items()}
