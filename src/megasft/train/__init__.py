"""SFT training on megatron-core: the pieces shared with other stages live here.

`loss.masked_token_loss` is the one definition of the training loss; the evaluation stage
computes validation loss with it, so a val loss in `metrics.json` is the number the trainer
would report on the same tokens. `batch` builds position ids and attention masks for packed
rows.
"""
