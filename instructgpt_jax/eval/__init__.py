"""Evaluation: pure functions the stages and the pipeline call.

stats (mean ± CI, bootstrap, paired differences, win rates), gold (gold-labeler and RM-judge comparisons
of a policy against a baseline), rm_accuracy (RM pairwise accuracy, RM scores of texts), perplexity
(held-out LM loss), few_shot (GPT-3-style k-shot evaluation), samples (markdown sample tables).
"""
