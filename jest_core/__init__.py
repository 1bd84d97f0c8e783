"""jest_core: JEST batch selection for SigLIP-style contrastive pretraining.

Pure numpy/torch (no Beam, no I/O). `select` is the entry point; see
`jest_core.sampler` for the methods and `jest_core.scores` for the score matrices.
"""
from jest_core.losses import (CrossOperands, prepare_cross_operands, siglip_cross_loss_sums,
                              siglip_logits, siglip_loss_block, siglip_loss_diagonal,
                              siglip_loss_matrix)
from jest_core.sampler import (METHODS, Selection, chunk_sizes, effective_filter_ratio, score_kind,
                               gumbel_noise, gumbel_top_k, independent_select, joint_select,
                               select, super_batch_size, uniform_select)
from jest_core.scores import (SCORE_KINDS, EmbeddingPair, ScoreKind, ScoringInputs,
                              batch_score, cross_score_operands, cross_score_sums,
                              mean_random_batch_score, score_block, score_diagonal,
                              score_matrix)
