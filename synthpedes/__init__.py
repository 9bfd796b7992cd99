"""SynthPEDES: the simulation that stands in for real models and data on a CPU.

The generator and its ground truth (``dataset``), the simulated oracle MLLM (``oracle``), the
bag-of-words retriever (``bow_retriever``), tiny random Qwen-VL / CLIP models (``tiny``),
SynthPEDES-VL pre-training data (``vl_pretrain``) and its training / evaluation scripts
(``vl_train``, ``vl_eval``), and the CPU demo (``demo``, ``demo_assets``). The real pipeline reaches
it only through its ordinary interfaces (a backend name, a retriever spec, a dataset root); delete
this folder and every other package still imports.
"""
