"""Model loading: local folders, hub ids, llama2.c checkpoints, the reference model and fine-tuned exports."""
