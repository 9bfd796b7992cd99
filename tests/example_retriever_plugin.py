"""An example retriever plugin (``--retriever example_retriever_plugin:build?folder=DIR``).

It wraps a CLIP folder the way a user's own code might: numpy arrays out, no batch_size or
progress keywords, its own identity string. THI, the miner and the feature cache see it only
through the plugin interface (mllm_tune.core.retrievers.plugin.RetrieverLike)."""

from __future__ import annotations

import numpy as np


class MyRetriever:
    def __init__(self, folder: str):
        from mllm_tune.core.retrievers import load_retriever

        self._model = load_retriever(folder)
        self.identity = f"my-plugin-{self._model.identity}"

    def encode_images(self, paths):
        return self._model.encode_images(paths, progress=False).numpy().astype(np.float32)

    def encode_texts(self, texts):
        return self._model.encode_texts(texts, progress=False).numpy()


def build(folder: str) -> MyRetriever:
    return MyRetriever(folder)


def build_bad_shape(folder: str):
    r = MyRetriever(folder)
    r.encode_texts = lambda texts: np.ones((len(texts) + 1, 4), dtype=np.float32) / 2
    return r


def build_not_normalised(folder: str):
    r = MyRetriever(folder)
    r.encode_texts = lambda texts: np.ones((len(texts), 4), dtype=np.float32)
    return r


def build_missing_method(folder: str):
    class Half:
        identity = "half"

        def encode_images(self, paths):
            return np.zeros((len(paths), 4))

    return Half()
