"""Publishing: model cards and pushes to the Hugging Face Hub (:mod:`~hf_sparse_attn.publishing.hub`).

The card template is ``model_cards/template.md`` at the top of the repository; ``publishing/model_cards`` links to
that folder, so the wheel carries it as ``hf_sparse_attn/publishing/model_cards/template.md``.
"""
