"""The ``hf-sparse-attn`` command: :mod:`~hf_sparse_attn.commands.cli` maps each sub-command to its module here.

``demo``, ``patch`` (:mod:`~hf_sparse_attn.commands.publish`), ``push``, ``eval-ppl``
(:mod:`~hf_sparse_attn.commands.eval_ppl`), ``calibrate``, ``plot`` and ``env`` each expose
``add_arguments(parser)`` and ``run(args) -> int`` and import torch and transformers only inside ``run``.
:mod:`~hf_sparse_attn.commands.packaged_model` is the demo's verified offline copy of all-MiniLM-L6-v2.
"""
