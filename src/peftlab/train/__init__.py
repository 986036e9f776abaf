"""Training: the loop every method shares (transformers `Trainer` with an assistant-token loss that
computes logits only where there are targets), the resource meter, checkpoints and resume."""
