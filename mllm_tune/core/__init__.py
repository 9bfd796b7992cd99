"""The bottom floor: pieces every command shares.

Dataset readers (``pedes``), metrics (``metrics``), prompts and answer parsers (``prompts``), MLLM
backends and the answer cache (``backends``), retrievers and the feature cache (``retrievers``)
and model/processor loading (``modeling``). Nothing here imports the trainers, ``data_builders``,
``eval``, the SynthPEDES simulation or ``bench``.
"""
